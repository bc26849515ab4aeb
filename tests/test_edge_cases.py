"""Edge shapes and unusual inputs, against torch.nn with the same state_dict (outputs and gradients).

Edge shapes: batch 0 (whatever torch.nn does, we do: the same shapes, or the same kind of error),
sequence length 1, hidden size 1, input size 1, T = 10,000 on the CPU; NaN and Inf propagating as in
torch.nn. Unusual inputs: transposed, expanded and strided input and hx, parameters that are views,
tied parameters, parameters changed in place between calls, requires_grad on only some parameters;
the output changed in place before backward (an error).
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fused_rnn
from helpers import TOLERANCE, check_parity, leaves, make_pair, run

D = torch.float64
TOL = TOLERANCE[D]

LAYER_KINDS = [("LSTM", {}), ("LSTM", {"proj_size": 1}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
               ("RNN", {"nonlinearity": "relu"})]
CELL_KINDS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "tanh"}),
              ("RNNCell", {"nonlinearity": "relu"})]
ALL_KINDS = LAYER_KINDS + CELL_KINDS


def kind_id(kind_extra):
    kind, extra = kind_extra
    return kind + "".join(f"-{k}={v}" for k, v in extra.items())


def is_cell(kind):
    return kind.endswith("Cell")


def hidden(kind, layers, batch, hid, proj=0, batched=True, fill=None):
    """A random hx of the right kind: cells [B, H]; layers [L*D, B, P] (and c [L*D, B, H])."""
    lead = () if is_cell(kind) else (layers,)
    mid = (batch,) if batched else ()
    h = torch.randn(lead + mid + (proj or hid,), dtype=D)
    if kind.startswith("LSTM"):
        return h, torch.randn(lead + mid + (hid,), dtype=D)
    return h


def compare(actual, expected, what, equal_nan=False):
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} tensors"
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None or a is None:
            assert a is None and e is None, f"{what}[{k}]: gradient {'missing' if a is None else 'unexpected'}"
            continue
        assert a.shape == e.shape, f"{what}[{k}]: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        finite = e[torch.isfinite(e)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=TOL[0], atol=TOL[1] * scale, equal_nan=equal_nan,
                                   msg=lambda m: f"{what}[{k}]: {m}")


def check_like_torch(fused, ref, x, hx=None):
    """torch.nn's outcome, whatever it is: the same outputs and gradients, or the same kind of error."""
    try:
        out_r, grad_r = run(ref, x, hx)
    except Exception as exc:  # noqa: BLE001 - the kind is what we compare
        with pytest.raises(type(exc)):
            run(fused, x, hx)
        return "error"
    out_f, grad_f = run(fused, x, hx)
    compare(out_f, out_r, "outputs")
    compare(grad_f, grad_r, "gradients")
    return "ok"


# ---------------------------------------------------------------------------------------------------
# Edge shapes
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind_extra", LAYER_KINDS, ids=kind_id)
@pytest.mark.parametrize("layers,bidirectional,batch_first,with_hx",
                         [(1, False, False, False), (2, True, False, True), (2, False, True, True)])
def test_batch_0_layers(kind_extra, layers, bidirectional, batch_first, with_hx):
    kind, extra = kind_extra
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 3, 2, num_layers=layers, bidirectional=bidirectional,
                           batch_first=batch_first, **extra)
    x = torch.randn((0, 4, 3) if batch_first else (4, 0, 3), dtype=D)
    hx = hidden(kind, layers * (2 if bidirectional else 1), 0, 2, extra.get("proj_size", 0)) if with_hx else None
    check_like_torch(fused, ref, x, hx)
    out_f = fused(x, hx) if hx is not None else fused(x)
    out_r = ref(x, hx) if hx is not None else ref(x)
    assert [t.shape for t in leaves(out_f)] == [t.shape for t in leaves(out_r)]


@pytest.mark.parametrize("kind_extra", CELL_KINDS, ids=kind_id)
@pytest.mark.parametrize("with_hx", [False, True])
def test_batch_0_cells(kind_extra, with_hx):
    kind, extra = kind_extra
    fused, ref = make_pair(kind, 3, 2, **extra)
    check_like_torch(fused, ref, torch.randn(0, 3, dtype=D), hidden(kind, 1, 0, 2) if with_hx else None)


