"""Zoneout (fused_rnn.LSTM / GRU / RNN(zoneout=z), issue #41) against a plain PyTorch loop of its
equations, written out here independently of the library: the cell's own ĉ_t and ĥ_t, then

    c_t = m_c ⊙ c_{t-1} + (1 - m_c) ⊙ ĉ_t        h_t = m_h ⊙ h_{t-1} + (1 - m_h) ⊙ ĥ_t

with m ~ Bernoulli(z) fresh at every step, row and unit in training (each layer and direction draws
N·H + N·P uniform numbers for LSTM, c's then h's, or N·H, from torch's generator: m = u < z),
and m = z in eval.
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

# Under FUSED_RNN_EMULATE_CUDA=1 (a stage of .ci/run) every module call takes the emulated CUDA path.
cpu_half = pytest.mark.skipif(testing.emulating_cuda(), reason="FUSED_RNN_EMULATE_CUDA=1 leaves no CPU half")
cuda_half = pytest.mark.skipif(not fused_rnn.built_with_cuda, reason="a CPU-only build has no CUDA path")

MODES = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN": fused_rnn.RNN}


def _module(mode, z, **kwargs):
    torch.manual_seed(1)
    return MODES[mode](4, 6, dtype=torch.float64, zoneout=z, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
def test_eval_is_the_expectation(mode, kwargs):
    fused = _module(mode, 0.3, **kwargs).eval()
    ref = Reference(fused, keeps=lambda k, t: (0.3, 0.3))
    x = torch.randn((3, 5, 4) if kwargs.get("batch_first") else (5, 3, 4), dtype=torch.float64)
    check_parity(fused, ref, x, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", list(MODES))
def test_training_uses_the_masks_torch_draws(mode):
    """In training the masks are drawn from torch's generator (u < z), layer by layer and direction by direction
    (N·H of c's then N·H of h's for LSTM; N·H else): the reference draws the same ones."""
    fused = _module(mode, 0.4, num_layers=2, bidirectional=True).train()
    T, B, H = 5, 3, 6
    torch.manual_seed(7)  # the module's order of draws: layer 0 forward, reverse, layer 1 ...
    drawn = [(torch.rand(2 if mode == "LSTM" else 1, T * B, H, dtype=torch.float64) < 0.4).double().view(-1, T, B, H)
             for _ in range(4)]
    ref = Reference(fused, keeps=lambda k, t: (drawn[k][0, t], drawn[k][-1, t]))
    x = torch.randn(T, B, 4, dtype=torch.float64)
    hx = torch.randn(4, B, H, dtype=torch.float64)
    hx = (hx, torch.randn(4, B, H, dtype=torch.float64)) if mode == "LSTM" else hx
    torch.manual_seed(7)
    check_parity(fused, ref, x, hx, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("training", [True, False])
def test_with_a_projection_the_projected_output_is_mixed(training):
    """LSTM with proj_size: c_t mixes as without one, h_t = m_h h_{t-1} + (1 - m_h) ĥ_t with ĥ_t the
    projected output (masks [N·H] of c_t, then [N·P] of h_t); in eval z for both."""
    fused = _module("LSTM", 0.35, num_layers=2, proj_size=4).train(training)
    T, B, H, P = 5, 3, 6, 4
    torch.manual_seed(7)
    drawn = []
    for _ in range(2):
        masks = (torch.rand(T * B * (H + P), dtype=torch.float64) < 0.35).double()
        drawn.append((masks[:T * B * H].view(T, B, H), masks[T * B * H:].view(T, B, P)))
    keeps = (lambda k, t: (drawn[k][0][t], drawn[k][1][t])) if training else (lambda k, t: (0.35, 0.35))
    ref = Reference(fused, keeps=keeps)
    x = torch.randn(T, B, 4, dtype=torch.float64)
    hx = (torch.randn(2, B, P, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64))
    torch.manual_seed(7)
    check_parity(fused, ref, x, hx, tol=(1e-10, 1e-10))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_masks_of_zeros_are_the_plain_layer_and_of_ones_keep_the_state(mode):
    """At the op: masks of zeros give the plain layer's bits; masks of ones keep h_0 (and c_0)."""
    torch.manual_seed(2)
    cell = functional.CELL_IDS[mode]
    G = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    H, B, T = 20, 3, 6
    x = torch.randn(T * B, 5)
    w_ih, w_hh = torch.randn(G * H, 5) * 0.3, torch.randn(G * H, H) * 0.3
    b_ih, b_hh = torch.randn(G * H) * 0.1, torch.randn(G * H) * 0.1
    h0 = torch.randn(B, H)
    c0 = torch.randn(B, H) if mode == "LSTM" else None
    count = 2 if mode == "LSTM" else 1
    plain = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None)
    zeros = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, 0.5,
                             torch.zeros(count * T * B * H))
    for a, b in zip(plain, zeros):
        assert (a is None and b is None) or a.numel() == 0 or torch.equal(a, b)
    y, h_n, c_n = functional.layer(cell, x, [], False, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, 0.5,
                                   torch.ones(count * T * B * H))
    assert torch.equal(h_n, h0) and torch.equal(y.view(T, B, H)[-1], h0)
    if mode == "LSTM":
        assert torch.equal(c_n, c0)


