"""Autograd and autocast over the compiled ops, and the stacking of layers and directions.

Every sequence reaches the compiled ops in packed layout: a [N, features] tensor whose first
batch_sizes[0] rows are step 0, the next batch_sizes[1] rows step 1, and so on. A padded
[T, B, features] input is the same thing with batch_sizes = [B] * T, so one code path serves
padded and packed input alike; it is passed as an empty batch_sizes (every step has h0's rows), so
that a compiled graph holds no per-step list and keeps T and B symbolic.

Calls go to torch.ops.fused_rnn.layer_forward, whose gradient is registered with
torch.library.register_autograd and its shapes with register_fake (_ops.py), so that torch.compile
traces a whole model, forward and backward, without graph breaks; under torch.func's transforms
and forward-mode AD (eager) they go through _Layer, an autograd.Function with a jvp and a
functorch-ready setup_context, since the op's registration has neither. Plain eager calls
(plain_call) go below the op's Python autograd kernel, which costs more than a small step:
_C.layer_forward_below_autograd, with _EagerLayer recording the same backward where one is wanted.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._decomp import decompositions as _torch_cells

from ._ops import CELL_IDS, LSTM_ID, _C

def _torch_cell_step(cell, x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole=None, h_product=None,
                     layer_norm=None):
    """One step of the cell by torch's own out-of-place formulas (the decompositions that
    torch.compile uses for its recurrent layers): differentiable to any order and in forward mode,
    and safe under vmap, which torch._VF's cells are not (they add the gates in place). A peephole
    LSTM, which torch has no formula for, by _peephole_lstm_step. h_product: what the recurrent
    product takes instead of h (recurrent dropout's h ⊙ m); LSTM and RNN use h nowhere else. A
    layer-normalized cell by _layer_normed_step."""
    if layer_norm is not None:
        return _layer_normed_step(cell, x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole,
                                  h if h_product is None else h_product, layer_norm)
    if h_product is not None and cell == CELL_IDS["GRU"]:
        return _gru_step_apart(x_t, h, h_product, w_ih, w_hh, b_ih, b_hh), None
    if h_product is not None:
        h = h_product
    if w_peephole is not None:
        return _peephole_lstm_step(x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole)
    if cell == LSTM_ID:
        return _torch_cells.lstm_cell(F.linear(x_t, w_ih, b_ih), h, c, w_hh, b_hh, w_hr, 1)
    if cell == CELL_IDS["GRU"]:
        return _torch_cells.gru_cell_data(x_t, h, w_ih, b_ih, w_hh, b_hh), None
    nonlinearity = torch.tanh if cell == CELL_IDS["RNN_TANH"] else torch.relu
    return _torch_cells.rnn_cell_data(nonlinearity)(x_t, h, w_ih, b_ih, w_hh, b_hh), None


def _layer_normed_step(cell, x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, h_product, layer_norm):
    """csrc/cells.h's layer-normalized cells in PyTorch, out of place: LN(x·W_ihᵀ) ⊙ ln_ih and
    LN(h·W_hhᵀ) ⊙ ln_hh (over each row's G·H entries) before the biases; LSTM's ĥ = o ⊙ tanh(LN(ĉ) ⊙
    ln_c_weight + ln_c_bias). layer_norm packs [ln_ih | ln_hh | LSTM: ln_c weight | ln_c bias]."""
    gh_size = int(w_ih.shape[0])  # a constant for the exporters (layer_norm's shape; the weights' are fixed)
    a_x = F.layer_norm(F.linear(x_t, w_ih), (gh_size,), layer_norm[:gh_size], None, 1e-5)
    a_h = F.layer_norm(F.linear(h_product, w_hh), (gh_size,), layer_norm[gh_size:2 * gh_size], None, 1e-5)
    if b_ih is not None:
        a_x = a_x + b_ih
    if cell == CELL_IDS["GRU"]:
        if b_hh is not None:
            a_h = a_h + b_hh
        x_r, x_z, x_n = a_x.chunk(3, 1)
        h_r, h_z, h_n = a_h.chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        return (1 - z) * torch.tanh(x_n + r * h_n) + z * h, None
    pre = a_x + a_h + (b_hh if b_hh is not None else 0)
    if cell != LSTM_ID:
        return (torch.tanh(pre) if cell == CELL_IDS["RNN_TANH"] else torch.relu(pre)), None
    hidden = int(c.shape[1])
    gate_i, gate_f, gate_g, gate_o = pre.chunk(4, 1)
    p_i, p_f, p_o = w_peephole.chunk(3) if w_peephole is not None else (0, 0, 0)
    c_t = torch.sigmoid(gate_f + p_f * c) * c + torch.sigmoid(gate_i + p_i * c) * torch.tanh(gate_g)
    y = F.layer_norm(c_t, (hidden,), layer_norm[2 * gh_size:2 * gh_size + hidden], layer_norm[2 * gh_size + hidden:],
                     1e-5)
    h_t = torch.sigmoid(gate_o + p_o * c_t) * torch.tanh(y)
    return (h_t if w_hr is None else F.linear(h_t, w_hr)), c_t


def _gru_step_apart(x_t, h, h_product, w_ih, w_hh, b_ih, b_hh):
    """torch.nn's GRU step whose recurrent product takes h_product while the mix keeps h (recurrent
    dropout), out of place as _torch_cell_step."""
    x_r, x_z, x_n = F.linear(x_t, w_ih, b_ih).chunk(3, 1)
    h_r, h_z, h_n = F.linear(h_product, w_hh, b_hh).chunk(3, 1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _peephole_lstm_step(x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole):
    """csrc/cells.h's peephole LSTM in PyTorch, out of place: i = σ(·+p_i c_{t-1}), f = σ(·+p_f c_{t-1}),
    o = σ(·+p_o c_t), for the derivatives beyond a plain backward (as _torch_cell_step)."""
    gate_i, gate_f, gate_g, gate_o = (F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, 1)
    p_i, p_f, p_o = w_peephole.chunk(3)
    c_t = torch.sigmoid(gate_f + p_f * c) * c + torch.sigmoid(gate_i + p_i * c) * torch.tanh(gate_g)
    h_t = torch.sigmoid(gate_o + p_o * c_t) * torch.tanh(c_t)
    return (h_t if w_hr is None else F.linear(h_t, w_hr)), c_t


def _wants_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layer_with_torch_cells(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole=None,
                            layer_norm=None, zoneout=0.0, zoneout_masks=None, recurrent_masks=None):
    """The layer of layer_forward, recomputed step by step with torch's cell formulas over the
    same packed layout: the forward direction drops the rows whose sequences have ended, the
    reverse direction adds each row at its sequence's last step. Zoneout as csrc/cells.h's: the
    rows' masks (c_t's, then h_t's for LSTM; with a projection, of the projected h_t), or z for every
    unit. Recurrent dropout: the product takes h ⊙ recurrent_masks[b] for the step's row b (sequence b).
    Layer norm: its packed weights, as layer()'s."""
    if not batch_sizes:  # padded: every step has h0's rows
        batch_sizes = [h0.size(0)] * (x.size(0) // h0.size(0)) if h0.size(0) else []
    starts = [0]
    for n in batch_sizes[:-1]:
        starts.append(starts[-1] + n)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    rows = 0 if reverse else h0.size(0)
    h, c = h0[:rows], (c0[:rows] if cell == LSTM_ID else None)
    if zoneout_masks is not None:  # (c_t's [N, H] then) h_t's [N, P], as csrc/cells.h's Zoneout::of_row
        N, P, H = x.size(0), h0.size(1), (c0.size(1) if cell == LSTM_ID else 0)
        zoneout_rows = ((zoneout_masks[:N * H].view(N, H),) if H else ()) + (zoneout_masks[N * H:].view(N, P),)
    ended_h, ended_c, ys = [], [], [None] * len(batch_sizes)
    for t in steps:
        n = batch_sizes[t]
        if n > rows:  # reverse direction: these sequences start here, from their initial state
            h = torch.cat([h, h0[rows:n]])
            c = torch.cat([c, c0[rows:n]]) if c is not None else None
        elif n < rows:  # forward direction: these sequences have ended; keep their final state
            ended_h.append(h[n:])
            ended_c.append(c[n:] if c is not None else None)
            h, c = h[:n], (c[:n] if c is not None else None)
        rows = n
        rows_t = slice(starts[t], starts[t] + n)
        h_product = None if recurrent_masks is None else h * recurrent_masks[:n]
        h_new, c_new = _torch_cell_step(cell, x[rows_t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, h_product,
                                        layer_norm)
        if zoneout > 0:
            keep = (zoneout,) * 2 if zoneout_masks is None else tuple(m[rows_t] for m in zoneout_rows)
            h_new = keep[-1] * h + (1 - keep[-1]) * h_new
            if c is not None:
                c_new = keep[0] * c + (1 - keep[0]) * c_new
        h, c = h_new, c_new
        ys[t] = h
    y = torch.cat(ys) if ys else x.new_empty(0, h0.size(1))
    h_n = torch.cat([h] + ended_h[::-1])
    c_n = torch.cat([c] + ended_c[::-1]) if cell == LSTM_ID else None
    return y, h_n, c_n


def _setup_layer_context(ctx, inputs, output):
    (cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _need_saved, w_peephole, zoneout,
     zoneout_masks, recurrent_masks, layer_norm) = _with_defaults(inputs)
    ctx.cell, ctx.batch_sizes, ctx.reverse, ctx.zoneout = cell, batch_sizes, reverse, zoneout
    # All references, no copies. Backward reads h_{t-1} from y (the step before's output) or h0, and
    # c_{t-1} from saved or c0; the biases serve the differentiable recomputation. Saving y means
    # that changing it in place before backward is an error, as with torch.nn on cuDNN.
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout_masks, recurrent_masks,
                          layer_norm, output[0], output[3])
    # Outputs the loss does not reach get None, not zeros: autograd would otherwise fill a tensor
    # of zeros for `saved` at every backward (262 MB for LSTM T50 B256 H1024, about 5% of the
    # backward's time) and for y or h_n where the loss leaves them out. The op takes None for any.
    ctx.set_materialize_grads(False)


_DEFAULTS = (None, 0.0, None, None, None)  # layer_forward's w_peephole, zoneout, zoneout_masks, recurrent_masks,
# layer_norm


def _with_defaults(inputs):
    """layer_forward's arguments with those its schema gives defaults spelt out."""
    return tuple(inputs) + _DEFAULTS[len(inputs) - 12:]


def _layer_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_saved):
    """Gradients of layer_forward (its registration's backward, and _Layer's)."""
    return _layer_grads(ctx, torch.ops.fused_rnn.layer_backward, grad_y, grad_h_n, grad_c_n)


def _layer_grads(ctx, fused_backward, grad_y, grad_h_n, grad_c_n):
    """Gradients of layer_forward, by fused_backward (the op layer_backward, or its call below
    autograd) or differentiably.

    Plain backward (create_graph=False) runs our fused backward op, whose result is not itself
    differentiable. For a differentiable backward (create_graph=True: double backward, gradient
    penalties; and always under torch.func's transforms, which differentiate their backward), the
    layer is recomputed with torch's own cell formulas (_torch_cell_step) and differentiated by
    torch.func.vjp, so higher derivatives come from torch and no third copy of the gate equations
    exists. That path is step by step, hence slow: meant for gradient penalties, gradgradcheck and
    torch.func, not for training.
    """
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout_masks, recurrent_masks, layer_norm, y, saved = \
        ctx.saved_tensors
    if ctx.cell != LSTM_ID:
        grad_c_n = None  # c_n is an empty placeholder for the other cells
    if torch.is_grad_enabled():
        inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm)
        needs = _needs_of_inputs(ctx.needs_input_grad)  # those of `inputs`
        with torch.autocast(x.device.type, enabled=False):  # torch's cell formulas, as the forward ran
            grads = _differentiable_grads(ctx.cell, ctx.batch_sizes, ctx.reverse, inputs, needs,
                                          grad_y, grad_h_n, grad_c_n, (ctx.zoneout, zoneout_masks, recurrent_masks))
    else:  # the op has no autocast rule: none to turn off
        grads = fused_backward(
            ctx.cell, x, ctx.batch_sizes, ctx.reverse, h0, c0, w_ih, w_hh, w_hr, b_ih is not None, y,
            saved, grad_y, grad_h_n, grad_c_n, ctx.needs_input_grad[1], w_peephole, ctx.zoneout, zoneout_masks,
            recurrent_masks, layer_norm)
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dw_peephole, d_layer_norm = grads
    # one for each argument the call had (those with defaults may have been left out)
    return (None, dx, None, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None,
            dw_peephole, None, None, None, d_layer_norm)[:len(ctx.needs_input_grad)]


