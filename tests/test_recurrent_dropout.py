"""Recurrent dropout (fused_rnn.LSTM / GRU / RNN(recurrent_dropout=p), issue #41) against a plain
PyTorch loop of its equations, written out here independently of the library: in training the
recurrent product takes

    h'_{t-1} = h_{t-1} ⊙ m / (1 - p),    m ~ Bernoulli(1 - p) per sequence and unit,

drawn once per call for each layer and direction (the same mask at every step; each draws [B, P]
uniform numbers from torch's generator: kept = u < 1 - p), and nothing else sees it (GRU's mix keeps
h_{t-1}). In eval the layer is the plain one.
"""
import io

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import functional, testing
from helpers import (assert_close, check_func_grad_and_export, check_in_onnxruntime, check_parity,
                     check_probability_argument, check_seeded_masks_reproducible, gradcheck_with_seeded_masks, run)
from variant_reference import Reference

cpu_half = pytest.mark.skipif(testing.emulating_cuda(), reason="FUSED_RNN_EMULATE_CUDA=1 leaves no CPU half")
cuda_half = pytest.mark.skipif(not fused_rnn.built_with_cuda, reason="a CPU-only build has no CUDA path")

MODES = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN": fused_rnn.RNN}


def draw_mask(B, P, p, dtype):
    real = torch.empty(0, dtype=dtype).real.dtype
    return (torch.rand(B, P, dtype=real) < 1 - p).to(dtype) * (1 / (1 - p))


def _state(mode, layers, B, H, P, dtype):
    h = torch.randn(layers, B, P, dtype=dtype)
    return (h, torch.randn(layers, B, H, dtype=dtype)) if mode == "LSTM" else h


