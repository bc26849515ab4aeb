"""Loads the compiled extension, which registers torch.ops.fused_rnn.layer_forward/_backward, and
gives the ops fake (meta) implementations so that torch.compile can trace them without running them;
also the controls of the extension's CPU block cache (empty_cache, cpu_cache_bytes).

The fake implementations state only output shapes and dtypes; they must agree with the ops of both
devices' halves, csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp (tests/test_compile.py checks them
with torch.library.opcheck).
"""
import contextlib
from typing import Iterator

import torch  # first: the extension finds libc10 through it

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - the message is the point
    if "fused_rnn: FUSED_RNN_" in str(exc):  # an override's variable that is not valid (docs/kernels.md)
        raise ValueError(str(exc)) from None
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
    It holds at most `cpu_cache_mb` megabytes (an override: FUSED_RNN_CPU_CACHE_MB, or
    fused_rnn.set_overrides(cpu_cache_mb=...); default 1024, 0 turns the cache off). Like
    torch.cuda.empty_cache, this frees only blocks no tensor uses.
    """
    _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes of freed CPU blocks the cache holds now (see empty_cache)."""
    return _C.cpu_cache_bytes()


def overrides() -> dict:
    """The overrides of the kernel plans and of the CPU block cache, name -> value (docs/kernels.md).

    Each starts from its environment variable (FUSED_RNN_ and the name in capitals), read when
    fused_rnn is imported, and can be changed at run time with set_overrides or overrides_set.
    """
    return dict(_C.overrides())


def set_overrides(**values) -> None:
    """Sets overrides by name, e.g. set_overrides(float_kernel="avx2"); values may be given as str,
    int or bool. A name or value that is not valid raises ValueError naming the valid ones, and a
    kernel this CPU cannot run is not valid; then none is set. The next call of a layer follows them.
    Lowering cpu_cache_mb below what the cache holds gives its blocks back."""
    before = overrides()
    try:
        for name, value in values.items():
            _C.set_override(name, str(int(value)) if isinstance(value, bool) else str(value))
    except Exception:
        for name, value in before.items():  # all or nothing
            _C.set_override(name, value)
        raise
    if "cpu_cache_mb" in values and _C.cpu_cache_bytes() > int(overrides()["cpu_cache_mb"]) << 20:
        _C.empty_cpu_cache()  # a lower limit: the blocks kept beyond it go back now


@contextlib.contextmanager
def overrides_set(**values) -> Iterator[dict]:
    """set_overrides for the body of a with-statement; the previous values come back after it."""
    before = overrides()
    try:
        set_overrides(**values)
        yield overrides()
    finally:
        for name in values:
            if name in before:
                _C.set_override(name, before[name])


def cuda_plan(cell: str, dtype: torch.dtype = torch.float32, batch: int = 1, input_size: int = 1,
              hidden_size: int = 1, proj_size: int = 0, steps: int = 1, backward: bool = False,
              device: int = 0) -> dict:
    """The CUDA plan (csrc/cuda/cuda_plan.h) of a padded call on GPU `device`: the operands of the
    products, the recurrent loop, persistent or per-step launches, the fused backward. Needs the CUDA
    build and a GPU (fused_rnn.testing's emulation has its own: CudaEmulation.plan)."""
    if not built_with_cuda:
        raise RuntimeError("fused_rnn: this build has no CUDA kernels (docs/build.md)")
    return dict(_C.cuda_plan(backward, CELL_IDS[cell], dtype, steps, batch, input_size, hidden_size, proj_size,
                             device))


def override_choices() -> dict:
    """For each word-valued override, the values this CPU and build can run (tests iterate over them)."""
    return {name: list(words) for name, words in _C.override_choices()}


