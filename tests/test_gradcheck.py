"""torch.autograd.gradcheck of the compiled backward, float64 and complex128."""
import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=2, batch_first=True)),
    ("LSTM", dict(bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bias=False)),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=2)),
]


def _module(kind, dtype, **kwargs):
    torch.manual_seed(0)
    return getattr(fused_rnn, kind)(3, 4, dtype=dtype, **kwargs)


def _functional(module, packed_lengths=None):
    """A function of (input, *hidden, *parameters) for gradcheck."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, *rest):
        n_hidden = len(rest) - len(names)
        hidden, params = rest[:n_hidden], rest[n_hidden:]
        hx = None if not hidden else (hidden if len(hidden) == 2 else hidden[0])
        if packed_lengths is not None:
            x = pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
        out = torch.func.functional_call(module, dict(zip(names, params)), (x, hx))
        data = out[0].data if packed_lengths is not None else out[0]
        states = out[1] if isinstance(out[1], tuple) else (out[1],)
        return (data,) + states

    return f, list(module.parameters())


def _hidden(module, batch, dtype):
    d = 2 if module.bidirectional else 1
    out = module.proj_size or module.hidden_size
    h0 = torch.randn(module.num_layers * d, batch, out, dtype=dtype, requires_grad=True)
    if module.mode != "LSTM":
        return [h0]
    return [h0, torch.randn(module.num_layers * d, batch, module.hidden_size, dtype=dtype, requires_grad=True)]


@pytest.mark.parametrize("kind,kwargs", CONFIGS)
def test_gradcheck_float64(kind, kwargs):
    module = _module(kind, torch.float64, **kwargs)
    f, params = _functional(module)
    shape = (2, 4, 3) if module.batch_first else (4, 2, 3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in params]
    assert gradcheck(f, (x, *_hidden(module, 2, torch.float64), *params))


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(bidirectional=True, proj_size=2)),
                                         ("GRU", dict(num_layers=2)), ("RNN", dict(bidirectional=True))])
def test_gradcheck_packed(kind, kwargs):
    module = _module(kind, torch.float64, **kwargs)
    f, params = _functional(module, packed_lengths=torch.tensor([2, 4, 1]))
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in params]
    assert gradcheck(f, (x, *_hidden(module, 3, torch.float64), *params))


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(bidirectional=True)), ("LSTM", dict(proj_size=2)),
                                         ("GRU", {}), ("RNN", {})])
@pytest.mark.cpu_only
def test_gradcheck_complex128(kind, kwargs):
    module = _module(kind, torch.complex128, **kwargs)
    f, params = _functional(module)
    x = torch.randn(3, 2, 3, dtype=torch.complex128, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in params]
    assert gradcheck(f, (x, *_hidden(module, 2, torch.complex128), *params))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.complex128, marks=pytest.mark.cpu_only)])
def test_gradcheck_cells(kind, dtype):
    torch.manual_seed(0)
    cell = getattr(fused_rnn, kind)(3, 4, dtype=dtype)
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    h = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    c = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def f(x, h, c, *ps):
        hx = (h, c) if kind == "LSTMCell" else h
        out = torch.func.functional_call(cell, dict(zip(names, ps)), (x, hx))
        return out if isinstance(out, tuple) else (out, c * 1)

    assert gradcheck(f, (x, h, c, *params))
