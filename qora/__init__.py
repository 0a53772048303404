"""qora: run SmolLM3-3B and other Llama-family decoders locally from 4-bit weights."""

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


def load(path, threads=None, device="auto", max_seq_len=None):
    """Open a .qora model (memory-mapped) and return a ready-to-use Model."""
    from qora.model import load as _load

    return _load(path, threads=threads, device=device, max_seq_len=max_seq_len)


def cpu_info():
    """What the CPU engine chose: ISA path, features seen, OpenMP threads."""
    from qora.engine import cpu_info as _cpu_info

    return _cpu_info()