@pytest.mark.parametrize("kind_extra", LAYER_KINDS, ids=kind_id)
def test_sequence_length_1(kind_extra):
    kind, extra = kind_extra
    torch.manual_seed(1)
    fused, ref = make_pair(kind, 3, 4, num_layers=2, bidirectional=True, **extra)
    check_parity(fused, ref, torch.randn(1, 3, 3, dtype=D))
    check_parity(fused, ref, torch.randn(1, 3, dtype=D))  # unbatched
    check_parity(fused, ref, torch.randn(1, 3, 3, dtype=D), hidden(kind, 4, 3, 4, extra.get("proj_size", 0)))
    check_parity(fused, ref, pack_sequence([torch.randn(1, 3, dtype=D) for _ in range(3)]))


@pytest.mark.parametrize("kind_extra", ALL_KINDS, ids=kind_id)
@pytest.mark.parametrize("input_size,hidden_size", [(1, 1), (1, 5), (5, 1)])
def test_size_1(kind_extra, input_size, hidden_size):
    kind, extra = kind_extra
    if extra.get("proj_size") and hidden_size == 1:
        extra = {}  # proj_size must be below hidden_size; hidden 1 leaves no projection
    torch.manual_seed(2)
    if is_cell(kind):
        fused, ref = make_pair(kind, input_size, hidden_size, **extra)
        check_parity(fused, ref, torch.randn(3, input_size, dtype=D), hidden(kind, 1, 3, hidden_size))
        check_parity(fused, ref, torch.randn(input_size, dtype=D))
    else:
        fused, ref = make_pair(kind, input_size, hidden_size, num_layers=2, bidirectional=True, **extra)
        check_parity(fused, ref, torch.randn(4, 1, input_size, dtype=D))
        check_parity(fused, ref, torch.randn(4, 3, input_size, dtype=D),
                     hidden(kind, 4, 3, hidden_size, extra.get("proj_size", 0)))


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"})])
def test_very_long_sequence(kind, extra):
    """T = 10,000 steps on the CPU, small H: outputs, final states and every gradient."""
    torch.manual_seed(3)
    fused, ref = make_pair(kind, 1, 2, **extra)
    x = torch.randn(10_000, 2, 1, dtype=D)
    check_parity(fused, ref, x, hidden(kind, 1, 2, 2))


def test_long_packed_bidirectional_sequence():
    """Packed, both directions, lengths far apart. (2,000 rather than 10,000 steps: torch.nn's own
    packed backward on the CPU takes about 90 s at 10,000; ours well under a second.)"""
    torch.manual_seed(4)
    fused, ref = make_pair("GRU", 1, 2, bidirectional=True)
    seqs = [torch.randn(n, 1, dtype=D) for n in (2_000, 1_500, 1)]
    check_parity(fused, ref, pack_sequence(seqs, enforce_sorted=False))


# ---------------------------------------------------------------------------------------------------
# NaN and Inf: propagate exactly as in torch.nn
# ---------------------------------------------------------------------------------------------------

def _nonfinite_cases():
    cases = []
    for kind_extra in ALL_KINDS:
        for fill in ("nan", "inf", "-inf"):
            for where in ("input", "hx"):
                cases.append(pytest.param(kind_extra, fill, where,
                                          id=f"{kind_id(kind_extra)}-{fill}-{where}"))
    return cases


@pytest.mark.parametrize("kind_extra,fill,where", _nonfinite_cases())
def test_nan_and_inf_propagate_like_torch(kind_extra, fill, where):
    kind, extra = kind_extra
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 2, 3, **extra)
    cell = is_cell(kind)
    x = torch.randn(2, 2, dtype=D) if cell else torch.randn(4, 2, 2, dtype=D)
    hx = hidden(kind, 1, 2, 3, extra.get("proj_size", 0))
    if where == "input":
        x.view(-1)[3] = float(fill)
    else:
        (hx[0] if isinstance(hx, tuple) else hx).view(-1)[1] = float(fill)
    out_f, grad_f = run(fused, x, hx)
    out_r, grad_r = run(ref, x, hx)
    if fill == "nan":  # NaN always reaches the outputs; Inf may saturate a gate and vanish
        assert any(torch.isnan(o).any() for o in out_r), "the case should reach the outputs"
    compare(out_f, out_r, "outputs", equal_nan=True)
    compare(grad_f, grad_r, "gradients", equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# Non-contiguous and unusual inputs
# ---------------------------------------------------------------------------------------------------

def _views_parity(fused, ref, make_inputs):
    """make_inputs(leaves) -> (x, hx) built from views of the leaves; compares outputs and the
    gradients reaching the leaves and the parameters."""
    def go(module, seed_leaves):
        bases = [b.detach().clone().requires_grad_() for b in seed_leaves]
        x, hx = make_inputs(bases)
        out = module(x) if hx is None else module(x, hx)
        outputs = leaves(out)
        gen = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=D)).sum() for o in outputs)
        loss.backward()
        return [o.detach() for o in outputs], [b.grad for b in bases] + [p.grad for p in module.parameters()]
    return go


