"""Exceptions of wsd_engine. Every message says what was wrong and how to fix it."""


class WSDError(Exception):
    """Base class of every error the engine raises on purpose."""


class RequestError(WSDError, ValueError):
    """A request (prompt, token ids, parameters) is invalid; the engine stays usable."""


class ContextOverflowError(RequestError):
    """A sequence would not fit in the model's static KV cache (`max_seq_len`)."""


class ConfigError(WSDError, ValueError):
    """`config.json` (or `generation_config.json`) is missing, unreadable or inconsistent."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture or one of its options is not supported."""


class ModelLoadError(WSDError, OSError):
    """A checkpoint folder or its weight files are missing, corrupt or do not match the config."""


class TokenizerError(WSDError, OSError):
    """Tokenizer files are missing or cannot be loaded."""


class TensorParallelError(WSDError, RuntimeError):
    """A tensor-parallel model cannot run a call: a rank died, failed or fell out of step
    (the model is then unusable: `close()` it and load it again), the model is closed, or
    the call is an internal step that cannot reach the other ranks alone."""
