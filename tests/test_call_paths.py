"""The two ways a call reaches the compiled op give the same bits, and each is taken where it must be.

Plain eager calls (functional.plain_call) go below the op's Python autograd kernel: the cells through
_FusedCellBase._plain_step, both cells and layers through functional._run_plain_layer, whose
backward is _EagerLayer's. Every other call (autocast, tracing, torch.func, __torch_function__)
takes torch.ops.fused_rnn.layer_forward with its registered backward. Here an inert
__torch_function__ mode sends a call the registered way, and the two are compared bitwise, outputs
and gradients. Then the cached-nothing promise: whatever happens to the weights between two calls
(an optimizer step, an in-place edit, load_state_dict, .to(), a parametrization) the next call sees
it, as torch.nn's does.
"""
import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fused_rnn
from fused_rnn import functional
from helpers import check_parity, make_pair, run

I, H, B, T = 5, 7, 3, 4


class _Inert(TorchFunctionMode):
    """Changes nothing but the path: under a __torch_function__ mode, calls are not plain."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def plain_calls(monkeypatch):
    """Counts the calls that took the plain path."""
    calls = []
    original = functional._run_plain_layer

    def counted(*args):
        calls.append(args[11])  # need_saved (then w_peephole)
        return original(*args)

    monkeypatch.setattr(functional, "_run_plain_layer", counted)
    return calls


def _inputs(kind, dtype):
    torch.manual_seed(3)
    if kind.endswith("Cell"):
        x = torch.randn(B, I, dtype=dtype)
        hx = torch.randn(B, H, dtype=dtype)
        return x, ((hx, torch.randn(B, H, dtype=dtype)) if kind == "LSTMCell" else hx)
    layers = 2 * (2 if kind != "RNN" else 1)
    hx = torch.randn(layers, B, H, dtype=dtype)
    return torch.randn(T, B, I, dtype=dtype), ((hx, torch.randn(layers, B, H, dtype=dtype)) if kind == "LSTM" else hx)


KINDS = ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU", "RNN"]


def _module(kind, dtype):
    torch.manual_seed(4)
    extra = {"num_layers": 2, "bidirectional": kind != "RNN"} if not kind.endswith("Cell") else {}
    return make_pair(kind, I, H, dtype=dtype, **extra)[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_hx", [True, False])
def test_plain_and_registered_paths_give_the_same_bits(kind, dtype, with_hx, plain_calls):
    module = _module(kind, dtype)
    twin = copy.deepcopy(module)
    x, hx = _inputs(kind, dtype)
    hx = hx if with_hx else None
    out_plain, grads_plain = run(module, x, hx)
    assert plain_calls and all(plain_calls), "a training call takes the plain path, recording its backward"
    taken = len(plain_calls)
    with _Inert():
        out_registered, grads_registered = run(twin, x, hx)
    assert len(plain_calls) == taken, "under a __torch_function__ mode, the registered path"
    for a, b in zip(out_plain + grads_plain, out_registered + grads_registered):
        assert torch.equal(a, b)
    with torch.no_grad():  # inference: below autograd, without saved values
        inferred = module(x, hx)
    assert len(plain_calls) > taken and not any(plain_calls[taken:])
    first = inferred[0] if isinstance(inferred, tuple) else inferred
    assert torch.equal(first, out_plain[0]) and not first.requires_grad


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_double_backward_through_the_plain_path(kind, plain_calls):
    module, ref = make_pair(kind, I, H)
    x, hx = _inputs(kind, torch.float64)
    x_f, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
    penalties = []
    for m, xi in ((module, x_f), (ref, x_r)):
        out = m(xi, hx)
        h = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(h.pow(2).sum(), xi, create_graph=True)
        g.pow(2).sum().backward()
        penalties.append([xi.grad] + [p.grad for p in m.parameters()])
    assert plain_calls
    for a, b in zip(*penalties):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_cell_under_autocast_casts_as_torch_nn_does(plain_calls):
    """Autocast is no plain call: the cell takes its full path, which casts as torch.nn and then
    runs the op with autocast off (plainly)."""
    module, ref = make_pair("GRUCell", I, H, dtype=torch.float32)
    x, hx = _inputs("GRUCell", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = module(x, hx), ref(x, hx)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def _mutations():
    def optimizer_step(m, _):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
        opt.step()

    def in_place(m, _):
        params = list(m.parameters())
        with torch.no_grad():
            params[1].mul_(-1.25)
            params[0].add_(0.25)

    def in_place_on_data(m, _):
        next(m.parameters()).data.mul_(0.75)

    def load_state_dict(m, other):
        m.load_state_dict(other.state_dict())

    def parameter_replaced(m, _):
        name, p = next(iter(m.named_parameters()))
        setattr(m, name, torch.nn.Parameter(p.detach() * 0.5))

    def converted_and_back(m, _):
        m.to(torch.float32).to(torch.float64)

    return [optimizer_step, in_place, in_place_on_data, load_state_dict, parameter_replaced, converted_and_back]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU"])
def test_every_weight_change_between_calls_is_seen(kind):
    """Each mutation applied to ours and torch.nn's alike between two calls: torch.nn's result."""
    torch.manual_seed(5)
    fused, ref = make_pair(kind, I, H)
    _, other = make_pair(kind, I, H)
    if kind.endswith("Cell"):
        x, hx = _inputs(kind, torch.float64)
    else:
        x, hx = torch.randn(T, B, I, dtype=torch.float64), None
    check_parity(fused, ref, x, hx)
    for mutate in _mutations():
        mutate(fused, other)
        mutate(ref, other)
        for m in (fused, ref):
            m.zero_grad()
        check_parity(fused, ref, x, hx)


def test_a_parametrized_cell_weight_is_followed():
    """torch.nn.utils.parametrize moves the weight out of _parameters: the plain path steps aside."""
    fused, ref = make_pair("LSTMCell", I, H)
    for m in (fused, ref):
        torch.nn.utils.parametrize.register_parametrization(m, "weight_hh", _Doubled())
    x, hx = _inputs("LSTMCell", torch.float64)
    check_parity(fused, ref, x, hx)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_plain_path_leaves_bad_input_to_the_full_checks():
    """A call the plain path cannot take whole is checked in torch.nn's order, with its errors."""
    cell = fused_rnn.LSTMCell(I, H)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        cell(torch.randn(B, I + 1))
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype(.|\n)*input dtype"):  # the op refuses it
        cell(torch.randn(B, I, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="hx\\[0\\] must have shape"):
        cell(torch.randn(B, I), (torch.randn(B + 1, H), torch.randn(B, H)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_layers_common_call_skips_the_full_checks_and_a_bad_one_does_not(kind, monkeypatch):
    module = _module(kind, torch.float64)
    x, hx = _inputs(kind, torch.float64)
    expected = module(x, hx)
    checked = []
    original = type(module)._checked_input

    def counted(self, *args):
        checked.append(args)
        return original(self, *args)

    monkeypatch.setattr(type(module), "_checked_input", counted)
    for state in (hx, None):
        module(x, state)
    assert not checked, "a well-formed call takes the plain path"
    assert all(torch.equal(a, b) for a, b in zip(_flat(module(x, hx)), _flat(expected)))
    bad = tuple(s[:, :1] for s in hx) if kind == "LSTM" else hx[:, :1]  # a batch of one for a batch of 3
    with pytest.raises(RuntimeError, match="Expected hidden|Expected h_0|size"):
        module(x, bad)
    assert checked, "a malformed one takes the full checks, which raise as torch.nn does"


def _flat(out):
    y, h = out
    return [y] + (list(h) if isinstance(h, tuple) else [h])