def _check_views(fused, ref, bases, make_inputs):
    go = _views_parity(fused, ref, make_inputs)
    out_f, grad_f = go(fused, bases)
    out_r, grad_r = go(ref, bases)
    compare(out_f, out_r, "outputs")
    compare(grad_f, grad_r, "gradients")


@pytest.mark.parametrize("kind_extra", LAYER_KINDS, ids=kind_id)
def test_non_contiguous_inputs_layers(kind_extra):
    kind, extra = kind_extra
    lstm = kind == "LSTM"
    torch.manual_seed(5)
    fused, ref = make_pair(kind, 3, 4, num_layers=2, bidirectional=True, **extra)
    P = extra.get("proj_size") or 4
    T, B = 5, 3

    def states(h, c=None):
        return (h, c) if lstm else h

    layouts = {
        # input [B, T, I] transposed to [T, B, I]; hx [B, L, P] transposed to [L, B, P]
        "transposed": ([torch.randn(B, T, 3, dtype=D), torch.randn(B, 4, P, dtype=D), torch.randn(B, 4, 4, dtype=D)],
                       lambda b: (b[0].transpose(0, 1), states(b[1].transpose(0, 1), b[2].transpose(0, 1)))),
        # one sequence and one state broadcast over the batch (stride 0)
        "expanded": ([torch.randn(T, 1, 3, dtype=D), torch.randn(4, 1, P, dtype=D), torch.randn(4, 1, 4, dtype=D)],
                     lambda b: (b[0].expand(T, B, 3), states(b[1].expand(4, B, P), b[2].expand(4, B, 4)))),
        # every other feature / step of a larger tensor
        "strided": ([torch.randn(2 * T, B, 6, dtype=D), torch.randn(4, B, 2 * P, dtype=D),
                     torch.randn(4, B, 8, dtype=D)],
                    lambda b: (b[0][::2, :, ::2], states(b[1][..., ::2], b[2][..., 1::2]))),
    }
    for name, (bases, make_inputs) in layouts.items():
        _check_views(fused, ref, bases, make_inputs)


def test_non_contiguous_batch_first_and_packed():
    torch.manual_seed(6)
    fused, ref = make_pair("LSTM", 3, 4, batch_first=True, bidirectional=True)
    # batch_first module given a [T, B, I] tensor transposed to [B, T, I]
    _check_views(fused, ref, [torch.randn(5, 2, 3, dtype=D)], lambda b: (b[0].transpose(0, 1), None))
    # packed data that is a strided view
    fused, ref = make_pair("GRU", 3, 4, bidirectional=True)
    _check_views(fused, ref, [torch.randn(6, 6, dtype=D)],
                 lambda b: (PackedSequence(b[0][:, ::2], torch.tensor([3, 2, 1])), None))


@pytest.mark.parametrize("kind_extra", CELL_KINDS, ids=kind_id)
def test_non_contiguous_inputs_cells(kind_extra):
    kind, extra = kind_extra
    torch.manual_seed(7)
    fused, ref = make_pair(kind, 3, 4, **extra)
    lstm = kind == "LSTMCell"
    bases = [torch.randn(3, 2, dtype=D), torch.randn(1, 4, dtype=D), torch.randn(4, 2, dtype=D)]
    _check_views(fused, ref, bases,
                 lambda b: (b[0].t(), (b[1].expand(2, 4), b[2].t()) if lstm else b[1].expand(2, 4)))