@pytest.mark.parametrize("mode,kwargs,dtype", [
    ("LSTM", dict(), torch.float64),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), torch.float64),
    ("LSTM", dict(proj_size=3, num_layers=2), torch.float64),
    ("LSTM", dict(peephole=True, bidirectional=True), torch.float64),
    ("GRU", dict(num_layers=2, bidirectional=True), torch.float64),
    ("RNN", dict(num_layers=2, bidirectional=True), torch.float64),
    ("RNN", dict(nonlinearity="relu"), torch.float64),
    pytest.param("LSTM", dict(bidirectional=True), torch.complex128, marks=cpu_half),
    pytest.param("GRU", dict(), torch.complex128, marks=cpu_half),
])
def test_training_uses_the_masks_torch_draws(mode, kwargs, dtype):
    """Outputs and every gradient against the loop above, float64 to 1e-10, with the masks the module
    draws (layer by layer, direction by direction, [B, P] each) and an initial state."""
    torch.manual_seed(1)
    fused = MODES[mode](4, 6, dtype=dtype, recurrent_dropout=0.4, **kwargs).train()
    layers = fused.num_layers * (2 if fused.bidirectional else 1)
    T, B, H = 5, 3, 6
    P = kwargs.get("proj_size") or H
    torch.manual_seed(7)
    masks = [draw_mask(B, P, 0.4, dtype) for _ in range(layers)]
    assert any((m == 0).any() for m in masks) and any((m != 0).any() for m in masks)
    ref = Reference(fused, lambda k: masks[k])
    shape = (B, T, 4) if kwargs.get("batch_first") else (T, B, 4)
    x = torch.randn(shape, dtype=dtype)
    hx = _state(mode, layers, B, H, P, dtype)
    torch.manual_seed(7)
    check_parity(fused, ref, x, hx, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", list(MODES))
def test_with_zoneout_both_masks_in_their_order(mode):
    """Zoneout and recurrent dropout together: per layer and direction zoneout's masks are drawn
    first ([2 or 1, N, H]), then recurrent dropout's [B, H]."""
    torch.manual_seed(2)
    fused = MODES[mode](4, 6, 2, dtype=torch.float64, zoneout=0.3, recurrent_dropout=0.3).train()
    T, B, H = 4, 3, 6
    drawn = []
    torch.manual_seed(5)
    for _ in range(2):
        zone = (torch.rand(2 if mode == "LSTM" else 1, T * B, H, dtype=torch.float64) < 0.3).double()
        drawn.append((zone.view(zone.size(0), T, B, H), draw_mask(B, H, 0.3, torch.float64)))
    ref = Reference(fused, lambda k: drawn[k][1], lambda k, t: (drawn[k][0][0, t], drawn[k][0][-1, t]))
    x = torch.randn(T, B, 4, dtype=torch.float64)
    torch.manual_seed(5)
    check_parity(fused, ref, x, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", list(MODES))
def test_eval_is_the_plain_layer_bit_for_bit(mode):
    torch.manual_seed(3)
    fused = MODES[mode](4, 6, 2, bidirectional=True, recurrent_dropout=0.5).eval()
    plain = MODES[mode](4, 6, 2, bidirectional=True)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(5, 3, 4)
    out_f, grad_f = run(fused, x)
    out_p, grad_p = run(plain, x)
    assert all(torch.equal(a, b) for a, b in zip(out_f + grad_f, out_p + grad_p))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_masks_of_ones_are_the_plain_layer_and_of_zeros_cut_the_recurrence(mode):
    """At the op: masks of ones give the plain layer's bits; masks of zeros leave the recurrent
    product nothing (W_hh's gradient is zero, and the layer is one whose W_hh is zero)."""
    torch.manual_seed(4)
    cell = functional.CELL_IDS[mode]
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    H, B, T = 20, 3, 6
    x = torch.randn(T * B, 5, dtype=torch.float64)
    w_ih, w_hh = torch.randn(G * H, 5, dtype=torch.float64) * 0.3, torch.randn(G * H, H, dtype=torch.float64) * 0.3
    b_ih, b_hh = torch.randn(G * H, dtype=torch.float64) * 0.1, torch.randn(G * H, dtype=torch.float64) * 0.1
    h0 = torch.randn(B, H, dtype=torch.float64)
    c0 = torch.randn(B, H, dtype=torch.float64) if mode == "LSTM" else None
    plain = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
    ones = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, 0.0, None,
                            torch.ones(B, H, dtype=torch.float64))
    for a, b in zip(plain, ones):
        assert (a is None and b is None) or a.numel() == 0 or torch.equal(a, b)
    w_hh = w_hh.requires_grad_()
    cut = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, 0.0, None,
                           torch.zeros(B, H, dtype=torch.float64))
    no_w_hh = functional.layer(cell, x, [], False, h0, c0, w_ih, torch.zeros_like(w_hh), b_ih, b_hh, None)
    for a, b in zip(cut, no_w_hh):
        if a is not None and a.numel():
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    (grad,) = torch.autograd.grad(cut[0].sum() + cut[1].sum(), w_hh)
    assert not grad.any()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_packed_rows_take_their_sequences_masks(mode, reverse):
    """A packed batch (step t's rows are sequences 0 .. batch_sizes[t] - 1) against each sequence
    alone with its own row of the masks: outputs, final state and the gradients of x and W_hh."""
    torch.manual_seed(6)
    cell = functional.CELL_IDS[mode]
    G = 4 if mode == "LSTM" else 3
    H, lengths = 7, [5, 3, 2]
    B, N = len(lengths), sum(lengths)
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths))]
    xs = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    x = torch.cat([xs[b][t:t + 1] for t in range(max(lengths)) for b in range(B) if lengths[b] > t])
    assert x.size(0) == N
    w_ih = (torch.randn(G * H, 3, dtype=torch.float64) * 0.4).requires_grad_()
    w_hh = (torch.randn(G * H, H, dtype=torch.float64) * 0.4).requires_grad_()
    h0 = torch.randn(B, H, dtype=torch.float64)
    c0 = torch.randn(B, H, dtype=torch.float64) if mode == "LSTM" else None
    masks = draw_mask(B, H, 0.5, torch.float64)
    y, h_n, _ = functional.layer(cell, x.requires_grad_(), batch_sizes, reverse, h0, c0, w_ih, w_hh, None, None, None,
                                 None, 0.0, None, masks)
    grads = torch.autograd.grad(y.square().sum() + h_n.sum(), (x, w_hh))
    row = 0
    rows_of = [[] for _ in range(B)]
    for t, n in enumerate(batch_sizes):
        for b in range(n):
            rows_of[b].append(row)
            row += 1
    want_dw_hh = torch.zeros_like(w_hh)
    for b in range(B):
        x_b = xs[b].clone().requires_grad_()
        y_b, h_b, _ = functional.layer(cell, x_b, [], reverse, h0[b:b + 1], c0[b:b + 1] if c0 is not None else None,
                                       w_ih, w_hh, None, None, None, None, 0.0, None, masks[b:b + 1])
        torch.testing.assert_close(y[rows_of[b]], y_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[b:b + 1], h_b, rtol=1e-12, atol=1e-12)
        dx_b, dw_b = torch.autograd.grad(y_b.square().sum() + h_b.sum(), (x_b, w_hh))
        torch.testing.assert_close(grads[0][rows_of[b]], dx_b, rtol=1e-12, atol=1e-12)
        want_dw_hh += dw_b
    torch.testing.assert_close(grads[1], want_dw_hh, rtol=1e-12, atol=1e-12)


def test_same_seed_same_bits_and_any_thread_count():
    torch.manual_seed(8)
    check_seeded_masks_reproducible(fused_rnn.GRU(4, 40, 2, recurrent_dropout=0.25).train(), torch.randn(7, 5, 4))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck_and_double_backward_with_seeded_masks(mode):
    gradcheck_with_seeded_masks(MODES[mode](2, 3, 2, dtype=torch.float64, recurrent_dropout=0.3).train(),
                                torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True))


