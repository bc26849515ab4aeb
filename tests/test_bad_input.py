"""Bad input gets a Python exception that names what is wrong; never a crash or a wrong answer."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fused_rnn

D = torch.float64


def lstm(**kw):
    return fused_rnn.LSTM(4, 3, dtype=D, **kw)


X = torch.randn(5, 2, 4, dtype=D)


@pytest.mark.parametrize("make,args,exc,match", [
    (lstm, (torch.randn(5, 2, 6, dtype=D),), RuntimeError, "input_size. Expected 4, got 6"),
    (lstm, (torch.randn(5, 2, 4, 1, dtype=D),), ValueError, "Expected input to be 2D or 3D, got 4D"),
    (lstm, (torch.randn(4, dtype=D),), ValueError, "Expected input to be 2D or 3D, got 1D"),
    (lstm, (X, (torch.zeros(1, 3, 3, dtype=D), torch.zeros(1, 2, 3, dtype=D))), RuntimeError,
     r"Expected hidden\[0\] size \(1, 2, 3\), got \[1, 3, 3\]"),
    (lstm, (X, (torch.zeros(1, 2, 3, dtype=D), torch.zeros(2, 2, 3, dtype=D))), RuntimeError,
     r"Expected hidden\[1\] size \(1, 2, 3\), got \[2, 2, 3\]"),
    (lstm, (X, torch.zeros(1, 2, 3, dtype=D)), TypeError, r"hx must be a tuple \(h_0, c_0\)"),
    (lstm, (X, (torch.zeros(1, 2, 3, dtype=D),)), TypeError, r"hx must be a tuple \(h_0, c_0\)"),
    (lstm, (X, (torch.zeros(1, 2, 3, dtype=D), None)), TypeError, "c_0 must be a Tensor, got NoneType"),
    (lstm, (X, (torch.zeros(2, 3, dtype=D), torch.zeros(2, 3, dtype=D))), RuntimeError,
     "batched 3-D input, h_0 should be 3-D"),
    (lstm, (X.float(),), ValueError, r"input dtype \(torch.float32\) does not match weight dtype"),
    (lstm, (X, (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=D))), ValueError,
     "h_0 has dtype torch.float32 but the input has dtype torch.float64"),
    (lstm, (torch.ones(5, 2, 4, dtype=torch.int64),), ValueError, "does not match weight dtype"),
    (lambda: fused_rnn.LSTM(4, 3, dtype=torch.float32), (torch.ones(5, 2, 4, dtype=torch.bool),),
     ValueError, "does not match weight dtype"),
    (lstm, ([1.0, 2.0],), TypeError, "input must be a Tensor or a PackedSequence, got list"),
    (lambda: fused_rnn.GRU(4, 3, dtype=D), (X, (torch.zeros(1, 2, 3, dtype=D),)), TypeError,
     "hx must be a Tensor, got tuple"),
    (lambda: fused_rnn.RNN(4, 3, num_layers=2, dtype=D), (X, torch.zeros(1, 2, 3, dtype=D)), RuntimeError,
     r"Expected hidden size \(2, 2, 3\), got \[1, 2, 3\]"),
    (lambda: fused_rnn.LSTMCell(4, 3, dtype=D), (torch.randn(2, 5, dtype=D),), RuntimeError,
     "Expected 4, got 5"),
    (lambda: fused_rnn.LSTMCell(4, 3, dtype=D), (torch.randn(2, 4, dtype=D), torch.zeros(2, 3, dtype=D)),
     TypeError, r"hx must be a tuple \(h, c\)"),
    (lambda: fused_rnn.GRUCell(4, 3, dtype=D), (torch.randn(2, 4, dtype=D), torch.zeros(3, 3, dtype=D)),
     RuntimeError, r"hx must have shape \(2, 3\), got \(3, 3\)"),
    (lambda: fused_rnn.RNNCell(4, 3, dtype=D), (torch.randn(2, 4, dtype=D), torch.zeros(3, dtype=D)),
     ValueError, "hx must be 2-D like the input, got 1-D"),
    (lambda: fused_rnn.RNNCell(4, 3, dtype=D), (torch.randn(2, 2, 4, dtype=D),), ValueError,
     "Expected input to be 1D or 2D, got 3D"),
])
def test_forward_rejects(make, args, exc, match):
    with pytest.raises(exc, match=match):
        make()(*args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(proj_size=3), ValueError, "proj_size has to be smaller than hidden_size"),
    (dict(proj_size=-1), ValueError, "proj_size should be a positive integer"),
    (dict(dropout=1.5), ValueError, "dropout should be a number in range"),
    (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
])
def test_constructor_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fused_rnn.LSTM(4, 3, **kwargs)


def test_constructor_rejects_other_cells():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        fused_rnn.RNN(4, 3, nonlinearity="gelu")
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        fused_rnn.RNNCell(4, 3, nonlinearity="gelu")
    with pytest.raises(TypeError):
        fused_rnn.GRU(4, 3, proj_size=2)
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        fused_rnn.GRU(4, 0)


def test_bad_packed_sequence():
    m = fused_rnn.GRU(4, 3, dtype=D)
    data = torch.randn(6, 4, dtype=D)
    bad = PackedSequence(data, torch.tensor([2, 3, 1]), None, None)  # increasing
    with pytest.raises(ValueError, match="batch_sizes must be positive and non-increasing"):
        m(bad)
    short = PackedSequence(data, torch.tensor([3, 2]), None, None)  # sums to 5, data has 6 rows
    with pytest.raises(ValueError, match="batch_sizes sum to 5 but its data has 6 rows"):
        m(short)


def test_compiled_op_checks_shapes():
    """The ops check their arguments themselves, for callers that bypass the modules."""
    x = torch.randn(4, 3, dtype=D)
    w_ih, w_hh = torch.randn(16, 3, dtype=D), torch.randn(16, 4, dtype=D)
    h0, c0 = torch.zeros(2, 4, dtype=D), torch.zeros(2, 4, dtype=D)
    op = torch.ops.fused_rnn.layer_forward
    with pytest.raises(RuntimeError, match="batch_sizes sum to 5"):
        op(0, x, [3, 2], False, h0, c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="non-increasing"):
        op(0, x, [1, 3], False, h0, c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[16, 4\]"):
        op(0, x, [2, 2], False, h0, c0, w_ih, w_hh[:, :3], None, None, None, False)
    with pytest.raises(RuntimeError, match="LSTM needs the initial cell state c0"):
        op(0, x, [2, 2], False, h0, None, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="h0 has dtype Float"):
        op(0, x, [2, 2], False, h0.float(), c0, w_ih, w_hh, None, None, None, False)