@pytest.mark.parametrize("kind_extra", LAYER_KINDS, ids=kind_id)
def test_parameters_that_are_views(kind_extra):
    """Non-contiguous Parameters, and weights that are plain views of another (leaf) tensor."""
    kind, extra = kind_extra
    torch.manual_seed(8)
    fused, ref = make_pair(kind, 3, 4, num_layers=2, **extra)
    big = torch.randn(2 * fused.weight_hh_l0.numel() + 7, dtype=D)
    rows, cols = fused.weight_ih_l1.shape
    wide = torch.randn(rows, 2 * cols, dtype=D)
    bases = {}

    shape_hh = fused.weight_hh_l0.shape
    for m in (fused, ref):
        m.weight_ih_l1 = nn.Parameter(wide.clone()[:, ::2])  # every other column: not contiguous
        base = big.clone().requires_grad_()
        del m.weight_hh_l0
        m.weight_hh_l0 = base[7:7 + 2 * shape_hh.numel():2].view(shape_hh)
        bases[m] = base
    assert not fused.weight_ih_l1.is_contiguous()
    x = torch.randn(5, 2, 3, dtype=D)
    out_f, grad_f = run(fused, x, None)
    out_r, grad_r = run(ref, x, None)
    compare(out_f, out_r, "outputs")
    compare(grad_f + [bases[fused].grad], grad_r + [bases[ref].grad], "gradients")
    assert bases[fused].grad is not None and bases[fused].grad.abs().sum() > 0


@pytest.mark.parametrize("kind_extra", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})],
                         ids=kind_id)
def test_tied_parameters(kind_extra):
    """Two layers and both directions sharing weights: the gradient is the sum over the uses."""
    kind, extra = kind_extra
    torch.manual_seed(9)
    fused, ref = make_pair(kind, 4, 4, num_layers=2, bidirectional=False, **extra)
    for m in (fused, ref):
        m.weight_hh_l1 = m.weight_hh_l0          # same Parameter in two layers
        m.weight_ih_l1 = m.weight_ih_l0          # input size 4 == hidden size 4
        m.bias_hh_l1 = m.bias_ih_l0              # a bias shared across roles
    assert len(list(fused.parameters())) == len(list(ref.parameters())) == 5
    check_parity(fused, ref, torch.randn(5, 2, 4, dtype=D))

    fused, ref = make_pair(kind, 4, 4, bidirectional=True, **extra)
    for m in (fused, ref):
        m.weight_hh_l0_reverse = m.weight_hh_l0  # both directions, one recurrent weight
    check_parity(fused, ref, torch.randn(5, 2, 4, dtype=D))


@pytest.mark.parametrize("kind_extra", CELL_KINDS, ids=kind_id)
def test_tied_cell_parameters(kind_extra):
    kind, extra = kind_extra
    torch.manual_seed(10)
    fused, ref = make_pair(kind, 4, 4, **extra)
    for m in (fused, ref):
        m.weight_hh = m.weight_ih
        m.bias_hh = m.bias_ih
    check_parity(fused, ref, torch.randn(3, 4, dtype=D))


@pytest.mark.parametrize("kind_extra", ALL_KINDS, ids=kind_id)
def test_parameters_changed_in_place_between_calls(kind_extra):
    kind, extra = kind_extra
    torch.manual_seed(11)
    cell = is_cell(kind)
    fused, ref = make_pair(kind, 3, 4, **extra) if cell else make_pair(kind, 3, 4, num_layers=2, **extra)
    x = torch.randn(3, 3, dtype=D) if cell else torch.randn(5, 3, 3, dtype=D)
    first = [o.clone() for o in leaves(fused(x))]
    new_ih = torch.randn_like(fused.weight_ih if cell else fused.weight_ih_l0)
    for m in (fused, ref):
        with torch.no_grad():
            w_hh = m.weight_hh if cell else m.weight_hh_l1
            w_hh.mul_(-1.5)                                  # in place, same storage
            (m.bias_ih if cell else m.bias_ih_l0).add_(0.25)
            (m.weight_ih if cell else m.weight_ih_l0).copy_(new_ih)
    check_parity(fused, ref, x)
    second = leaves(fused(x))
    assert any(not torch.allclose(a, b) for a, b in zip(first, second)), "results did not follow the weights"
    # .data swapped for a new tensor, then load_state_dict: both followed too
    for m in (fused, ref):
        (m.weight_hh if cell else m.weight_hh_l0).data = torch.full_like(fused.weight_hh if cell
                                                                         else fused.weight_hh_l0, 0.1)
    check_parity(fused, ref, x)
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    fused.load_state_dict(state)
    ref.load_state_dict(state)
    check_parity(fused, ref, x)


