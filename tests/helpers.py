"""Shared test machinery: build a fused module and its torch.nn twin with one state_dict, run both
forward and backward on the same inputs, and compare everything. On any device (tests/test_cuda.py
runs it on a GPU and under the CUDA emulation) and in any dtype the modules take."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn
from fused_rnn import testing

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


# The ops' names of the RNN's two cells (fused_rnn._ops.CELL_IDS), which make_pair takes too.
RNN_NONLINEARITY = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}


def make_pair(kind, *args, dtype=torch.float64, ref_dtype=None, **kwargs):
    """A fused module (a key of PAIRS, or "RNN_TANH" / "RNN_RELU") and its torch.nn twin with the
    twin's initial state_dict. With ref_dtype the twin runs in that dtype, on the fused module's
    weights as rounded to `dtype`."""
    if kind in RNN_NONLINEARITY:
        kind, kwargs = "RNN", dict(kwargs, nonlinearity=RNN_NONLINEARITY[kind])
    fused_cls, ref_cls = PAIRS[kind]
    ref = ref_cls(*args, dtype=ref_dtype or dtype, **kwargs)
    fused = fused_cls(*args, dtype=dtype, **kwargs)
    fused.load_state_dict(ref.state_dict())
    if ref_dtype is not None:
        ref.load_state_dict(fused.state_dict())
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


def to_leaf(x, dtype=None):
    """A fresh leaf that requires grad (in `dtype` where given) of an input or a state: a tensor, a
    PackedSequence, a tuple of them, or None."""
    if x is None:
        return None
    if isinstance(x, PackedSequence):
        return PackedSequence(to_leaf(x.data, dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype or x.dtype).clone().requires_grad_()
    return tuple(to_leaf(t, dtype) for t in x)


def run(module, x, hx=None, seed=0, dtype=None, loss_dtype=None):
    """Forward, then backward of a random linear functional of every output. Inputs and state are
    cast to `dtype` where given; the functional's weights are rounded through `loss_dtype` first
    where given (so that a half-type run and its float32 reference see the same numbers).
    Returns (outputs, grads of input, hidden and every parameter)."""
    x = to_leaf(x, dtype)
    hx = to_leaf(hx, dtype)
    out = module(x, hx) if hx is not None else module(x)
    outputs = leaves(out)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outputs:
        weight = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        if loss_dtype is not None:
            weight = weight.to(loss_dtype)
        weight = weight.to(device=o.device, dtype=o.dtype)
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


def onnx_bytes(module, args, dynamo):
    """torch.onnx.export of module(*args) (args: (x,) or (x, (h0, c0))) to bytes, with the batch dynamic;
    with the TorchScript-based exporter (dynamo=False) the length too (torch's torch.export-based
    translation of the recurrent layers fixes the length it was given)."""
    import io
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch_dim = 0 if getattr(module, "batch_first", False) else 1
        if dynamo:
            batch = torch.export.Dim("batch", min=2)
            shapes = ({batch_dim: batch},) + tuple(({1: batch}, {1: batch}) for _ in args[1:])
            return torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes).model_proto.SerializeToString()
        buffer = io.BytesIO()
        names = ["x"] + (["h0", "c0"] if len(args) > 1 else [])
        axes = {"x": {0: "dim0", 1: "dim1"}, "h0": {1: "batch"}, "c0": {1: "batch"}}
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=names,
                          dynamic_axes={n: axes[n] for n in names})
        return buffer.getvalue()


def runs_at_thread_counts(module, x, counts, seed=None):
    """run(module, x)'s outputs and gradients (one list) with torch's threads set to each of
    `counts` in turn (and torch.manual_seed(seed) before each, where given), gradients zeroed
    between runs."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            if seed is not None:
                torch.manual_seed(seed)
            module.zero_grad()
            out, grads = run(module, x)
            results.append(out + grads)
    finally:
        torch.set_num_threads(before)
    return results


def check_func_grad_and_export(module, x):
    """torch.func.grad of a loss through functional_call gives autograd's gradients, and
    torch.export's program computes the module's output bit for bit."""
    params = dict(module.named_parameters())

    def loss(p):
        return torch.func.functional_call(module, p, (x,))[0].square().sum()

    grads = torch.func.grad(loss)(params)
    module.zero_grad()
    module(x)[0].square().sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x)[0], module(x)[0], rtol=0, atol=0)


def check_seeded_masks_reproducible(module, x):
    """A module that draws random masks in training: the same seed gives the same bits, outputs and
    gradients, at 1, 2 and 3 threads (under the emulated CUDA path at one: its products are ATen's on
    the CPU, whose bits follow the thread count); another seed, other outputs."""
    counts = (1, 1) if testing.emulating_cuda() else (1, 2, 3)
    results = runs_at_thread_counts(module, x, counts, seed=3)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    torch.manual_seed(4)
    assert not torch.equal(module(x)[0], results[0][0])  # other masks


def gradcheck_with_seeded_masks(module, x):
    """gradcheck of every input and parameter, and gradgradcheck of x and the second parameter, of a
    module that draws random masks in training: the same seed before every evaluation, so that each
    sees the same masks."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def f(x, *weights):
        torch.manual_seed(5)
        y, h = torch.func.functional_call(module, dict(zip(names, weights)), (x,))
        return (y,) + (h if isinstance(h, tuple) else (h,))

    assert torch.autograd.gradcheck(f, (x,) + params)
    assert torch.autograd.gradgradcheck(lambda x, w: f(x, *params[:1], w, *params[2:]), (x, params[1]))


def check_in_onnxruntime(module, example, x, dynamo):
    """torch.onnx.export of module(example) (onnx_bytes), run in ONNX Runtime on x: the module's outputs
    to 1e-5. Skips where onnx, onnxruntime (or, for dynamo, onnxscript) is absent."""
    import pytest
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    session = ort.InferenceSession(onnx_bytes(module, (example,), dynamo), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    want = torch.utils._pytree.tree_leaves(module(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w.detach(), rtol=1e-5, atol=1e-5)


def check_probability_argument(arg, meaning):
    """A probability keyword of fused_rnn's layers (zoneout, recurrent_dropout): outside [0, 1) a
    ValueError naming what it is the probability of, not a number a TypeError; 0 is off, out of repr."""
    import pytest
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"{arg} should be a number in range \[0, 1\) representing the "
                                             rf"probability of {meaning}"):
            fused_rnn.LSTM(3, 4, **{arg: bad})
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match=f"{arg} should be a number"):
            fused_rnn.GRU(3, 4, **{arg: bad})
    off = fused_rnn.RNN(3, 4, **{arg: 0.0})
    assert getattr(off, arg) == 0 and arg not in repr(off)