def _needs_of_inputs(needs_input_grad):
    """Of layer_forward's arguments' needs_input_grad, those of its tensors (x, h0, c0, w_ih, w_hh,
    b_ih, b_hh, w_hr, w_peephole, layer_norm); False for one the call left to its default."""
    needs = tuple(needs_input_grad)
    return needs[1:2] + needs[4:11] + (needs[12:13] or (False,)) + (needs[16:17] or (False,))


def _recomputed_layer(cell, batch_sizes, reverse, inputs, wanted, variants=(0.0, None, None)):
    """(the layer as a function of inputs[i] for i in wanted, those inputs): for torch.func.
    variants: (zoneout's z, its masks or None, recurrent dropout's masks or None), which no derivative
    is taken of."""
    inputs = tuple(inputs) + (None,) * (10 - len(inputs))  # w_peephole, layer_norm, where the call had none

    def layer_of(*chosen):
        args = list(inputs)
        for i, t in zip(wanted, chosen):
            args[i] = t
        y, h_n, c_n = _layer_with_torch_cells(cell, args[0], batch_sizes, reverse, *args[1:], *variants)
        return (y, h_n) if c_n is None else (y, h_n, c_n)
    return layer_of, tuple(inputs[i] for i in wanted)


def _differentiable_grads(cell, batch_sizes, reverse, inputs, needs, grad_y, grad_h_n, grad_c_n, variants):
    """The gradients of `inputs` (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm) as a graph, None
    where not needed; variants as _recomputed_layer's, the forward's. torch.func.vjp rather than
    autograd.grad: under torch.func's transforms the saved inputs are not autograd leaves of this
    level, and vjp differentiates them all the same."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if t is not None and need]
    grads = [None] * len(inputs)
    if not wanted:
        return grads
    layer_of, primals = _recomputed_layer(cell, batch_sizes, reverse, inputs, wanted, variants)
    outputs, pullback = torch.func.vjp(layer_of, *primals)
    cotangents = [g if g is not None else torch.zeros_like(o)
                  for g, o in zip((grad_y, grad_h_n, grad_c_n), outputs)]
    for i, g in zip(wanted, pullback(tuple(cotangents))):
        grads[i] = g
    return grads


def _layer_tangents(ctx, *input_tangents):
    """Forward mode: the tangents of (y, h_n, c_n) for the inputs' tangents, J·t, as the transpose
    of the differentiable backward: the pullback u -> Jᵀu is linear in u, so its own vjp with the
    cotangent t is J·t. Reverse mode only, so it works under torch.autograd.forward_ad (where a
    nested forward-mode level is refused) and under every torch.func transform alike; step by step,
    hence slow, as the differentiable backward."""
    # those of (x, h0, c0, w_ih, ..., w_hr, w_peephole, layer_norm)
    tangents = ([input_tangents[1]] + list(input_tangents[4:11]) + (list(input_tangents[12:13]) or [None])
                + (list(input_tangents[16:17]) or [None]))
    present = iter(ctx.saved_tensors)
    inputs = [next(present) if here else None for here in ctx.present]
    wanted = [i for i, (t, d) in enumerate(zip(inputs, tangents)) if t is not None and d is not None]
    with torch.autocast(inputs[0].device.type, enabled=False):
        layer_of, primals = _recomputed_layer(ctx.cell, ctx.batch_sizes, ctx.reverse, inputs, wanted,
                                              (ctx.zoneout, ctx.zoneout_masks, ctx.recurrent_masks))
        outputs, pullback = torch.func.vjp(layer_of, *primals)
        _, transpose = torch.func.vjp(pullback, tuple(torch.zeros_like(o) for o in outputs))
        (out_tangents,) = transpose(tuple(tangents[i] for i in wanted))
    d_y, d_h_n = out_tangents[:2]
    d_c_n = out_tangents[2] if ctx.cell == LSTM_ID else None
    return d_y, d_h_n, d_c_n, None


class _Layer(torch.autograd.Function):
    """layer_forward with every autograd mode eager PyTorch has: backward (ours, fused), double
    backward, forward mode (jvp) and torch.func's transforms (setup_context apart from forward;
    vmap from the generated rule, which runs the compiled op once per vmapped element).

    The op's own registration (register_autograd, below) has backward only: torch.func's grad and
    jacrev refuse it (no setup_context), and forward mode through it gives zero tangents,
    silently. It serves every other call (see _run_layer) and torch.compile, which cannot trace
    an autograd.Function with a jvp."""
    generate_vmap_rule = True

    @staticmethod
    def forward(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved, w_peephole,
                zoneout, zoneout_masks, recurrent_masks, layer_norm):
        return torch.ops.fused_rnn.layer_forward(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                 w_hr, need_saved, w_peephole, zoneout, zoneout_masks, recurrent_masks,
                                                 layer_norm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_layer_context(ctx, inputs, output)
        # x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm for jvp; save_for_forward takes no
        # None (an absent c0, bias, w_hr, ...), so the absent ones are remembered by position.
        primals = inputs[1:2] + inputs[4:11] + inputs[12:13] + inputs[16:17]
        ctx.present = [t is not None for t in primals]
        ctx.save_for_forward(*(t for t in primals if t is not None))
        ctx.zoneout_masks, ctx.recurrent_masks = inputs[14:16]  # for jvp's recomputation; no derivative
        # saved, and c_n of the cells without one (an empty placeholder), carry no derivative.
        ctx.mark_non_differentiable(*output[2 if inputs[0] != LSTM_ID else 3:])

    backward = staticmethod(_layer_backward)
    jvp = staticmethod(_layer_tangents)


torch.library.register_autograd("fused_rnn::layer_forward", _layer_backward, setup_context=_setup_layer_context)


class _EagerLayer(torch.autograd.Function):
    """layer_forward and its backward for plain eager calls (plain_call) that record a backward: the
    registration's context and gradients, without its Python autograd kernel, which costs about
    30 µs a call (bench/NOTES.md), and with both ops called below autograd. Not for torch.func (no
    setup_context, no jvp: _Layer), nor torch.compile (the op and its registration)."""

    @staticmethod
    def forward(ctx, cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved, w_peephole,
                zoneout, zoneout_masks, recurrent_masks, layer_norm):
        output = _C.layer_forward_below_autograd(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                 w_hr, need_saved, w_peephole, zoneout, zoneout_masks, recurrent_masks,
                                                 layer_norm)
        _setup_layer_context(ctx, (cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved,
                                   w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm), output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_saved):
        return _layer_grads(ctx, _C.layer_backward_below_autograd, grad_y, grad_h_n, grad_c_n)


def _autocast_dtypes(cell: int, device_type: str, h0: Tensor, has_proj: bool) -> Tuple[torch.dtype, torch.dtype]:
    """(dtype the op runs in, dtype of y and h_n) under autocast, as torch.nn's layers give them.

    CUDA: torch.nn's cells are on autocast's low-precision list, so everything runs in the
    autocast dtype (torch.nn's cuDNN layers are cast to float16 even under bfloat16 autocast; we
    keep the dtype asked for). CPU: torch.nn's recurrent ops have no autocast rule of their own;
    only their matrix products run in the low dtype and each output's dtype follows type promotion
    with the state's dtype: RNN -> low; GRU and LSTM -> the state's dtype (the cell state keeps
    LSTM's h there), computed in it; LSTM with proj_size -> y and h_n low (the projection is a
    matrix product), c_n the state's dtype. (torch.nn's oneDNN LSTM path, on CPUs with bfloat16
    support, returns the low dtype throughout; we follow its portable path.)
    """
    low = torch.get_autocast_dtype(device_type)
    if device_type != "cpu" or cell not in (LSTM_ID, CELL_IDS["GRU"]):
        return low, low
    return h0.dtype, (low if has_proj else h0.dtype)


def _autocast_eligible(t: Optional[Tensor]) -> bool:
    """The tensors autocast itself would cast: floating point, other than float64."""
    return t is not None and t.is_floating_point() and t.dtype != torch.float64


def _transformed() -> bool:
    """Is a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) or a forward-mode AD level
    (torch.autograd.forward_ad.dual_level) active? Then only _Layer gives the right derivatives."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def plain_call(tensors: Tuple[Optional[Tensor], ...]) -> bool:
    """Is this an ordinary eager call: no autocast, torch.compile or torch.export tracing, TorchScript
    tracing or ONNX export, torch.func transform or forward-mode level, and no __torch_function__ of
    a tensor or a mode? Then the op may be called below its Python autograd kernel where no gradient
    is wanted, its backward recorded by _EagerLayer (_run_plain_layer), and step() may be called."""
    return not (torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
                or torch._C._get_tracing_state() is not None or onnx_exporting() or _transformed()
                or torch._C._has_torch_function(tensors))


