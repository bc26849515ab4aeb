"""Double backward (create_graph=True): gradgradcheck in float64 and a gradient penalty against torch.nn.

The registered backward recomputes the layer with torch's own cell ops when a differentiable
gradient is asked for (see functional._layer_backward), so these tests check that path: packed
layout, reverse direction, projection, stacking and the cells.
"""
import pytest
import torch
from torch.autograd import gradgradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from helpers import assert_close, leaves, make_pair

LAYER_CONFIGS = [
    ("LSTM", dict(proj_size=2, bidirectional=True, num_layers=2)),
    ("LSTM", dict(bias=False, batch_first=True)),
    ("GRU", dict(bidirectional=True, num_layers=2)),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=2)),
]


def _function_of(module, packed_lengths=None):
    """(x, *hidden, *parameters) -> every output tensor, for gradgradcheck."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, *rest):
        hidden, params = rest[:len(rest) - len(names)], rest[len(rest) - len(names):]
        hx = hidden if len(hidden) == 2 else hidden[0]
        if packed_lengths is not None:
            x = pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
        return tuple(leaves(torch.func.functional_call(module, dict(zip(names, params)), (x, hx))))

    return f


def _inputs(module, x_shape, batch):
    torch.manual_seed(1)
    directions = 2 if getattr(module, "bidirectional", False) else 1
    layers = getattr(module, "num_layers", 1) * directions
    out = getattr(module, "proj_size", 0) or module.hidden_size
    shape = (layers, batch) if hasattr(module, "num_layers") else (batch,)
    hidden = [torch.randn(*shape, out, dtype=torch.float64)]
    if "LSTM" in type(module).__name__:
        hidden.append(torch.randn(*shape, module.hidden_size, dtype=torch.float64))
    params = [p.detach().clone() for p in module.parameters()]
    tensors = [torch.randn(x_shape, dtype=torch.float64)] + hidden + params
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("kind,kwargs", LAYER_CONFIGS)
def test_gradgradcheck_layers(kind, kwargs):
    torch.manual_seed(0)
    module = getattr(fused_rnn, kind)(2, 3, dtype=torch.float64, **kwargs)
    x_shape = (2, 3, 2) if module.batch_first else (3, 2, 2)
    # fast_mode checks random projections of the Jacobians: the full ones take ~30 s for the stacks.
    assert gradgradcheck(_function_of(module), _inputs(module, x_shape, 2), fast_mode=True)


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(proj_size=2, bidirectional=True)),
                                         ("GRU", dict(bidirectional=True)),
                                         ("RNN", dict(nonlinearity="relu", bidirectional=True))])
def test_gradgradcheck_packed(kind, kwargs):
    torch.manual_seed(0)
    module = getattr(fused_rnn, kind)(2, 3, dtype=torch.float64, **kwargs)
    f = _function_of(module, packed_lengths=torch.tensor([2, 3, 1]))
    assert gradgradcheck(f, _inputs(module, (3, 3, 2), 3))


@pytest.mark.parametrize("kind,kwargs", [("LSTMCell", {}), ("GRUCell", {}),
                                         ("RNNCell", dict(nonlinearity="tanh")),
                                         ("RNNCell", dict(nonlinearity="relu", bias=False))])
def test_gradgradcheck_cells(kind, kwargs):
    torch.manual_seed(0)
    cell = getattr(fused_rnn, kind)(2, 3, dtype=torch.float64, **kwargs)
    assert gradgradcheck(_function_of(cell), _inputs(cell, (2, 2), 2))


def _gradient_penalty_grads(module, x):
    """Gradients of a gradient penalty: d/dθ of |d(sum of outputs)/dθ|² + |d/dx|²."""
    x = x.detach().clone().requires_grad_()
    params = list(module.parameters())
    outputs = leaves(module(x))
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, [x] + params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return leaves(torch.autograd.grad(penalty, [x] + params))


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True)),
                                         ("GRU", dict(num_layers=2)), ("RNN", dict(bidirectional=True)),
                                         ("LSTMCell", {}), ("GRUCell", {})])
def test_gradient_penalty_matches_torch(kind, kwargs):
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 4, 3, **kwargs)
    x = torch.randn((3, 4) if "Cell" in kind else (5, 3, 4), dtype=torch.float64)
    assert_close(_gradient_penalty_grads(fused, x), _gradient_penalty_grads(ref, x), 1e-10, 1e-10,
                 "gradient penalty gradients")
