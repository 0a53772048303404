"""Exceptions raised by qora. Every user-facing failure is a QoraError with a one-line message."""


class QoraError(Exception):
    """Base class: a problem the user can act on (bad file, bad option, bad prompt)."""


class FormatError(QoraError):
    """A model file (.qora, GGUF, safetensors folder) is malformed, truncated or foreign."""


class ConfigError(QoraError):
    """A model config is inconsistent or unsupported."""


class ContextOverflowError(QoraError):
    """The prompt (plus what is generated) does not fit in the KV cache."""


class ModelFileChangedError(QoraError):
    """The model file was truncated or rewritten on disk while loaded (memory-mapped): the engine
    refuses to compute from it again; load the model anew."""
