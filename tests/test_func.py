"""torch.func's transforms and forward-mode AD give torch.nn's numbers, never silent zeros.

Every transform (jacrev, jacfwd, jvp, vjp, grad, hessian, vmap, torch.autograd.forward_ad) runs on
the fused module and is checked in float64, to 1e-8, against torch.nn with the same state_dict,
differentiated by torch.autograd.functional (reverse mode over torch.nn's own backward, which
needs no torch.func support from torch.nn) or, for vmap, by a loop of torch.nn calls (torch.nn
has no batching rule for its recurrent ops). Configurations: all six modules, with a projection,
two layers, both directions and packed input.
"""
import warnings

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from helpers import make_pair

D = torch.float64
TOL = dict(rtol=1e-8, atol=1e-8)
T, B, I, H = 4, 3, 3, 3
LENGTHS = [4, 2, 3]  # unsorted: packing sorts them, unpacking restores the order
PACKING = pack_padded_sequence(torch.zeros(T, B, I), torch.tensor(LENGTHS), enforce_sorted=False)[1:]

CONFIGS = [  # (kind, constructor arguments, packed input)
    ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True), False),
    ("LSTM", dict(bidirectional=True), True),
    ("GRU", dict(num_layers=2, bidirectional=True), False),
    ("GRU", dict(), True),
    ("RNN", dict(nonlinearity="relu", bidirectional=True), True),
    ("RNN", dict(num_layers=2), False),
    ("LSTMCell", dict(), False),
    ("GRUCell", dict(), False),
    ("RNNCell", dict(nonlinearity="tanh"), False),
]
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'plain'}{'-packed' if packed else ''}"
       for kind, kw, packed in CONFIGS]


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    # vmap runs the compiled op once per element through torch's fallback, which warns about speed.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def _setup(kind, kwargs, packed):
    """The fused module, its torch.nn twin, and (x, *states): the differentiable inputs."""
    torch.manual_seed(0)
    fused, ref = make_pair(kind, I, H, **kwargs)
    if kind.endswith("Cell"):
        x = torch.randn(B, I, dtype=D)
        states = [torch.randn(B, H, dtype=D) for _ in range(2 if kind == "LSTMCell" else 1)]
        return fused, ref, (x, *states)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    out = kwargs.get("proj_size") or H
    x = torch.randn(T, B, I, dtype=D)
    if packed:  # differentiate with respect to the packed rows: torch's packing has no forward AD nor vmap rule
        x = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False).data
    states = [torch.randn(layers, B, out, dtype=D)]
    if kind == "LSTM":
        states.append(torch.randn(layers, B, H, dtype=D))
    return fused, ref, (x, *states)


def _as_function(module, kind, packed):
    """(x, *states) -> one tensor of every output (output, h_n, c_n; or the cell's state)."""
    def f(x, *states):
        hx = tuple(states) if len(states) == 2 else states[0]
        if kind.endswith("Cell"):
            out = module(x, hx)
            return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
        if packed:
            x = PackedSequence(x, *PACKING)
        out, hidden = module(x, hx)
        if packed:
            out = out.data  # pad_packed_sequence has no torch.func support of its own
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return torch.cat([out.reshape(-1)] + [h.reshape(-1) for h in hidden])
    return f


def _cases():
    return pytest.mark.parametrize("kind,kwargs,packed", CONFIGS, ids=IDS)


def _close(actual, expected):
    actual, expected = torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert e.abs().max() > 0, "a reference derivative of zero proves nothing"
        torch.testing.assert_close(a, e, **TOL)


@_cases()
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians(kind, kwargs, packed, transform):
    fused, ref, inputs = _setup(kind, kwargs, packed)
    argnums = tuple(range(len(inputs)))
    got = getattr(torch.func, transform)(_as_function(fused, kind, packed), argnums=argnums)(*inputs)
    want = torch.autograd.functional.jacobian(_as_function(ref, kind, packed), inputs)
    _close(got, want)


@_cases()
def test_jvp_and_forward_ad(kind, kwargs, packed):
    fused, ref, inputs = _setup(kind, kwargs, packed)
    tangents = tuple(torch.randn_like(t) for t in inputs)
    f = _as_function(fused, kind, packed)
    out, got = torch.func.jvp(f, inputs, tangents)
    ref_out, want = torch.autograd.functional.jvp(_as_function(ref, kind, packed), inputs, tangents)
    _close((out, got), (ref_out, want))
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(inputs, tangents)]
        tangent = torch.autograd.forward_ad.unpack_dual(f(*duals)).tangent
    _close(tangent, want)


@_cases()
def test_vjp(kind, kwargs, packed):
    fused, ref, inputs = _setup(kind, kwargs, packed)
    out, pullback = torch.func.vjp(_as_function(fused, kind, packed), *inputs)
    cotangent = torch.randn_like(out)
    want = torch.autograd.functional.vjp(_as_function(ref, kind, packed), inputs, cotangent)
    _close((out, pullback(cotangent)), want)


@_cases()
def test_grad_over_parameters(kind, kwargs, packed):
    """torch.func.grad of a loss over the parameters through functional_call, and grad_and_value."""
    fused, ref, inputs = _setup(kind, kwargs, packed)
    params = {name: p.detach() for name, p in fused.named_parameters()}

    def loss(p, module):
        return _as_function(lambda *a: functional_call(module, p, a), kind, packed)(*inputs).sin().sum()

    got, value = torch.func.grad_and_value(loss)(params, fused)
    ref_params = dict(ref.named_parameters())
    ref_value = loss(ref_params, ref)
    want = torch.autograd.grad(ref_value, list(ref_params.values()))
    _close((value, [got[name] for name in ref_params]), (ref_value, want))


@_cases()
def test_hessian(kind, kwargs, packed):
    """jacfwd over jacrev: forward mode through our differentiable backward."""
    fused, ref, inputs = _setup(kind, kwargs, packed)

    def scalar(module):
        return lambda x: _as_function(module, kind, packed)(x, *inputs[1:]).sin().sum()

    got = torch.func.hessian(scalar(fused))(inputs[0])
    want = torch.autograd.functional.hessian(scalar(ref), inputs[0])
    _close(got, want)


@_cases()
def test_vmap_matches_a_loop_of_torch_nn(kind, kwargs, packed):
    fused, ref, inputs = _setup(kind, kwargs, packed)
    batch = [tuple(torch.randn_like(t) for t in inputs) for _ in range(3)]
    stacked = [torch.stack(parts) for parts in zip(*batch)]
    got = torch.vmap(_as_function(fused, kind, packed))(*stacked)
    want = torch.stack([_as_function(ref, kind, packed)(*one) for one in batch])
    _close(got, want)


@_cases()
def test_per_sample_gradients(kind, kwargs, packed):
    """vmap over grad, the per-sample-gradient recipe: each sample's parameter gradient as torch.nn's."""
    fused, ref, inputs = _setup(kind, kwargs, packed)
    params = {name: p.detach() for name, p in fused.named_parameters()}
    samples = [tuple(torch.randn_like(t) for t in inputs) for _ in range(2)]

    def loss(p, module, *sample):
        return _as_function(lambda *a: functional_call(module, p, a), kind, packed)(*sample).square().sum()

    got = torch.vmap(torch.func.grad(loss), in_dims=(None, None) + (0,) * len(inputs))(
        params, fused, *[torch.stack(parts) for parts in zip(*samples)])
    ref_params = dict(ref.named_parameters())
    for k, sample in enumerate(samples):
        want = torch.autograd.grad(loss(ref_params, ref, *sample), list(ref_params.values()))
        _close([got[name][k] for name in ref_params], want)

