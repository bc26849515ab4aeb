"""fused_rnn: fused LSTM, GRU and RNN layers, drop-ins for their torch.nn namesakes."""
import os as _os

import torch as _torch

from ._ops import (built_with_cuda, cpu_cache_bytes, cpu_plan, cuda_plan, empty_cache, override_choices, overrides,
                   overrides_set, set_overrides)
from .convert import convert
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from . import quantized  # noqa: E402 - registers the int8 layers with torch's quantize_dynamic

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "built_with_cuda", "empty_cache",
           "cpu_cache_bytes", "quantized", "cpu_plan", "cuda_plan", "overrides", "set_overrides", "overrides_set",
           "override_choices"]
__version__ = "0.1.0"

# A model saved whole with our layers loads under torch.load's weights_only (torch's default since 2.6)
# wherever the same model with torch.nn's layers would: the caller allows torch.nn's classes (or
# torch's int8 ones), and ours, which hold nothing else, are allowed once fused_rnn is imported.
if hasattr(_torch.serialization, "add_safe_globals"):
    _torch.serialization.add_safe_globals([LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell, quantized.LSTM, quantized.GRU])

if _os.environ.get("FUSED_RNN_EMULATE_CUDA") == "1":  # tests: the CUDA path on CPU tensors (fused_rnn.testing)
    from . import testing as _testing
    _testing._emulate_for_the_process()
