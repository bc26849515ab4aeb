"""Fitting into PyTorch: fused_rnn.convert, autocast, CUDA graphs, pickling and copying, dtype and
device moves, state_dicts both ways, flatten_parameters. CUDA tests skip without a GPU."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fused_rnn
from helpers import PAIRS, assert_close, check_parity, leaves, make_pair, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not fused_rnn.built_with_cuda,
                                reason="needs a CUDA GPU and a CUDA build of fused_rnn")

KINDS = [("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True)), ("LSTM", {}), ("GRU", dict(num_layers=2)),
         ("RNN", dict(nonlinearity="tanh")), ("RNN", dict(nonlinearity="relu", bidirectional=True)),
         ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", dict(nonlinearity="relu"))]


def _x(kind, dtype=torch.float64, device="cpu"):
    return torch.randn((3, 5) if "Cell" in kind else (6, 3, 5), dtype=dtype, device=device)


def _parity(fused, ref, x):
    """check_parity with fresh gradients on both sides."""
    fused.zero_grad()
    ref.zero_grad()
    check_parity(fused, ref, x)


class _Model(nn.Module):
    """torch.nn's six recurrent modules, nested, with a module that is not recurrent."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 5))
        self.lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.stack = nn.ModuleList([nn.GRU(6, 4), nn.RNN(4, 3, nonlinearity="relu")])
        self.cells = nn.ModuleDict({"lstm": nn.LSTMCell(3, 3), "gru": nn.GRUCell(3, 3), "rnn": nn.RNNCell(3, 2)})

    def forward(self, x):
        y, (h, c) = self.lstm(self.encoder(x))
        y, _ = self.stack[0](y.transpose(0, 1))
        y, _ = self.stack[1](y)
        h_cell, c_cell = self.cells["lstm"](y[-1])
        return self.cells["rnn"](self.cells["gru"](h_cell, c_cell)), h, c


# --- fused_rnn.convert -------------------------------------------------------------------------


def test_convert_swaps_every_recurrent_module_in_place():
    torch.manual_seed(0)
    model = _Model().double()
    model.stack[0].eval()
    reference = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    calls = []
    model.lstm.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    model.cells["gru"].register_forward_pre_hook(lambda module, args: calls.append(type(module)))

    assert fused_rnn.convert(model) is model
    expected = {"lstm": fused_rnn.LSTM, "stack.0": fused_rnn.GRU, "stack.1": fused_rnn.RNN,
                "cells.lstm": fused_rnn.LSTMCell, "cells.gru": fused_rnn.GRUCell, "cells.rnn": fused_rnn.RNNCell}
    modules = dict(model.named_modules())
    assert {name: type(modules[name]) for name in expected} == expected
    assert type(model.encoder[0]) is nn.Linear
    # The same Parameter objects (dtype, device, optimizer state follow), state_dict keys and modes.
    assert all(params_before[name] is p for name, p in model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]

    x = torch.randn(2, 6, 5, dtype=torch.float64)
    out, grads = run(model, x, None)
    out_ref, grads_ref = run(reference, x, None)
    assert_close(out, out_ref, 1e-10, 1e-10, "outputs")
    assert_close(grads, grads_ref, 1e-10, 1e-10, "gradients")
    assert calls == [fused_rnn.LSTM, fused_rnn.GRUCell]  # the hooks moved with their modules


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_convert_a_bare_module_and_back(kind, kwargs):
    torch.manual_seed(0)
    fused_cls, torch_cls = PAIRS[kind]
    module = torch_cls(5, 4, dtype=torch.float64, **kwargs)
    reference = copy.deepcopy(module)
    assert type(fused_rnn.convert(module)) is fused_cls
    _parity(module, reference, _x(kind))
    assert type(fused_rnn.convert(module, to="torch")) is torch_cls
    _parity(module, reference, _x(kind))


def test_convert_leaves_subclasses_and_fused_modules_alone():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(3, 4), fused_rnn.GRU(3, 4))
    fused_rnn.convert(model)
    assert [type(m) for m in model] == [MyLSTM, fused_rnn.GRU]
    with pytest.raises(ValueError, match="to must be"):
        fused_rnn.convert(model, to="cudnn")


