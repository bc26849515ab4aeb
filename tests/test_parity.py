"""Parity with torch.nn (same state_dict): outputs, final states and every gradient."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import PAIRS, check_parity, make_pair

T, B, I, H = 5, 3, 4, 6

GRID = list(itertools.product(
    [1, 2],            # num_layers
    [True, False],     # bias
    [False, True],     # batch_first
    [False, True],     # bidirectional
))


def _hidden(kind, layers, directions, batch, hidden, proj, dtype, batched=True):
    out = proj or hidden
    shape_h = (layers * directions, batch, out) if batched else (layers * directions, out)
    shape_c = (layers * directions, batch, hidden) if batched else (layers * directions, hidden)
    h0 = torch.randn(shape_h, dtype=dtype)
    return (h0, torch.randn(shape_c, dtype=dtype)) if kind == "LSTM" else h0


def _input(batch_first, dtype, batch=B, steps=T):
    return torch.randn((batch, steps, I) if batch_first else (steps, batch, I), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional", GRID)
@pytest.mark.parametrize("with_hx", [False, True])
def test_lstm_grid(layers, bias, batch_first, bidirectional, proj_size, dtype, with_hx):
    torch.manual_seed(layers * 7 + proj_size)
    fused, ref = make_pair("LSTM", I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                           bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
    hx = _hidden("LSTM", layers, 2 if bidirectional else 1, B, H, proj_size, dtype) if with_hx else None
    check_parity(fused, ref, _input(batch_first, dtype), hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,extra", [("GRU", {}), ("RNN", {"nonlinearity": "tanh"}),
                                        ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional", GRID)
@pytest.mark.parametrize("with_hx", [False, True])
def test_gru_rnn_grid(kind, extra, layers, bias, batch_first, bidirectional, dtype, with_hx):
    torch.manual_seed(layers * 11 + int(bias))
    fused, ref = make_pair(kind, I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                           bidirectional=bidirectional, dtype=dtype, **extra)
    hx = _hidden(kind, layers, 2 if bidirectional else 1, B, H, 0, dtype) if with_hx else None
    check_parity(fused, ref, _input(batch_first, dtype), hx)


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}),
                                        ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched(kind, extra, with_hx):
    torch.manual_seed(3)
    fused, ref = make_pair(kind, I, H, num_layers=2, bidirectional=True, **extra)
    hx = None
    if with_hx:
        hx = _hidden(kind, 2, 2, None, H, extra.get("proj_size", 0), torch.float64, batched=False)
    check_parity(fused, ref, torch.randn(T, I, dtype=torch.float64), hx)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_between_layers_matches_torch_rng(kind, dtype):
    """torch.nn draws one dropout mask per layer output; with the same seed ours are identical."""
    fused, ref = make_pair(kind, I, H, num_layers=3, dropout=0.4, bidirectional=True, dtype=dtype)
    x = _input(False, dtype)
    torch.manual_seed(5)
    out_f = fused(x)[0]
    torch.manual_seed(5)
    out_r = ref(x)[0]
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)
    # ... and dropout is really applied in training, never in eval.
    torch.manual_seed(5)
    fused.eval()
    assert not torch.allclose(fused(x)[0], out_f)
    torch.manual_seed(5)
    ref.eval()
    torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def _packed(dtype, lengths, enforce_sorted, batch_first=False):
    x = torch.randn(max(lengths), len(lengths), I, dtype=dtype)
    if batch_first:
        x = x.transpose(0, 1)
    return pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                enforce_sorted=enforce_sorted)


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("LSTM", {"proj_size": 4}), ("GRU", {}),
                                        ("RNN", {"nonlinearity": "tanh"}),
                                        ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequence(kind, extra, enforce_sorted, layers, bidirectional, with_hx):
    torch.manual_seed(9)
    fused, ref = make_pair(kind, I, H, num_layers=layers, bidirectional=bidirectional, **extra)
    lengths = [5, 5, 3, 1] if enforce_sorted else [2, 5, 1, 4]
    x = _packed(torch.float64, lengths, enforce_sorted)
    hx = None
    if with_hx:
        hx = _hidden(kind, layers, 2 if bidirectional else 1, len(lengths), H,
                     extra.get("proj_size", 0), torch.float64)
    check_parity(fused, ref, x, hx)


def test_packed_float32_batch_first():
    torch.manual_seed(10)
    fused, ref = make_pair("LSTM", I, H, num_layers=2, bidirectional=True, batch_first=True,
                           dtype=torch.float32)
    check_parity(fused, ref, _packed(torch.float32, [3, 6, 2, 6, 1], False, batch_first=True))


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [False, True])
def test_cells(kind, dtype, bias, batched, with_hx):
    torch.manual_seed(12)
    extra = {"nonlinearity": "relu"} if kind == "RNNCell" and bias else {}
    fused, ref = make_pair(kind, I, H, bias=bias, dtype=dtype, **extra)
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, dtype=dtype)
    hx = None
    if with_hx:
        hx = torch.randn(*shape, H, dtype=dtype)
        if kind == "LSTMCell":
            hx = (hx, torch.randn(*shape, H, dtype=dtype))
    check_parity(fused, ref, x, hx)


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}),
                                        ("RNN", {}), ("LSTMCell", {}), ("GRUCell", {}),
                                        ("RNNCell", {})])
def test_same_parameters_and_initialisation(kind, extra):
    fused_cls, ref_cls = PAIRS[kind]
    if kind in ("LSTM", "GRU", "RNN"):
        extra = dict(extra, num_layers=2, bidirectional=True)
    torch.manual_seed(42)
    ref = ref_cls(I, H, **extra)
    torch.manual_seed(42)
    fused = fused_cls(I, H, **extra)
    ref_params, fused_params = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert list(fused_params) == list(ref_params)
    for name in ref_params:
        assert torch.equal(fused_params[name], ref_params[name]), name
    assert repr(fused) == repr(ref)
    assert list(fused.state_dict()) == list(ref.state_dict())


def test_weights_updated_in_place_are_followed():
    fused, ref = make_pair("LSTM", I, H, num_layers=2)
    x = _input(False, torch.float64)
    check_parity(fused, ref, x)
    with torch.no_grad():
        for p_f, p_r in zip(fused.parameters(), ref.parameters()):
            p_f.mul_(1.5)
            p_r.mul_(1.5)
    check_parity(fused, ref, x)


def test_no_grad_inference_matches():
    fused, ref = make_pair("GRU", I, H, num_layers=2, bidirectional=True, dtype=torch.float32)
    x = _input(True, torch.float32)
    with torch.no_grad():
        out_f, h_f = fused(x)
        out_r, h_r = ref(x)
    assert not out_f.requires_grad
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_f, h_r, rtol=1e-5, atol=1e-5)
