"""qora: run SmolLM3-3B and other Llama-family decoders locally from 4-bit weights."""

from qora import log  # noqa: F401  (installs the "qora" logger's stderr handler: qora/log.py)
from qora.errors import ConfigError, ContextOverflowError, FormatError, QoraError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ContextOverflowError",
    "FormatError",
    "QoraError",
    "__version__",
    "cpu_info",
    "load",
]


def load(
    path, threads=None, device="auto", max_seq_len=None, verbose=False, rope_scaling=None, kv_type=None, precision=None
):
    """Open a GGUF or .qora model (memory-mapped) and return a ready-to-use Model.

    device: "auto" (a Vulkan GPU when one can run the model, else the CPU), "cpu", or "gpu" (an
    error if no GPU can); verbose: say on stderr which device runs it and what it needs;
    rope_scaling: "yarn" or "yarn:FACTOR" stretches the model's context by YaRN (SmolLM3: factor 2,
    65,536 -> 131,072 positions); kv_type: the KV cache's type, "f16" (the default for quantized
    weights), "f32" (for f16/f32 weights) or "q8" (Q8_0 blocks: about half the memory of f16); precision:
    the CPU engine's arithmetic, "q8" (activations rounded to 8 bits, integer products, llama.cpp's way) or
    "f32" (float activations); None: QORA_PRECISION, else f32 for a GGUF of up to 1B weights and q8 above
    (and for .qora files)."""
    from qora.loader import open_model

    return open_model(
        path,
        threads=threads,
        device=device,
        max_seq_len=max_seq_len,
        verbose=verbose,
        rope_scaling=rope_scaling,
        kv_type=kv_type,
        precision=precision,
    )


def cpu_info():
    """What the CPU engine chose: ISA path, features seen, OpenMP threads."""
    from qora.engine import cpu_info as _cpu_info

    return _cpu_info()
