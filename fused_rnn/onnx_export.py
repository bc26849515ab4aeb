"""ONNX export of what torch.nn's layers cannot record: fused_rnn's peephole LSTM, zoneout and layer norm.

torch.onnx.export records our plain layers through torch.nn's forward (modules.py), which its
exporters turn into ONNX's LSTM, GRU and RNN operators. A peephole LSTM has no torch.nn twin, so
here each layer and direction becomes ONNX's own LSTM operator with its P input (the peepholes), as
the TorchScript-based exporter (dynamo=False) writes it through _OnnxLSTM.symbolic. The
torch.export-based exporter (dynamo=True) does not take symbolic functions: it records _OnnxLSTM's
forward, the equations step by step in standard ONNX operators (for the traced sequence length).
Zoneout exports in eval mode, its expectation, and layer norm in either mode, as the equations step
by step (ONNX's recurrent operators have no such terms), with either exporter.

ONNX's LSTM orders the gates (i, o, f, c) and the peepholes (i, o, f); torch.nn's gates are
(i, f, g, o) and ours (i, f, o) (csrc/cells.h): the weights are reordered by traced slices, which
the exporter folds into the model's initializers.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor


def _onnx_gates(w: Tensor, H: int) -> Tensor:
    """torch.nn's gate blocks (i, f, g, o) along dim 0 -> ONNX's (i, o, f, c)."""
    return torch.cat([w[:H], w[3 * H:4 * H], w[H:2 * H], w[2 * H:3 * H]])


def _torch_gates(w: Tensor, H: int) -> Tensor:
    """ONNX's gate blocks (i, o, f, c) along dim 0 -> torch.nn's (i, f, g, o): _onnx_gates undone."""
    return torch.cat([w[:H], w[2 * H:3 * H], w[3 * H:4 * H], w[H:2 * H]])


class _OnnxLSTM(torch.autograd.Function):
    """One layer and direction, in ONNX's layouts: x [T, B, I], W [1, 4H, I], R [1, 4H, H], Bias [1, 8H],
    h0 and c0 [1, B, H], P [1, 3H] -> Y [T, 1, B, H], Y_h and Y_c [1, B, H]."""

    @staticmethod
    def forward(ctx, x, w, r, bias, h0, c0, p, hidden_size: int, reverse: bool):
        # The numbers, by functional's peephole step on the weights back in torch.nn's order (what the
        # torch.export-based exporter records; the TorchScript-based one writes the symbolic).
        from .functional import _peephole_lstm_step

        H = hidden_size
        w_ih, w_hh = _torch_gates(w[0], H), _torch_gates(r[0], H)
        b_ih, b_hh = _torch_gates(bias[0, :4 * H], H), _torch_gates(bias[0, 4 * H:], H)
        peephole = torch.cat([p[0, :H], p[0, 2 * H:], p[0, H:2 * H]])  # (i, o, f) -> (i, f, o)
        h, c = h0[0], c0[0]
        ys = [None] * x.size(0)
        for t in (range(x.size(0) - 1, -1, -1) if reverse else range(x.size(0))):
            h, c = _peephole_lstm_step(x[t], h, c, w_ih, w_hh, b_ih, b_hh, None, peephole)
            ys[t] = h
        return torch.stack(ys).unsqueeze(1), h.unsqueeze(0), c.unsqueeze(0)

    @staticmethod
    def symbolic(g, x, w, r, bias, h0, c0, p, hidden_size: int, reverse: bool):
        no_sequence_lens = g.op("prim::Constant")  # an absent optional input: every sequence is whole
        no_sequence_lens.setType(torch._C.OptionalType.ofTensor())
        return g.op("LSTM", x, w, r, bias, no_sequence_lens, h0, c0, p, hidden_size_i=hidden_size,
                    direction_s="reverse" if reverse else "forward", outputs=3)


def variant_layers(module, input, hx):
    """The forward of a fused_rnn.LSTM / GRU / RNN with peepholes, zoneout or layer norm as ONNX export
    records it: a peephole LSTM's layers as ONNX's LSTM operator (_OnnxLSTM); under zoneout (eval: the
    expectation z) or layer norm the equations step by step in standard operators, for the traced length. Eval
    mode only where zoneout or recurrent dropout draw masks in training (recurrent dropout is then
    the identity: alone, the layer exports as torch.nn's, modules.py)."""
    name = type(module).__name__
    for option, value in (("zoneout", module.zoneout), ("recurrent dropout", module.recurrent_dropout)):
        if value and module.training:
            raise NotImplementedError(f"fused_rnn: a {name} with {option} exports in eval mode (zoneout: its "
                                      f"expectation; recurrent dropout: the identity); call .eval() first (training "
                                      f"draws random masks)")
    if not isinstance(input, Tensor):
        raise NotImplementedError(f"fused_rnn: exporting a {name} with peepholes or zoneout to ONNX takes a padded "
                                  f"Tensor input (a PackedSequence is not supported there)")
    if module.proj_size > 0:
        raise NotImplementedError(f"fused_rnn: a {name} with proj_size cannot be exported to ONNX: ONNX's LSTM "
                                  f"operator has no projection of the hidden state")
    from .functional import CELL_IDS, _layer_with_torch_cells

    lstm = module.mode == "LSTM"
    H, D = module.hidden_size, 2 if module.bidirectional else 1
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    if hx is None:
        zeros = x.new_zeros(module.num_layers * D, x.size(1), H)
        h0, c0 = zeros, zeros
    elif lstm:
        h0, c0 = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    else:
        h0, c0 = (hx if batched else hx.unsqueeze(1)), None
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer in range(module.num_layers):
        outputs = []
        for d in range(D):
            k, suffix = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
            weight = lambda kind: getattr(module, kind + suffix, None)  # noqa: E731
            if module.zoneout or module.layer_norm:
                T, B = x.shape[:2]
                y, h, c = _layer_with_torch_cells(
                    CELL_IDS[module.mode], x.reshape(T * B, x.size(2)), [], d == 1, h0[k], c0[k] if lstm else None,
                    weight("weight_ih"), weight("weight_hh"), weight("bias_ih"), weight("bias_hh"), None,
                    w_peephole=weight("weight_peephole"), zoneout=module.zoneout,
                    layer_norm=module._layer_norms()[k] if module.layer_norm else None)
                y = y.view(T, B, H)
            else:
                y, h, c = _peephole_onnx_layer(x, weight, module.bias, H, h0[k], c0[k], d == 1)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if D == 1 else torch.cat(outputs, 2)
        if module.training and module.dropout > 0 and layer < module.num_layers - 1:
            x = torch.nn.functional.dropout(x, module.dropout, True)
    output = x.transpose(0, 1) if batched and module.batch_first else x
    h_last = torch.stack(h_n)
    c_last = torch.stack(c_n) if lstm else None
    if not batched:
        output, h_last = output.squeeze(1), h_last.squeeze(1)
        c_last = c_last.squeeze(1) if lstm else None
    return output, ((h_last, c_last) if lstm else h_last)


def _peephole_onnx_layer(x, weight, has_bias, H, h0, c0, reverse):
    """One peephole LSTM layer and direction as ONNX's LSTM operator: x [T, B, I] -> y [T, B, H], h, c."""
    w = _onnx_gates(weight("weight_ih"), H).unsqueeze(0)
    r = _onnx_gates(weight("weight_hh"), H).unsqueeze(0)
    if has_bias:
        bias = torch.cat([_onnx_gates(weight("bias_ih"), H), _onnx_gates(weight("bias_hh"), H)]).unsqueeze(0)
    else:
        bias = x.new_zeros(1, 8 * H)
    peephole = weight("weight_peephole")
    p = torch.cat([peephole[:H], peephole[2 * H:], peephole[H:2 * H]]).unsqueeze(0)  # (i, f, o) -> (i, o, f)
    y, h, c = _OnnxLSTM.apply(x, w, r, bias, h0.unsqueeze(0), c0.unsqueeze(0), p, H, reverse)
    return y.squeeze(1), h.squeeze(0), c.squeeze(0)


def peephole_lstm_cell(cell, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """A peephole fused_rnn.LSTMCell's step in standard ONNX operators (matrix products, activations)."""
    from .functional import _peephole_lstm_step

    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    if hx is None:
        zeros = x.new_zeros(x.size(0), cell.hidden_size)
        hx = (zeros, zeros)
    h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    h, c = _peephole_lstm_step(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, None,
                               cell.weight_peephole)
    return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