def test_same_seed_same_bits_and_any_thread_count():
    check_seeded_masks_reproducible(_module("LSTM", 0.25, num_layers=2).float().train(), torch.randn(7, 4, 4))


@pytest.mark.parametrize("mode,extra", [("LSTM", {}), ("LSTM", dict(proj_size=2)), ("GRU", {})])
def test_gradcheck_and_double_backward_with_seeded_masks(mode, extra):
    gradcheck_with_seeded_masks(MODES[mode](2, 3, 2, dtype=torch.float64, zoneout=0.5, **extra).train(),
                                torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True))


def test_packed_input_matches_each_sequence_alone_in_eval():
    fused = _module("GRU", 0.2, bidirectional=True).eval()
    lengths = [5, 3, 1]
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))
    y, h_n = fused(packed)
    y, _ = nn.utils.rnn.pad_packed_sequence(y)
    for b, length in enumerate(lengths):
        y_b, h_b = fused(x[:length, b])
        torch.testing.assert_close(y[:length, b], y_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, b], h_b, rtol=1e-12, atol=1e-12)


def test_compile_matches_eager_in_eval_and_training():
    fused = _module("LSTM", 0.3).float()
    x = torch.randn(6, 2, 4)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    fused.eval()
    torch.testing.assert_close(compiled(x)[0], fused(x)[0], rtol=0, atol=0)
    fused.train()
    torch.manual_seed(6)
    want = fused(x)[0]
    torch.manual_seed(6)
    got = compiled(x)[0]
    assert got.shape == want.shape and torch.isfinite(got).all()  # compiled RNG draws its own masks


def test_arguments_and_what_is_refused():
    check_probability_argument("zoneout", "a unit keeping its previous state")
    on = fused_rnn.RNN(3, 4, zoneout=0.1)
    assert "zoneout=0.1" in repr(on) and list(on.state_dict()) == list(nn.RNN(3, 4).state_dict())
    with pytest.raises(ValueError, match="peephole connections, zoneout, recurrent dropout or layer norm"):
        fused_rnn.convert(nn.Sequential(on), to="torch")
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a RNN with zoneout"):
        torch.jit.trace(on.eval(), (torch.randn(2, 1, 3),))
    with pytest.raises(NotImplementedError, match="exports in eval mode"):  # torch's exporter's default is eval
        torch.onnx.export(on.train(), (torch.randn(2, 1, 3),), io.BytesIO(), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)


@cuda_half
@cpu_half
@pytest.mark.parametrize("persistent,unfused_backward", [("0", 0), ("0", 1), ("1", 0)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_cuda_path_matches_the_cpu(persistent, unfused_backward, mode, dtype, exact_float32):
    """The CUDA kernels under the emulation (per-step or persistent, fused or unfused backward), in
    training (the same seed draws the same masks on the CPU) and in eval, against the CPU half."""
    extra = dict(peephole=True) if mode == "LSTM" else {}  # and the peepholes with it
    fused = MODES[mode](5, 24, 2, bidirectional=True, dtype=dtype, zoneout=0.3, **extra)
    x = torch.randn(6, 3, 5, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for training in (True, False):
        fused.train(training)
        torch.manual_seed(8)
        out_cpu, grads_cpu = run(fused, x)
        fused.zero_grad()
        with fused_rnn.overrides_set(cuda_persistent=persistent, cuda_unfused_backward=unfused_backward):
            with testing.emulate_cuda() as gpu:
                torch.manual_seed(8)
                out_gpu, grads_gpu = run(fused, x)
                assert gpu.launches > 0
        fused.zero_grad()
        assert_close(out_gpu, out_cpu, tol, tol, "outputs")
        assert_close(grads_gpu, grads_cpu, tol, tol, "gradients")


def test_torch_func_and_export_in_eval():
    fused = _module("GRU", 0.2, num_layers=2).eval()
    check_func_grad_and_export(fused, torch.randn(5, 2, 4, dtype=torch.float64))


@cpu_half
@pytest.mark.parametrize("mode,dynamo", [("LSTM", False), ("GRU", False), ("RNN", False), ("LSTM", True)])
def test_onnx_export_in_eval_runs_in_onnxruntime(mode, dynamo):
    """Zoneout exports in eval mode (its expectation) as the equations in standard operators, for the
    traced length and any batch; an LSTM with peepholes too."""
    torch.manual_seed(9)
    extra = dict(peephole=True) if mode == "LSTM" else {}
    fused = MODES[mode](3, 4, 2, bidirectional=True, zoneout=0.25, **extra).eval()
    check_in_onnxruntime(fused, torch.randn(5, 2, 3), torch.randn(5, 3, 3), dynamo)  # another batch, the same length
