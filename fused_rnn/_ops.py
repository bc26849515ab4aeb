"""Loads the compiled extension, which registers torch.ops.fused_rnn.layer_forward/_backward, and
gives the ops fake (meta) implementations so that torch.compile can trace them without running them;
also the controls of the extension's CPU block cache (empty_cache, cpu_cache_bytes).

The fake implementations state only output shapes and dtypes; they must agree with the ops of both
devices' halves, csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp (tests/test_compile.py checks them
with torch.library.opcheck).
"""
import torch  # first: the extension finds libc10 through it

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "fused_rnn: the compiled extension fused_rnn._C could not be loaded "
        f"({exc}). Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` (a build made for another torch version does not load)."
    ) from exc

built_with_cuda: bool = _C.built_with_cuda


def empty_cache() -> None:
    """Gives back to the system the CPU memory that fused_rnn keeps for reuse.

    On the CPU, the large buffers of a call (outputs, values saved for backward, input gradients)
    come from a cache of freed blocks, which spares the next call the page faults of fresh memory.
    It holds at most FUSED_RNN_CPU_CACHE_MB megabytes (environment, read at the first call;
    default 1024, 0 turns the cache off). Like torch.cuda.empty_cache, this frees only blocks no
    tensor uses.
    """
    _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes of freed CPU blocks the cache holds now (see empty_cache)."""
    return _C.cpu_cache_bytes()


# The `cell` argument of the compiled ops; the same numbering as CellKind in csrc/cells.h.
CELL_IDS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
LSTM_ID = CELL_IDS["LSTM"]

# Per cell id: gates per hidden unit (kGates) and values saved per hidden unit (kSaved), as in cells.h.
GATES = {0: 4, 1: 3, 2: 1, 3: 1}
_SAVED_PER_UNIT = {0: 5, 1: 4, 2: 1, 3: 1}


def _computes_in_float(x: torch.Tensor) -> bool:
    """Half types keep their state and gate math in float32 inside the ops (on CUDA the matrix
    products take the half type); what they save for backward is float32."""
    return x.dtype in (torch.float16, torch.bfloat16)


@torch.library.register_fake("fused_rnn::layer_forward")
def _layer_forward_fake(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved):
    hidden = w_ih.size(0) // GATES[cell]
    out_size = w_hr.size(0) if w_hr is not None else hidden
    y = x.new_empty(x.size(0), out_size)
    h_n = x.new_empty(h0.shape)
    c_n = x.new_empty(c0.shape) if cell == LSTM_ID else x.new_empty(0)
    if not need_saved:
        return y, h_n, c_n, x.new_empty(0)
    return y, h_n, c_n, x.new_empty(x.size(0), _saved_cols(cell, x, hidden, out_size, w_hr is not None),
                                    dtype=torch.float32 if _computes_in_float(x) else x.dtype)


def _saved_cols(cell, x, hidden, out_size, has_proj):
    """As LayerShape::saved_cols in csrc/layer.h: cell values | projection input | half types: y."""
    return (_SAVED_PER_UNIT[cell] * hidden + (hidden if has_proj else 0)
            + (out_size if _computes_in_float(x) else 0))


@torch.library.register_fake("fused_rnn::layer_backward")
def _layer_backward_fake(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, w_hr, has_bias, y, saved, grad_y,
                         grad_h_n, grad_c_n, need_input_grad):
    # None where the op returns an undefined tensor, as the op itself does.
    bias = x.new_empty(w_ih.size(0)) if has_bias else None
    return (torch.empty_like(x) if need_input_grad else None,
            x.new_empty(h0.shape),
            x.new_empty(c0.shape) if cell == LSTM_ID else None,
            torch.empty_like(w_ih), torch.empty_like(w_hh), bias,
            None if bias is None else torch.empty_like(bias),
            None if w_hr is None else torch.empty_like(w_hr))


@torch.library.register_fake("fused_rnn::quantized_layer_forward")
def _quantized_layer_forward_fake(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_ih_scale, w_ih_row_sum, w_hh,
                                  w_hh_scale, w_hh_row_sum, b_ih, b_hh):
    hidden = w_ih_scale.size(0) // GATES[cell]
    return (x.new_empty(x.size(0), hidden), x.new_empty(h0.shape),
            x.new_empty(c0.shape) if cell == LSTM_ID else x.new_empty(0))


@torch.library.register_fake("fused_rnn::quantized_pack_weight")
def _quantized_pack_weight_fake(weight, gates):
    """[gates·⌈H/16⌉, ⌈K/4⌉, 64] int8 (csrc/cpu/layer_cpu.h: pack_int8_panels)."""
    hidden = weight.size(0) // gates
    return weight.new_empty(gates * ((hidden + 15) // 16), (weight.size(1) + 3) // 4, 64)
