"""Engine choice: the one place that decides which engine runs a model, and falls back from the GPU
to the CPU when no GPU can run it."""

from __future__ import annotations

import logging

from qora.engine.base import Engine
from qora.engine.cpu import CpuEngine
from qora.engine.vulkan import GpuUnavailable, VulkanEngine
from qora.errors import QoraError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")


def make_engine(qfile, device: str = "auto", threads=None, max_seq_len=None) -> Engine:
    """The engine for `device` ("auto", "cpu" or "gpu"): the GPU when one can run the model, else the CPU.
    device="gpu" makes a missing or failing GPU an error instead of a fallback."""
    if device not in DEVICES:
        raise QoraError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return CpuEngine(qfile, n_threads=threads, max_seq_len=max_seq_len)
    try:
        return VulkanEngine(qfile, n_threads=threads, max_seq_len=max_seq_len, required=device == "gpu")
    except GpuUnavailable as e:
        if device == "gpu":
            raise QoraError(f"no usable GPU: {e}") from None
        note = f"GPU not used ({e}); running on the CPU"
        # a machine without any Vulkan GPU hears about it only under --verbose
        log.log(logging.DEBUG if e.quiet else logging.WARNING, note)
    engine = CpuEngine(qfile, n_threads=threads, max_seq_len=max_seq_len)
    engine.notes = [note]
    return engine