# --- autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_cpu_autocast_gives_torch_nn_dtypes(kind, kwargs):
    """Under CPU bfloat16 autocast each output has torch.nn's dtype, its value within 1e-2 of the
    float32 answer, and gradients reach the float32 parameters. torch.nn's reference runs without
    oneDNN: its oneDNN LSTM fails for bfloat16 on CPUs without bfloat16 support."""
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, **kwargs)
    x = _x(kind, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.backends.mkldnn.flags(enabled=False):
        out = leaves(fused(x))
        assert [o.dtype for o in out] == [o.dtype for o in leaves(ref(x))]
        sum(o.float().sum() for o in out).backward()
    float_out = leaves(ref(x))
    sum(o.sum() for o in float_out).backward()
    grads, float_grads = [p.grad for p in fused.parameters()], [p.grad for p in ref.parameters()]
    assert all(g.dtype == torch.float32 for g in grads)
    if kwargs.get("nonlinearity") == "relu":
        # A pre-activation within bfloat16 rounding of 0 flips relu's gradient: torch.nn's own
        # bfloat16 gradients can then miss the float32 ones by 20%. Compare the outputs only.
        grads, float_grads = [], []
    for actual, expected in zip(out + grads, float_out + float_grads):
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual.float(), expected.detach(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_cpu_autocast_takes_a_low_precision_input_into_float32_weights(kind, kwargs):
    """A bfloat16 activation (the output of an autocast Linear, say) into a float32 layer: accepted
    under autocast with torch.nn's output dtypes and values, refused with a clear error outside it."""
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, **kwargs)
    x = _x(kind, torch.float32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.backends.mkldnn.flags(enabled=False):
        out, expected = leaves(fused(x)), leaves(ref(x))
    assert [o.dtype for o in out] == [e.dtype for e in expected]
    for actual, e in zip(out, expected):
        torch.testing.assert_close(actual.float(), e.float(), rtol=2e-2, atol=2e-2 * max(1.0, e.abs().max().item()))
    with pytest.raises((ValueError, RuntimeError), match="does not match weight dtype") as info:
        fused(x)
    with pytest.raises(type(info.value)) as torch_nn_error:  # torch.nn's type (cells: its matrix product's)
        ref(x)
    assert str(torch_nn_error.value) in str(info.value)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_cuda_autocast_runs_in_the_low_dtype(kind, kwargs, dtype):
    """Every output in the autocast dtype (torch.nn's cells do the same; its cuDNN layers give
    float16 even under bfloat16), within 1e-2 of the float32 answer."""
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, device="cuda", **kwargs)
    x = _x(kind, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = leaves(fused(x))
        if dtype == torch.float16:
            assert [o.dtype for o in out] == [o.dtype for o in leaves(ref(x))]
    for actual, expected in zip(out, leaves(ref(x))):
        assert actual.dtype == dtype
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual.float(), expected, rtol=1e-2, atol=1e-2 * scale)


# --- CUDA graphs -------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=8)),
                                         ("GRU", {}), ("RNN", dict(nonlinearity="relu")), ("LSTMCell", {})])
def test_cuda_graph_capture_of_forward_and_backward(kind, kwargs):
    """Capture one forward and backward in a CUDA graph, replay it on new input, compare with eager."""
    torch.manual_seed(0)
    module = getattr(fused_rnn, kind)(5, 16, device="cuda", **kwargs)
    params = list(module.parameters())
    static_x = _x(kind, torch.float32, "cuda").requires_grad_()

    def step(x):
        outputs = leaves(module(x))
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum() for o in outputs)
        return outputs + list(torch.autograd.grad(loss, [x] + params))

    side = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step(static_x)

    new_x = torch.randn_like(static_x)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_results, step(new_x.requires_grad_()), 1e-5, 1e-5, "graph replay vs eager")


# --- pickling, copying, moving, state_dicts ----------------------------------------------------


def _pickle(module):
    return pickle.loads(pickle.dumps(module))


