"""Autograd over the compiled ops, and the stacking of layers and directions.

Every sequence reaches the compiled ops in packed layout: a [N, features] tensor whose first
batch_sizes[0] rows are step 0, the next batch_sizes[1] rows step 1, and so on. A padded
[T, B, features] input is the same thing with batch_sizes = [B] * T, so one code path serves
padded and packed input alike.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops  # noqa: F401  (loads the compiled ops into torch.ops.fused_rnn)

# The `cell` argument of the compiled ops; the same numbering as CellKind in csrc/cells.h.
CELL_IDS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}


def _wants_grad(tensors: Sequence[Optional[Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Layer(torch.autograd.Function):
    """One layer, one direction, the whole sequence: (x, h0, c0, weights) -> (y, h_n, c_n)."""

    @staticmethod
    def forward(ctx, cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        y, h_n, c_n, saved = torch.ops.fused_rnn.layer_forward(
            cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, True)
        ctx.set_materialize_grads(False)
        ctx.cell, ctx.batch_sizes, ctx.reverse = cell, batch_sizes, reverse
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, saved)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n):
        x, w_ih, w_hh, w_hr, saved = ctx.saved_tensors
        if ctx.cell != CELL_IDS["LSTM"]:
            grad_c_n = None  # c_n is an empty placeholder for the other cells
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = torch.ops.fused_rnn.layer_backward(
            ctx.cell, x, ctx.batch_sizes, ctx.reverse, w_ih, w_hh, w_hr, ctx.has_bias, saved,
            grad_y, grad_h_n, grad_c_n, ctx.needs_input_grad[1])
        return None, dx, None, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


def layer(cell: int, x: Tensor, batch_sizes: List[int], reverse: bool, h0: Tensor,
          c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
          b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer and direction; records autograd only when a gradient can flow."""
    args = (cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if _wants_grad((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)):
        return _Layer.apply(*args)
    y, h_n, c_n, _ = torch.ops.fused_rnn.layer_forward(*args, False)
    return y, h_n, c_n


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
                bidirectional: bool, dropout: float, training: bool, has_proj: bool):
    """A stack of layers over packed-layout `x` [N, I].

    hx: [L*D, B, P]; cx: [L*D, B, H] for LSTM, else None. Returns (y [N, D*P], h_n, c_n or None).
    Dropout is applied to the output of every layer but the last, in training only, as torch.nn.
    """
    cell = CELL_IDS[mode]
    num_directions = 2 if bidirectional else 1
    weights = group_weights(flat_weights, num_layers, num_directions, has_bias, has_proj)
    layer_input = x
    h_n, c_n = [], []
    for l in range(num_layers):
        outputs = []
        for d in range(num_directions):
            k = l * num_directions + d
            y, h, c = layer(cell, layer_input, batch_sizes, d == 1, hx[k],
                            cx[k] if cx is not None else None, *weights[k])
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=1)
        if dropout > 0 and training and l < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, True)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if cx is not None else None)