def test_torch_func_and_compile():
    torch.manual_seed(9)
    fused = fused_rnn.LSTM(4, 6, 2, dtype=torch.float64, recurrent_dropout=0.2).eval()
    check_func_grad_and_export(fused, torch.randn(5, 2, 4, dtype=torch.float64))
    fused = fused.float()
    x = torch.randn(6, 2, 4)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x)[0], fused(x)[0], rtol=0, atol=0)
    fused.train()
    got = compiled(x)[0]  # compiled RNG draws its own masks: finite, and not eval's output
    assert got.shape == (6, 2, 6) and torch.isfinite(got).all() and not torch.equal(got, fused.eval()(x)[0])


def test_arguments_and_what_is_refused():
    check_probability_argument("recurrent_dropout", r"a unit of h_\{t-1\} being dropped")
    on = fused_rnn.LSTM(3, 4, proj_size=2, recurrent_dropout=0.1)
    assert "recurrent_dropout=0.1" in repr(on)
    assert list(on.state_dict()) == list(nn.LSTM(3, 4, proj_size=2).state_dict())
    with pytest.raises(ValueError, match="recurrent dropout or layer norm, which torch.nn's LSTM"):
        fused_rnn.convert(nn.Sequential(on), to="torch")
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a LSTM with recurrent dropout"):
        torch.jit.trace(on.train(), (torch.randn(2, 1, 3),))
    with pytest.raises(NotImplementedError, match="exports in eval mode"):
        torch.onnx.export(on.train(), (torch.randn(2, 1, 3),), io.BytesIO(), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)
    with pytest.raises(RuntimeError, match=r"recurrent_masks must have shape \[2, 4\]"):
        functional.layer(0, torch.randn(4, 3), [], False, torch.zeros(2, 4), torch.zeros(2, 4), torch.randn(16, 3),
                         torch.randn(16, 4), None, None, None, None, 0.0, None, torch.ones(3, 4))


@cpu_half
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_in_eval_is_the_plain_layers(dynamo):
    """In eval recurrent dropout is the identity: the layer exports as torch.nn's (ONNX's LSTM)."""
    torch.manual_seed(10)
    fused = fused_rnn.LSTM(3, 4, 2, bidirectional=True, recurrent_dropout=0.25).eval()
    check_in_onnxruntime(fused, torch.randn(5, 2, 3), torch.randn(5, 3, 3), dynamo)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_against_float32(dtype):
    """A half-type layer (computed in float32 inside) draws the same masks (its uniform numbers in
    float32) as a float32 one whose weights and input are the half type's numbers: the same outputs
    to the half type's precision. With zoneout too."""
    torch.manual_seed(11)
    half = fused_rnn.LSTM(8, 16, 2, recurrent_dropout=0.3, zoneout=0.2, dtype=dtype).train()
    reference = fused_rnn.LSTM(8, 16, 2, recurrent_dropout=0.3, zoneout=0.2).train()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(6, 3, 8).to(dtype)
    torch.manual_seed(12)
    want = reference(x.float())
    torch.manual_seed(12)
    got = half(x)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)


@cuda_half
@cpu_half
@pytest.mark.parametrize("persistent,unfused_backward", [("0", 0), ("0", 1), ("1", 0)])
@pytest.mark.parametrize("mode,extra", [("LSTM", dict(peephole=True, zoneout=0.2)),
                                        ("LSTM", dict(proj_size=8, zoneout=0.2)), ("GRU", dict(zoneout=0.2)),
                                        ("RNN", dict())])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_cuda_path_matches_the_cpu(persistent, unfused_backward, mode, extra, dtype, exact_float32):
    """The CUDA kernels under the emulation (per-step or persistent, fused or unfused backward; a
    projection takes the per-step loop and the unfused backward), in training (the same seed draws
    the same masks on the CPU) and in eval, against the CPU half."""
    fused = MODES[mode](5, 24, 2, bidirectional=True, dtype=dtype, recurrent_dropout=0.3, **extra)
    lengths = torch.tensor([6, 4, 3])
    x = torch.randn(6, 3, 5, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for training in (True, False):
        fused.train(training)
        for packed in (False, True):
            inputs = nn.utils.rnn.pack_padded_sequence(x, lengths) if packed else x
            torch.manual_seed(8)
            out_cpu, grads_cpu = run(fused, inputs) if not packed else _run_packed(fused, inputs)
            fused.zero_grad()
            with fused_rnn.overrides_set(cuda_persistent=persistent, cuda_unfused_backward=unfused_backward):
                with testing.emulate_cuda() as gpu:
                    torch.manual_seed(8)
                    out_gpu, grads_gpu = run(fused, inputs) if not packed else _run_packed(fused, inputs)
                    assert gpu.launches > 0
            fused.zero_grad()
            assert_close(out_gpu, out_cpu, tol, tol, "outputs")
            assert_close(grads_gpu, grads_cpu, tol, tol, "gradients")


def _run_packed(module, packed):
    """Outputs and parameter gradients of a packed call (a loss of every output)."""
    y, state = module(packed)
    outputs = [y.data] + list(state if isinstance(state, tuple) else (state,))
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outputs)
    loss.backward()
    return outputs, [p.grad.clone() for p in module.parameters()]