def onnx_exporting() -> bool:
    """torch.onnx.is_in_onnx_export, without its two imports at every eager call (1 µs). Traced,
    torch's own: Dynamo knows that one and skips reading the flags' module."""
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _ONNX_EXPORT_STATE.in_onnx_export or _ONNX_EXPORT_FLAGS._is_onnx_exporting


try:  # torch.onnx.is_in_onnx_export's own flags, without its imports at every call (1 µs)
    from torch.onnx._internal.exporter import _flags as _ONNX_EXPORT_FLAGS
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _ONNX_EXPORT_STATE
except ImportError:  # pragma: no cover - another layout of torch.onnx's internals
    onnx_exporting = torch.onnx.is_in_onnx_export  # noqa: F811


def step(cell: int, x: Tensor, h: Tensor, c: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
         b_hh: Optional[Tensor], w_peephole: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step of a cell, x [B, I] -> (h_1, c_1; c_1 empty but for LSTM), where plain_call holds:
    layer()'s work for a one-step padded sequence less its decisions. The same op, so the same bits."""
    need_saved = _wants_grad((x, h, c, w_ih, w_hh, b_ih, b_hh, w_peephole))
    h_1, _, c_1 = _run_plain_layer(cell, x, [], False, h, c, w_ih, w_hh, b_ih, b_hh, None, need_saved, w_peephole,
                                   0.0, None, None, None)
    return h_1, c_1


def _run_plain_layer(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved, w_peephole,
                     zoneout, zoneout_masks, recurrent_masks, layer_norm):
    """layer_forward below autograd, its backward recorded by _EagerLayer where one is wanted."""
    if need_saved:
        y, h_n, c_n, _ = _EagerLayer.apply(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, True,
                                           w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm)
    else:
        y, h_n, c_n, _ = _C.layer_forward_below_autograd(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih,
                                                         b_hh, w_hr, False, w_peephole, zoneout, zoneout_masks,
                                                         recurrent_masks, layer_norm)
    return y, h_n, c_n


def _run_layer(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout,
               zoneout_masks, recurrent_masks, layer_norm):
    need_saved = _wants_grad((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm))
    # Under a torch.func transform or a forward-mode level, eager calls go through _Layer, which
    # adds forward mode and torch.func's transforms (its apply costs about 0.5 ms a call:
    # autograd.Function binds its arguments through inspect.signature when setup_context is
    # defined). Plain eager calls go below the op's autograd kernel (_run_plain_layer). Compiled
    # graphs (and calls under autocast, tracing, export or __torch_function__) hold the op with its
    # registered backward; Dynamo cannot trace a jvp, so a forward-mode transform traced inside
    # torch.compile would see zero tangents: docs/ecosystem.md says to apply torch.func outside it.
    run = torch.ops.fused_rnn.layer_forward
    if not torch.compiler.is_compiling() and _transformed():
        run = _Layer.apply
    elif plain_call((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, layer_norm)):
        return _run_plain_layer(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved,
                                w_peephole, zoneout, zoneout_masks, recurrent_masks, layer_norm)
    y, h_n, c_n, _ = run(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, need_saved, w_peephole,
                         zoneout, zoneout_masks, recurrent_masks, layer_norm)
    return y, h_n, c_n


def layer(cell: int, x: Tensor, batch_sizes: List[int], reverse: bool, h0: Tensor,
          c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
          b_hh: Optional[Tensor], w_hr: Optional[Tensor], w_peephole: Optional[Tensor] = None,
          zoneout: float = 0.0, zoneout_masks: Optional[Tensor] = None,
          recurrent_masks: Optional[Tensor] = None,
          layer_norm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer and direction through the compiled op (differentiable through its registration).
    w_peephole: an LSTM's peephole weights [3H] (i, f, o), or None for torch.nn's LSTM. zoneout: the
    probability z, with zoneout_masks (training: 1 where a unit keeps its state, [N·H + N·P] for LSTM's
    c_t and h_t, [N·H] else) or without (eval: the expectation). recurrent_masks [B, P]: recurrent
    dropout's mask per sequence (0 or 1/(1 - p)), or None. layer_norm: the layer norm's weights [ln_ih |
    ln_hh | LSTM: ln_c weight | ln_c bias], or None; csrc/ops.cpp says the same.

    Under autocast the inputs are cast as torch.nn's layers would be (see _autocast_dtypes) and the
    op runs with autocast off: the op handles half types itself (float32 state and gate math), and
    its own matrix products must not be recast.
    """
    device_type = x.device.type
    if not (_autocast_eligible(x) and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return _run_layer(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout,
                          zoneout_masks, recurrent_masks, layer_norm)
    compute, out = _autocast_dtypes(cell, device_type, h0, w_hr is not None)
    tensors = [t.to(compute) if _autocast_eligible(t) else t
               for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, zoneout_masks, recurrent_masks,
                         layer_norm)]
    with torch.autocast(device_type, enabled=False):
        y, h_n, c_n = _run_layer(cell, tensors[0], batch_sizes, reverse, *tensors[1:9], zoneout, *tensors[9:])
    return y.to(out), h_n.to(out), c_n


def group_weights(flat_weights: Sequence[Optional[Tensor]], num_layers: int, num_directions: int,
                  has_bias: bool, has_proj: bool):
    """torch.nn's flat weight list -> per (layer, direction): (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    per = 2 + 2 * int(has_bias) + int(has_proj)
    if len(flat_weights) != per * num_layers * num_directions:
        raise ValueError(f"expected {per * num_layers * num_directions} weight tensors, "
                         f"got {len(flat_weights)}")
    groups = []
    for k in range(num_layers * num_directions):
        w = list(flat_weights[k * per:(k + 1) * per])
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        w_hr = w[-1] if has_proj else None
        groups.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return groups


def stacked_rnn(mode: str, x: Tensor, batch_sizes: List[int], hx: Tensor, cx: Optional[Tensor],
                flat_weights: Sequence[Optional[Tensor]], has_bias: bool, num_layers: int,
                bidirectional: bool, dropout: float, training: bool, has_proj: bool,
                peepholes: Optional[Sequence[Tensor]] = None, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                layer_norms: Optional[Sequence[Tensor]] = None):
    """A stack of layers over packed-layout `x` [N, I].

    hx: [L*D, B, P]; cx: [L*D, B, H] for LSTM, else None. Returns (y [N, D*P], h_n, c_n or None).
    Dropout is applied to the output of every layer but the last, in training only, as torch.nn.
    peepholes: a peephole LSTM's weights, one [3H] per layer and direction in torch.nn's order.
    zoneout: the probability z; in training each layer and direction draws its masks from torch's
    generator of x's device (torch.manual_seed makes a call reproducible), in eval the expectation.
    recurrent_dropout: the probability p of dropping a unit of h_{t-1} from the recurrent product; in
    training each layer and direction draws a mask per sequence and unit for the whole call (the same
    at every step), from the same generator. layer_norms: a layer-normalized cell's weights, one
    packed tensor per layer and direction (layer()'s layer_norm).
    """
    cell = CELL_IDS[mode]
    weights = group_weights(flat_weights, num_layers, 2 if bidirectional else 1, has_bias, has_proj)

    def run_layer(k, layer_input, reverse, h0, c0):
        masks = None
        if zoneout > 0 and training:  # 1: the unit keeps its previous state; LSTM: c_t's, then h_t's
            rows = layer_input.size(0)
            shape = (rows * (c0.size(1) if c0 is not None else 0) + rows * h0.size(1),)
            # Bernoulli(z) as uniform < z, compared in place (0. or 1. in the uniform numbers' tensor): on
            # the CPU 2.7x faster than torch.bernoulli of a tensor of z, and the drawing is most of it
            masks = _uniform_below(shape, zoneout, layer_input)
        recurrent = None
        if recurrent_dropout > 0 and training:  # kept with probability 1 - p, scaled by 1/(1 - p) as F.dropout
            recurrent = _uniform_below(h0.shape, 1 - recurrent_dropout, h0).mul_(1 / (1 - recurrent_dropout))
        return layer(cell, layer_input, batch_sizes, reverse, h0, c0, *weights[k],
                     peepholes[k] if peepholes else None, zoneout, masks, recurrent,
                     layer_norms[k] if layer_norms else None)

    return stack_layers(run_layer, x, hx, cx, num_layers, bidirectional, dropout if training else 0.0)


def _uniform_below(shape, probability: float, like: Tensor) -> Tensor:
    """1 where a uniform number from torch's generator of like's device is below `probability`, else
    0, in like's dtype. The numbers are drawn in float32 for the half types (whose own are too coarse:
    bfloat16's carry 8 bits), else in like's real type."""
    real = like.real.dtype if like.is_complex() else like.dtype
    real = torch.float32 if real in (torch.float16, torch.bfloat16) else real
    return torch.rand(shape, dtype=real, device=like.device).lt_(probability).to(like.dtype)


def stack_layers(run_layer, x: Tensor, hx: Tensor, cx: Optional[Tensor], num_layers: int, bidirectional: bool,
                 dropout: float):
    """Layers and directions in torch.nn's order: run_layer(k, input, reverse, h0, c0) -> (y, h_n, c_n)
    for layer l and direction d (k = l * D + d), the directions' outputs side by side as the next
    layer's input, dropout on every layer's output but the last. Returns (y, h_n, c_n or None)."""
    num_directions = 2 if bidirectional else 1
    layer_input = x
    h_n, c_n = [], []
    for l in range(num_layers):
        outputs = []
        for d in range(num_directions):
            k = l * num_directions + d
            y, h, c = run_layer(k, layer_input, d == 1, hx[k], cx[k] if cx is not None else None)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and l < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, True)
    if len(h_n) == 1:  # one layer, one direction: a view, not a copy (a short call pays each µs)
        return layer_input, h_n[0].unsqueeze(0), (c_n[0].unsqueeze(0) if cx is not None else None)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if cx is not None else None)
