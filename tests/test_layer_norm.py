"""Layer norm (fused_rnn.LSTM / GRU / RNN(layer_norm=True), issue #41) against the plain PyTorch loop
of tests/variant_reference.py: per step

    a_x = LN(x_t·W_ihᵀ) ⊙ ln_ih_weight      a_h = LN(h_{t-1}·W_hhᵀ) ⊙ ln_hh_weight

(each over its row's G·H entries, biased variance, eps 1e-5) before the biases, and for LSTM
ĥ_t = o ⊙ tanh(LN(ĉ_t) ⊙ ln_c_weight + ln_c_bias). CPU only so far: the CUDA path refuses it.
"""
import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn import testing
from helpers import (check_func_grad_and_export, check_in_onnxruntime, check_parity, check_seeded_masks_reproducible,
                     gradcheck_with_seeded_masks, runs_at_thread_counts)
from variant_reference import Reference

cpu_half = pytest.mark.skipif(testing.emulating_cuda(), reason="FUSED_RNN_EMULATE_CUDA=1 leaves no CPU half")
cuda_half = pytest.mark.skipif(not fused_rnn.built_with_cuda, reason="a CPU-only build has no CUDA path")
pytestmark = cpu_half  # the CUDA path refuses layer norm (test_the_cuda_path_refuses_it, in the CPU stage)

MODES = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN": fused_rnn.RNN}


def _module(mode, dtype=torch.float64, **kwargs):
    torch.manual_seed(1)
    module = MODES[mode](4, 6, dtype=dtype, layer_norm=True, **kwargs)
    with torch.no_grad():  # away from their initial 1 and 0, so that a mix-up of them shows
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.uniform_(0.5, 1.5) if "weight" in name else p.uniform_(-0.5, 0.5)
    return module


def _state(mode, layers, B, H, P, dtype):
    h = torch.randn(layers, B, P, dtype=dtype)
    return (h, torch.randn(layers, B, H, dtype=dtype)) if mode == "LSTM" else h


@pytest.mark.parametrize("mode,kwargs", [
    ("LSTM", dict()),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("LSTM", dict(proj_size=3, num_layers=2)),
    ("LSTM", dict(peephole=True, bidirectional=True)),
    ("LSTM", dict(bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(bias=False)),
    ("RNN", dict(num_layers=2, bidirectional=True)),
    ("RNN", dict(nonlinearity="relu")),
])
@pytest.mark.parametrize("training", [False, True])
def test_against_the_equations(mode, kwargs, training):
    """Outputs and every gradient (the ln weights' too) to 1e-10 in float64, with an initial state;
    in training the layer's dropout between layers is 0, so nothing random runs."""
    fused = _module(mode, **kwargs).train(training)
    layers = fused.num_layers * (2 if fused.bidirectional else 1)
    T, B, H = 5, 3, 6
    P = kwargs.get("proj_size") or H
    x = torch.randn((B, T, 4) if kwargs.get("batch_first") else (T, B, 4), dtype=torch.float64)
    check_parity(fused, Reference(fused), x, _state(mode, layers, B, H, P, torch.float64), tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", list(MODES))
def test_with_zoneout_and_recurrent_dropout_in_training(mode):
    """All three: per layer and direction zoneout's masks, then recurrent dropout's."""
    fused = _module(mode, num_layers=2, zoneout=0.3, recurrent_dropout=0.3).train()
    T, B, H = 4, 3, 6
    torch.manual_seed(5)
    drawn = []
    for _ in range(2):
        zone = (torch.rand((2 if mode == "LSTM" else 1) * T * B * H, dtype=torch.float64) < 0.3).double()
        recurrent = (torch.rand(B, H, dtype=torch.float64) < 0.7).double() / 0.7
        drawn.append((zone.view(-1, T, B, H), recurrent))
    ref = Reference(fused, lambda k: drawn[k][1], lambda k, t: (drawn[k][0][0, t], drawn[k][0][-1, t]))
    x = torch.randn(T, B, 4, dtype=torch.float64)
    torch.manual_seed(5)
    check_parity(fused, ref, x, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_float32(mode):
    fused = _module(mode, dtype=torch.float32, num_layers=2)
    ref = Reference(fused.double())
    fused.float()
    x = torch.randn(6, 4, 4)
    out_f = fused(x)[0]
    out_r = ref(x.double())[0]
    torch.testing.assert_close(out_f.double(), out_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_packed_input_matches_each_sequence_alone(mode):
    fused = _module(mode, bidirectional=True)
    lengths = [5, 3, 1]
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))
    y, state = fused(packed)
    h_n = state[0] if mode == "LSTM" else state
    y, _ = nn.utils.rnn.pad_packed_sequence(y)
    grads = torch.autograd.grad(y.square().sum() + h_n.sum(), list(fused.parameters()))
    want = [torch.zeros_like(g) for g in grads]
    for b, length in enumerate(lengths):
        y_b, state_b = fused(x[:length, b])
        h_b = state_b[0] if mode == "LSTM" else state_b
        torch.testing.assert_close(y[:length, b], y_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, b], h_b, rtol=1e-12, atol=1e-12)
        for w, g in zip(want, torch.autograd.grad(y_b.square().sum() + h_b.sum(), list(fused.parameters()))):
            w += g
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_same_bits_at_any_thread_count():
    torch.manual_seed(2)
    fused = fused_rnn.LSTM(4, 40, 2, layer_norm=True, peephole=True)
    results = runs_at_thread_counts(fused, torch.randn(7, 5, 4), (1, 2, 3))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    check_seeded_masks_reproducible(fused_rnn.GRU(4, 40, 2, layer_norm=True, zoneout=0.2).train(),
                                    torch.randn(7, 5, 4))


@pytest.mark.parametrize("mode,extra", [("LSTM", dict(peephole=True)), ("GRU", {}), ("RNN", {})])
def test_gradcheck_and_double_backward(mode, extra):
    fused = _module(mode, num_layers=2, zoneout=0.4, **extra).train()
    gradcheck_with_seeded_masks(fused, torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True))