def test_functional_call_uses_the_given_parameters():
    torch.manual_seed(12)
    fused, ref = make_pair("LSTM", 3, 4, num_layers=2, proj_size=2)
    params = {k: torch.randn_like(v) for k, v in ref.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=D)
    out_f = torch.func.functional_call(fused, params, (x,))
    out_r = torch.func.functional_call(ref, params, (x,))
    compare(leaves(out_f), leaves(out_r), "outputs")
    compare(leaves(fused(x)), leaves(ref(x)), "outputs after the call")  # the module's own are back


def _frozen_cases():
    return [
        ("LSTM", {"num_layers": 2, "proj_size": 2}, ["weight_ih_l0", "bias_hh_l1", "weight_hr_l0"], True),
        ("GRU", {"num_layers": 2, "bidirectional": True}, ["weight_hh_l0", "bias_ih_l0_reverse"], False),
        ("RNN", {"nonlinearity": "relu"}, ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0"], False),
        ("RNN", {}, ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"], True),  # only the input
        ("LSTMCell", {}, ["weight_hh", "bias_ih"], False),
        ("GRUCell", {}, ["weight_ih"], True),
        ("RNNCell", {}, ["weight_ih", "weight_hh", "bias_ih", "bias_hh"], False),  # only hx
    ]


@pytest.mark.parametrize("kind,extra,frozen,input_grad", _frozen_cases(),
                         ids=[f"{c[0]}-{len(c[2])}frozen" for c in _frozen_cases()])
def test_requires_grad_on_some_parameters(kind, extra, frozen, input_grad):
    """Gradients present or None exactly as in torch.nn, and equal where present."""
    torch.manual_seed(13)
    fused, ref = make_pair(kind, 3, 4, **extra)
    for m in (fused, ref):
        for name in frozen:
            getattr(m, name).requires_grad_(False)
    cell = is_cell(kind)
    x0 = torch.randn(3, 3, dtype=D) if cell else torch.randn(5, 3, 3, dtype=D)
    h0 = torch.randn(3, 4, dtype=D) if cell else None

    def go(module):
        x = x0.clone().requires_grad_(input_grad)
        h = h0.clone().requires_grad_() if h0 is not None and kind != "LSTMCell" else None
        out = module(x, h) if h is not None else module(x)
        outs = leaves(out)
        gen = torch.Generator().manual_seed(0)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=D)).sum() for o in outs)
        if loss.requires_grad:
            loss.backward()
        return [o.detach() for o in outs], [x.grad, h.grad if h is not None else None] + [
            p.grad for _, p in sorted(module.named_parameters())], loss.requires_grad

    out_f, grad_f, req_f = go(fused)
    out_r, grad_r, req_r = go(ref)
    assert req_f == req_r
    compare(out_f, out_r, "outputs")
    assert [g is None for g in grad_f] == [g is None for g in grad_r]
    compare(grad_f, grad_r, "gradients")


@pytest.mark.parametrize("kind_extra", ALL_KINDS, ids=kind_id)
def test_nothing_requires_grad(kind_extra):
    kind, extra = kind_extra
    fused, ref = make_pair(kind, 3, 4, **extra)
    for m in (fused, ref):
        m.requires_grad_(False)
    x = torch.randn(3, 3, dtype=D) if is_cell(kind) else torch.randn(5, 3, 3, dtype=D)
    out_f, out_r = leaves(fused(x)), leaves(ref(x))
    assert [o.requires_grad for o in out_f] == [o.requires_grad for o in out_r] == [False] * len(out_r)
    compare(out_f, out_r, "outputs")
    with torch.no_grad():  # and under no_grad with parameters that do require it
        fused.requires_grad_(True)
        assert not any(o.requires_grad for o in leaves(fused(x)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_output_changed_in_place_before_backward_is_refused(kind):
    """Backward reads h_{t-1} from the layer's output (as cuDNN's backward does), so changing the
    output in place before backward is autograd's error, never a wrong gradient."""
    module = getattr(fused_rnn, kind)(3, 4, dtype=torch.float64)
    y, _ = module(torch.randn(5, 2, 3, dtype=torch.float64))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
