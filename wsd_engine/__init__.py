"""wsd_engine: Weak-to-Strong Decoding engine.

A small aligned pilot model drafts the start of an answer; a strong base model scores the
draft token by token, takes over once its windowed confidence passes a threshold, and
writes the rest. `import wsd_engine` needs neither a GPU nor Triton.
"""
from .config import ModelConfig
from .engine import WSD, RequestOutput, WSDParams, WSDResult
from .errors import (ConfigError, ContextOverflowError, ModelLoadError, RequestError,
                     TensorParallelError, TokenizerError, UnsupportedModelError, WSDError)
from .loading import load_model
from .runner import Model
from .sampling import SamplingParams
from .switch import switch_index

__all__ = ["load_model", "Model", "WSD", "WSDParams", "WSDResult", "RequestOutput", "SamplingParams",
           "switch_index", "ModelConfig", "WSDError", "RequestError", "ContextOverflowError",
           "ConfigError", "UnsupportedModelError", "ModelLoadError", "TokenizerError",
           "TensorParallelError"]
__version__ = "0.1.0"