def cpu_plan(cell: str, dtype: torch.dtype = torch.float32, batch: int = 1, input_size: int = 1,
             hidden_size: int = 1, proj_size: int = 0, steps: int = 1, need_input_grad: bool = True,
             pass_: str = "forward") -> dict:
    """Which kernel takes each product of a CPU layer call with these sizes (csrc/cpu/kernel_plan.h):
    pass_ is "forward", "backward" or "int8" (the int8 layers' forward). cell: LSTM, GRU, RNN_TANH or
    RNN_RELU. Half types compute in float32 on the CPU, so they take float32's plan."""
    return dict(_C.cpu_plan(pass_, CELL_IDS[cell], dtype, steps, batch, input_size, hidden_size, proj_size,
                            need_input_grad))


# The `cell` argument of the compiled ops, and per cell id its gates per hidden unit and values
# saved per hidden unit: csrc/cells.h's, from the extension.
CELL_IDS = dict(_C.CELL_IDS)
LSTM_ID = CELL_IDS["LSTM"]
GATES = dict(_C.GATES)
_SAVED_PER_UNIT = dict(_C.SAVED_PER_UNIT)


def _computes_in_float(x: torch.Tensor) -> bool:
    """Half types keep their state and gate math in float32 inside the ops (on CUDA the matrix
    products take the half type); what they save for backward is float32."""
    return x.dtype in (torch.float16, torch.bfloat16)


@torch.library.register_fake("fused_rnn::layer_forward")
def _layer_forward_fake(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved,
                        w_peephole=None, zoneout=0.0, zoneout_masks=None, recurrent_masks=None, layer_norm=None):
    hidden = w_ih.size(0) // GATES[cell]
    out_size = w_hr.size(0) if w_hr is not None else hidden
    y = x.new_empty(x.size(0), out_size)
    h_n = x.new_empty(h0.shape)
    c_n = x.new_empty(c0.shape) if cell == LSTM_ID else x.new_empty(0)
    if not need_saved:
        return y, h_n, c_n, x.new_empty(0)
    cols = _saved_cols(cell, x, hidden, out_size, w_hr is not None, zoneout, layer_norm is not None)
    return y, h_n, c_n, x.new_empty(x.size(0), cols, dtype=torch.float32 if _computes_in_float(x) else x.dtype)


def _saved_cols(cell, x, hidden, out_size, has_proj, zoneout, layer_norm):
    """As LayerShape::saved_cols in csrc/layer.h: cell values (LSTM under zoneout or layer norm: and its
    own ĉ_t) | layer norm: x̂ of both projections and 4 statistics | projection input | half types: y."""
    per_unit = _SAVED_PER_UNIT[cell] + (1 if (zoneout > 0 or layer_norm) and cell == LSTM_ID else 0)
    norm = 2 * GATES[cell] * hidden + _C.LAYER_NORM_STATS if layer_norm else 0
    return per_unit * hidden + norm + (hidden if has_proj else 0) + (out_size if _computes_in_float(x) else 0)


@torch.library.register_fake("fused_rnn::layer_backward")
def _layer_backward_fake(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, w_hr, has_bias, y, saved, grad_y,
                         grad_h_n, grad_c_n, need_input_grad, w_peephole=None, zoneout=0.0, zoneout_masks=None,
                         recurrent_masks=None, layer_norm=None):
    # None where the op returns an undefined tensor, as the op itself does.
    bias = x.new_empty(w_ih.size(0)) if has_bias else None
    return (torch.empty_like(x) if need_input_grad else None,
            x.new_empty(h0.shape),
            x.new_empty(c0.shape) if cell == LSTM_ID else None,
            torch.empty_like(w_ih), torch.empty_like(w_hh), bias,
            None if bias is None else torch.empty_like(bias),
            None if w_hr is None else torch.empty_like(w_hr),
            None if w_peephole is None else torch.empty_like(w_peephole),
            None if layer_norm is None else torch.empty_like(layer_norm))


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
    rows, quad = _C.INT8_GROUP_ROWS, _C.INT8_QUAD
    return weight.new_empty(gates * (-(-hidden // rows)), -(-weight.size(1) // quad), _C.INT8_PANEL_BYTES)
