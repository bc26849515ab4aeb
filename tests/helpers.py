"""Shared test machinery: build a fused module and its torch.nn twin with one state_dict, run both
forward and backward on the same inputs, and compare everything."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn

TOLERANCE = {  # (rtol, atol) against torch.nn in the same dtype
    torch.float64: (1e-10, 1e-10),
    torch.complex128: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.complex64: (1e-5, 1e-5),
}

PAIRS = {
    "LSTM": (fused_rnn.LSTM, nn.LSTM),
    "GRU": (fused_rnn.GRU, nn.GRU),
    "RNN": (fused_rnn.RNN, nn.RNN),
    "LSTMCell": (fused_rnn.LSTMCell, nn.LSTMCell),
    "GRUCell": (fused_rnn.GRUCell, nn.GRUCell),
    "RNNCell": (fused_rnn.RNNCell, nn.RNNCell),
}


def make_pair(kind, *args, dtype=torch.float64, **kwargs):
    fused_cls, ref_cls = PAIRS[kind]
    ref = ref_cls(*args, dtype=dtype, **kwargs)
    fused = fused_cls(*args, dtype=dtype, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def leaves(obj):
    """Tensors of a nested output (tuples, PackedSequence, None) in a fixed order."""
    if obj is None:
        return []
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, torch.Tensor):
        return [obj]
    out = []
    for item in obj:
        out.extend(leaves(item))
    return out


def _clone_input(x):
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().clone().requires_grad_(), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return x.detach().clone().requires_grad_()


def _clone_hidden(hx):
    if hx is None:
        return None
    if isinstance(hx, torch.Tensor):
        return hx.detach().clone().requires_grad_()
    return tuple(h.detach().clone().requires_grad_() for h in hx)


def run(module, x, hx, seed=0):
    """Forward, then backward of a random linear functional of every output.
    Returns (outputs, grads of input, hidden and every parameter)."""
    x = _clone_input(x)
    hx = _clone_hidden(hx)
    out = module(x, hx) if hx is not None else module(x)
    outputs = leaves(out)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        weight = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
        loss = loss + (o * weight).sum().real if o.is_complex() else loss + (o * weight).sum()
    loss.backward()
    grads = leaves(x) + (leaves(hx) if hx is not None else [])
    grads = [g.grad for g in grads] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outputs], grads


def assert_close(actual, expected, rtol, atol, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} tensors"
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None or not a.abs().any(), f"{what}[{k}]: expected no gradient"
            continue
        assert a is not None, f"{what}[{k}]: missing"
        # atol is relative to the tensor's scale: gradients of long chains reach 1e3 and more.
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}[{k}]: {m}")


def check_parity(fused, ref, x, hx=None, tol=None):
    dtype = next(ref.parameters()).dtype
    rtol, atol = tol or TOLERANCE[dtype]
    out_f, grad_f = run(fused, x, hx)
    out_r, grad_r = run(ref, x, hx)
    assert_close(out_f, out_r, rtol, atol, "outputs")
    assert_close(grad_f, grad_r, rtol, atol, "gradients")
