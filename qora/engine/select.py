"""Engine choice: the one place that decides which engine runs a model, and falls back from the GPU
to the CPU when no GPU can run it."""

from __future__ import annotations

import logging
import os

from qora.engine import vulkan
from qora.engine.base import Engine
from qora.engine.cpu import CpuEngine, check_precision
from qora.engine.vulkan import GpuUnavailable, VulkanEngine
from qora.errors import QoraError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")


def make_engine(qfile, device: str = "auto", threads=None, max_seq_len=None, kv_type=None, precision=None) -> Engine:
    """The engine for `device` ("auto", "cpu" or "gpu"): the GPU when one can run the model, else the CPU.
    device="gpu" makes a missing or failing GPU an error instead of a fallback. kv_type: the KV cache
    type ("f32", "f16", "q8"; None: engine.base.kv_cache_dtype's default); precision: the CPU engine's
    arithmetic ("q8", "f32"; None: engine.cpu.default_precision), also on a GPU's fallback to the CPU."""
    if device not in DEVICES:
        raise QoraError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    check_precision(precision)
    if device == "cpu":
        return CpuEngine(qfile, n_threads=threads, max_seq_len=max_seq_len, kv_type=kv_type, precision=precision)
    try:
        return VulkanEngine(
            qfile,
            n_threads=threads,
            max_seq_len=max_seq_len,
            required=device == "gpu",
            kv_type=kv_type,
            cpu_precision=precision,
        )
    except GpuUnavailable as e:
        if device == "gpu":
            raise QoraError(f"no usable GPU: {e}") from None
        note = f"GPU not used ({e}); running on the CPU"
        # a machine without any Vulkan GPU hears about it only under --verbose
        log.log(logging.DEBUG if e.quiet else logging.WARNING, note)
    engine = CpuEngine(qfile, n_threads=threads, max_seq_len=max_seq_len, kv_type=kv_type, precision=precision)
    engine.notes = [note]
    return engine


def user_device(device: str) -> str:
    """The device a user's --gpu / --cpu means on this machine. `--gpu` where the only Vulkan devices
    are software renderers (Mesa's llvmpipe / lavapipe: the CPU emulating a GPU, many times slower
    than the CPU engine) runs on the CPU engine, said once, unless the user insists on it:
    QORA_VK_DEVICE=N or QORA_VK_ALLOW_CPU=1. The API's device="gpu" is not changed by this."""
    allow = os.environ.get("QORA_VK_ALLOW_CPU", "").strip().lower() not in ("", "0", "false", "no")
    if device != "gpu" or allow or os.environ.get("QORA_VK_DEVICE", "").strip():
        return device
    usable = [d for d in vulkan.devices() if d["usable"]]
    if usable and all(d["type"] == "cpu" for d in usable):
        names = ", ".join(d["name"] for d in usable)
        log.warning(
            "--gpu: the only Vulkan device (%s) is a CPU emulation of a GPU, slower than the CPU engine: "
            "running on the CPU (QORA_VK_ALLOW_CPU=1 or QORA_VK_DEVICE=N uses it anyway)",
            names,
        )
        return "cpu"
    return device
