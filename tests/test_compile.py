"""torch.compile over fused layers: the op registrations (opcheck), one whole model compiled with
fullgraph=True (no graph breaks) forward and backward against eager and torch.nn, and packed input.

Each compile costs tens of seconds on a small machine, so the models are few and small.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from fused_rnn.functional import CELL_IDS
from helpers import assert_close, leaves


def _op_args(cell, proj, bias, dtype, reverse):
    """Arguments of layer_forward for a small packed sequence (batch_sizes 3, 2, 2, 1)."""
    gates = {"LSTM": 4, "GRU": 3}.get(cell, 1)
    input_size, hidden, batch_sizes = 3, 4, [3, 2, 2, 1]
    out = 2 if proj else hidden

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=dtype == torch.float64)

    return (CELL_IDS[cell], rand(sum(batch_sizes), input_size), batch_sizes, reverse, rand(3, out),
            rand(3, hidden) if cell == "LSTM" else None, rand(gates * hidden, input_size),
            rand(gates * hidden, out), rand(gates * hidden) if bias else None,
            rand(gates * hidden) if bias else None, rand(out, hidden) if proj else None, True)


@pytest.mark.parametrize("cell,proj,bias,reverse", [("LSTM", True, True, True), ("LSTM", False, False, False),
                                                    ("GRU", False, True, True), ("RNN_RELU", False, False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck_layer_forward(cell, proj, bias, reverse, dtype):
    """Schema, fake (shapes and dtypes) and autograd registration agree with the compiled op."""
    torch.manual_seed(0)
    args = _op_args(cell, proj, bias, dtype, reverse)
    torch.library.opcheck(torch.ops.fused_rnn.layer_forward.default, args)


@pytest.mark.parametrize("cell,proj,bias,need_input_grad", [("LSTM", True, False, False), ("GRU", False, True, True),
                                                            ("RNN_TANH", False, True, False)])
def test_opcheck_layer_backward(cell, proj, bias, need_input_grad):
    torch.manual_seed(0)
    args = _op_args(cell, proj, bias, torch.float64, False)
    cell_id, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _ = args
    y, h_n, c_n, saved = torch.ops.fused_rnn.layer_forward(*args)
    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n) if cell == "LSTM" else None)
    backward_args = (cell_id, x.detach(), batch_sizes, reverse, h0.detach(), None if c0 is None else c0.detach(),
                     w_ih.detach(), w_hh.detach(), None if w_hr is None else w_hr.detach(), bias, y.detach(),
                     saved.detach(), *grads, need_input_grad)
    torch.library.opcheck(torch.ops.fused_rnn.layer_backward.default, backward_args)


class _EveryKind(nn.Module):
    """All six modules in one model, so one compile covers them."""

    def __init__(self, lib):
        super().__init__()
        self.lstm = lib.LSTM(5, 4, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = lib.GRU(6, 4)
        self.rnn = lib.RNN(4, 3, nonlinearity="relu", bidirectional=True)
        self.lstm_cell = lib.LSTMCell(6, 3)
        self.gru_cell = lib.GRUCell(3, 3)
        self.rnn_cell = lib.RNNCell(3, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, h_gru = self.gru(y.transpose(0, 1))
        y, h_rnn = self.rnn(y)
        h_cell, c_cell = self.lstm_cell(y[-1])
        h_cell = self.gru_cell(h_cell, c_cell)
        return self.rnn_cell(h_cell), h.sum() + c.sum() + h_gru.sum() + h_rnn.sum()


def test_compile_fullgraph_matches_eager_and_torch():
    torch.manual_seed(0)
    ref = _EveryKind(nn)
    model = _EveryKind(fused_rnn)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5)

    def run(module):
        module.zero_grad()
        outputs = leaves(module(x))
        sum(((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs)).backward()
        return [o.detach() for o in outputs], [p.grad.clone() for p in module.parameters()]

    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    out_c, grad_c = run(compiled)
    out_e, grad_e = run(model)
    out_r, grad_r = run(ref)
    for what, actual, expected in (("eager", out_c + grad_c, out_e + grad_e), ("torch.nn", out_c + grad_c, out_r + grad_r)):
        assert_close(actual, expected, 1e-5, 1e-5, f"compiled vs {what}")


def test_compile_packed_sequence_matches_eager():
    """PackedSequence compiles too, with graph breaks where its batch_sizes are read as numbers."""
    torch.manual_seed(0)
    model = fused_rnn.LSTM(3, 4, bidirectional=True, proj_size=2)
    compiled = torch.compile(model, backend="aot_eager")
    for lengths in [(4, 2, 2), (3, 1)]:
        packed = pack_sequence([torch.randn(n, 3) for n in lengths])
        assert_close(leaves(compiled(packed)), leaves(model(packed)), 1e-6, 1e-6, f"lengths {lengths}")
