"""Compiled core of qora (C kernels and the CPU engine behind Cython wrappers)."""