def _torch_save(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("duplicate", [_pickle, copy.deepcopy, _torch_save])
@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_copies_are_independent_and_correct(kind, kwargs, duplicate):
    """A copy has the original's class and numbers, and its forward reads its own parameters."""
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, **kwargs)
    twin = duplicate(fused)
    assert type(twin) is type(fused)
    _parity(twin, ref, _x(kind))
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ref.load_state_dict(twin.state_dict())
    _parity(twin, ref, _x(kind))  # the halved weights are used
    ref.load_state_dict(fused.state_dict())
    _parity(fused, ref, _x(kind))  # and the original is untouched


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_dtype_moves_follow_torch(kind, kwargs):
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, **kwargs)
    _parity(fused.double(), ref.double(), _x(kind))
    _parity(fused.to(torch.float32), ref.float(), _x(kind, torch.float32))
    half = fused.half()
    x = _x(kind, torch.float16)
    for actual, expected in zip(leaves(half(x)), leaves(ref(x.float()))):
        assert actual.dtype == torch.float16
        torch.testing.assert_close(actual.float(), expected, rtol=1e-2, atol=1e-2)


@needs_cuda
@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_device_moves(kind, kwargs):
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, dtype=torch.float32, **kwargs)
    x = _x(kind, torch.float32)
    with torch.no_grad():
        expected = leaves(ref(x))
        on_gpu = leaves(fused.to("cuda")(x.cuda()))
        assert_close([t.cpu() for t in on_gpu], expected, 1e-5, 1e-5, "after .to('cuda')")
        assert_close(leaves(fused.cpu()(x)), expected, 1e-5, 1e-5, "after .cpu()")


@pytest.mark.parametrize("kind,kwargs", KINDS)
def test_state_dict_loads_both_ways(kind, kwargs):
    torch.manual_seed(0)
    fused_cls, torch_cls = PAIRS[kind]
    fused = fused_cls(5, 4, dtype=torch.float64, **kwargs)
    ref = torch_cls(5, 4, dtype=torch.float64, **kwargs)
    ref.load_state_dict(fused.state_dict())  # strict: same keys and shapes
    _parity(fused, ref, _x(kind))
    other = torch_cls(5, 4, dtype=torch.float64, **kwargs)
    fused.load_state_dict(other.state_dict())
    _parity(fused, other, _x(kind))


@pytest.mark.parametrize("kind,kwargs", [k for k in KINDS if "Cell" not in k[0]])
def test_flatten_parameters_is_a_harmless_no_op(kind, kwargs):
    torch.manual_seed(0)
    fused, ref = make_pair(kind, 5, 4, **kwargs)
    before = [(p, p.data_ptr()) for p in fused.parameters()]
    assert fused.flatten_parameters() is None
    assert [(p, p.data_ptr()) for p in fused.parameters()] == before
    _parity(fused, ref, _x(kind))


def _allowlist_torch_needs(buffer):
    """The globals torch.load(weights_only=True) asks for, one refusal at a time, as a caller would
    list them for a model with torch's layers."""
    import importlib
    import re
    allowed = []
    for _ in range(50):
        buffer.seek(0)
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(buffer, weights_only=True)
            return allowed
        except Exception as exc:  # UnpicklingError, naming the global it refused
            found = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(exc))
            assert found, str(exc)
            module, _, name = found.group(1).rpartition(".")
            allowed.append(getattr(importlib.import_module(module), name))
    raise AssertionError("no allowlist found")


class _Wrapper(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 6)
        self.layer = layer


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "int8 LSTM", "int8 GRU"])
def test_a_model_saved_whole_loads_where_torch_nn_would(name):
    """torch.load(weights_only=True) with the allowlist a model of torch's layers needs (torch.nn's or
    torch's int8 classes, never ours) loads the same model with our layers, after import fused_rnn,
    and it computes what it computed before (PyTorch's word_language_model/generate.py does this)."""
    import io
    import warnings
    int8 = name.startswith("int8 ")
    kind = name.split()[-1]
    models = []
    for lib in (torch.nn, fused_rnn):
        torch.manual_seed(0)
        layer = getattr(lib, kind)(6, 8)
        if int8:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {type(layer)}, torch.qint8)
        models.append(_Wrapper(layer).eval())
    buffers = []
    for model in models:
        buffers.append(io.BytesIO())
        torch.save(model, buffers[-1])
    allowed = _allowlist_torch_needs(buffers[0])
    assert not any(getattr(g, "__module__", "").startswith("fused_rnn") for g in allowed)
    buffers[1].seek(0)
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(buffers[1], weights_only=True)
    assert type(loaded.layer) is type(models[1].layer)
    x = models[1].embedding(torch.tensor([[1, 2], [3, 4], [5, 6]]))
    if kind.endswith("Cell"):
        x = x[0]
    with torch.no_grad():
        want, got = models[1].layer(x), loaded.layer(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(a, b)
