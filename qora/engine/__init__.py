"""The engines: what runs a model's forward pass.

- base.py: the Engine protocol every engine implements, and the policy they share;
- cpu.py: CpuEngine (the C forward pass), the ISA table and choice, cpu_info, FileGuard;
- vulkan.py: VulkanEngine (the Vulkan backend), device choice and memory sizing;
- select.py: make_engine, which engine runs a model, and the GPU -> CPU fallback.
"""

from qora.engine.base import (
    ENGINE_ATTRIBUTES,
    ENGINE_METHODS,
    Engine,
    check_tokens,
    default_context,
    kv_cache_dtype,
    rope_parameters,
)
from qora.engine.cpu import (
    DECODE_WALKS,
    ISA_NAMES,
    CpuEngine,
    FileGuard,
    amx_request,
    cpu_info,
    file_guard,
    guard_mapping,
    resolve_isa,
    resolve_kernel,
)
from qora.engine.select import DEVICES, make_engine
from qora.engine.vulkan import GpuUnavailable, VulkanEngine

__all__ = [
    "DECODE_WALKS",
    "DEVICES",
    "ENGINE_ATTRIBUTES",
    "ENGINE_METHODS",
    "ISA_NAMES",
    "CpuEngine",
    "Engine",
    "FileGuard",
    "GpuUnavailable",
    "VulkanEngine",
    "amx_request",
    "check_tokens",
    "cpu_info",
    "default_context",
    "file_guard",
    "guard_mapping",
    "kv_cache_dtype",
    "make_engine",
    "resolve_isa",
    "resolve_kernel",
    "rope_parameters",
]