def test_torch_func_export_and_compile():
    fused = _module("LSTM", num_layers=2).eval()
    check_func_grad_and_export(fused, torch.randn(5, 2, 4, dtype=torch.float64))
    fused.float()
    x = torch.randn(6, 2, 4)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x)[0], fused(x)[0], rtol=0, atol=0)


def test_parameters_and_arguments():
    torch.manual_seed(3)
    fused = fused_rnn.LSTM(3, 4, 2, bidirectional=True, peephole=True, layer_norm=True)
    torch.manual_seed(3)
    plain = nn.LSTM(3, 4, 2, bidirectional=True)
    names = list(fused.state_dict())
    assert names[:len(plain.state_dict())] == list(plain.state_dict())
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in plain.state_dict().items())
    extra = names[len(plain.state_dict()):]
    assert extra[:4] == ["weight_peephole_l0", "weight_peephole_l0_reverse", "weight_peephole_l1",
                         "weight_peephole_l1_reverse"]
    assert extra[4:8] == ["ln_ih_weight_l0", "ln_hh_weight_l0", "ln_c_weight_l0", "ln_c_bias_l0"]
    assert len(extra) == 4 + 4 * 4 and extra[-1] == "ln_c_bias_l1_reverse"
    assert fused.ln_ih_weight_l0.shape == (16,) and torch.equal(fused.ln_ih_weight_l0, torch.ones(16))
    assert torch.equal(fused.ln_c_bias_l1_reverse, torch.zeros(4)) and "layer_norm=True" in repr(fused)
    gru = fused_rnn.GRU(3, 4, layer_norm=True)
    assert [n for n, _ in gru.named_parameters()][-2:] == ["ln_ih_weight_l0", "ln_hh_weight_l0"]
    assert gru.ln_hh_weight_l0.shape == (12,)
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="layer_norm should be of type bool"):
            fused_rnn.RNN(3, 4, layer_norm=bad)
    with pytest.raises(NotImplementedError, match="layer norm is not defined for complex"):
        fused_rnn.GRU(3, 4, layer_norm=True, dtype=torch.complex128)(torch.randn(2, 1, 3, dtype=torch.complex128))
    with pytest.raises(ValueError, match="recurrent dropout or layer norm, which torch.nn's GRU"):
        fused_rnn.convert(nn.Sequential(gru), to="torch")
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a GRU with layer norm"):
        torch.jit.trace(gru, (torch.randn(2, 1, 3),))


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_runs_in_onnxruntime(dynamo):
    """Exported as the equations in standard operators (layer norm is not among ONNX's recurrent
    operators), for the traced length and any batch."""
    fused = _module("LSTM", dtype=torch.float32, num_layers=2, bidirectional=True).eval()
    check_in_onnxruntime(fused, torch.randn(5, 2, 4), torch.randn(5, 3, 4), dynamo)


@cuda_half
@pytest.mark.parametrize("mode", list(MODES))
def test_the_cuda_path_refuses_it(mode):
    pytest.importorskip("fused_rnn.testing")
    fused = _module(mode, dtype=torch.float32)
    with testing.emulate_cuda():
        with pytest.raises(NotImplementedError, match="layer norm runs on the CPU only so far"):
            fused(torch.randn(3, 2, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_and_unbatched_input(dtype):
    """A half-type layer (computed in float32 inside) against float32 on the half type's numbers; an
    unbatched sequence as a batch of one."""
    half = _module("LSTM", dtype=dtype, num_layers=2)
    reference = fused_rnn.LSTM(4, 6, 2, layer_norm=True)
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(5, 3, 4).to(dtype)
    leaves = torch.utils._pytree.tree_leaves
    for got, want in zip(leaves(half(x)), leaves(reference(x.float()))):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    fused = _module("GRU", num_layers=2)
    y, h = fused(x[:, 0].double())
    y_b, h_b = fused(x[:, :1].double())
    torch.testing.assert_close(y, y_b[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(h, h_b[:, 0], rtol=0, atol=0)
