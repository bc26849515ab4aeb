"""Every dtype torch.nn's recurrent layers support on the CPU."""
import pytest
import torch

from fused_rnn import testing

from helpers import check_parity, make_pair, run

KINDS = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
         ("RNN", {"nonlinearity": "relu"}), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]


def _x(kind, dtype):
    return torch.randn((3, 5) if "Cell" in kind else (6, 3, 5), dtype=dtype)


def _layers(kind):
    return {} if "Cell" in kind else {"num_layers": 2, "bidirectional": True}


@pytest.mark.parametrize("kind,extra", [k for k in KINDS if k[1].get("nonlinearity") != "relu"])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.cpu_only
def test_complex_parity(kind, extra, dtype):
    torch.manual_seed(1)
    # Complex sigmoid and tanh have poles, near which stacked complex64 layers amplify rounding:
    # with 2 bidirectional layers torch.nn's own gradients are up to 5e-5 from the complex128
    # answer. So complex64 runs one layer; complex128 checks the stacks to 1e-10.
    layers = _layers(kind) if dtype == torch.complex128 else {}
    fused, ref = make_pair(kind, 5, 4, dtype=dtype, **layers, **extra)
    check_parity(fused, ref, _x(kind, dtype))


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_against_float32(kind, extra, dtype):
    """Parameters and outputs in the low dtype; within 1e-2 relative of a float32 reference: element
    by element on the CPU, which computes in float32 and rounds the results only. The CUDA path
    multiplies the half operands themselves (as cuDNN does: h_{t-1} on the tensor cores, the gate
    gradients for dX and dW), so there an element that sums terms of both signs carries their
    roundings: compared in norm, within 12 of the type's unit roundoff u (2^-9 for bfloat16, 2^-11
    for float16; measured under the emulation up to 5.7·u, float16's errors 8 to 10 times smaller
    than bfloat16's: the type's roundings, not a slip)."""
    torch.manual_seed(2)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, **_layers(kind), **extra)
    fused = fused.to(dtype)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in fused.state_dict().items()})
    x = _x(kind, dtype)
    out_f, grad_f = run(fused, x, None)
    out_r, grad_r = run(ref, x.float(), None)
    for a, e in zip(out_f + grad_f, out_r + grad_r):
        assert a.dtype == dtype
        if testing.emulating_cuda():
            unit_roundoff = 2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -11
            error = ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-12)).item()
            assert error < 12 * unit_roundoff, error / unit_roundoff
            continue
        scale = max(1.0, e.abs().max().item())  # relative to the tensor's scale, as in helpers
        torch.testing.assert_close(a.float(), e, rtol=1e-2, atol=1e-2 * scale)


def test_relu_rejects_complex_like_torch():
    fused, _ = make_pair("RNN", 5, 4, nonlinearity="relu", dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="relu"):
        fused(_x("RNN", torch.complex64))
