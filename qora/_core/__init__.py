"""Compiled core of qora (C kernels and the CPU engine behind Cython wrappers).

The CPU core is imported here, once, inside qora.system.openmp_environment: its OpenMP runtime reads
its wait settings when it is loaded."""

from qora.system import openmp_environment

with openmp_environment():
    try:
        from qora._core import _cpu  # noqa: F401
    except ImportError:  # a source checkout never built: engine/cpu.py says so when the engine is asked for
        pass
