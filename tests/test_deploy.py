"""Taking a model out of eager PyTorch: torch.compile over changing shapes, torch.export with
dynamic dimensions, ONNX (both exporters, run in ONNX Runtime), TorchScript, the docs and the
self-check. Each against torch.nn with the same state_dict."""
import io
import os
import pydoc
import subprocess
import sys
import warnings

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from helpers import make_pair, onnx_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Stack(torch.nn.Module):
    """The three layers in one model, so that one compile covers them."""

    def __init__(self, lib):
        super().__init__()
        self.lstm = lib.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
        self.gru = lib.GRU(4, 3, batch_first=True)
        self.rnn = lib.RNN(3, 2, nonlinearity="relu")

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, h_gru = self.gru(y.transpose(0, 1))
        y, h_rnn = self.rnn(y.transpose(0, 1))
        return y, h.sum() + c.sum() + h_gru.sum() + h_rnn.sum()


def _counting_backend():
    """aot_eager that counts the forward graphs it is given (each is a compile)."""
    graphs = []

    def forward_compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)), graphs


def _train_step(module, x):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y, total = module(x)
    ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + total).backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


def test_compile_over_changing_shapes_makes_at_most_two_graphs():
    """Eight (T, B): the first call's static graph, then one with symbolic T and B (a padded input
    reaches the op as an empty batch_sizes, no per-step list), forward and backward, no graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref, model = _Stack(torch.nn), _Stack(fused_rnn)
    model.load_state_dict(ref.state_dict())
    backend, graphs = _counting_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for steps, batch in [(5, 2), (7, 3), (4, 5), (9, 2), (6, 4), (3, 3), (8, 6), (10, 2)]:
        x = torch.randn(steps, batch, 3)
        for got, want in zip(_train_step(compiled, x), _train_step(ref, x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 8 shapes"


def test_compile_packed_input_recompiles_once_per_batch_sizes_pattern():
    """PackedSequence: batch_sizes is a list of step sizes, read as numbers, so each new pattern is
    one more graph (docs/ecosystem.md says so); a pattern seen before is not compiled again."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fused_rnn.GRU(3, 4, bidirectional=True)
    backend, graphs = _counting_backend()
    compiled = torch.compile(model, backend=backend)
    patterns = [(4, 2, 2), (3, 1), (4, 2, 2), (5, 5)]
    for lengths in patterns:
        packed = pack_sequence([torch.randn(n, 3) for n in lengths])
        torch.testing.assert_close(compiled(packed)[0].data, model(packed)[0].data)
    distinct = len({tuple(pack_sequence([torch.zeros(n, 1) for n in p]).batch_sizes.tolist()) for p in patterns})
    assert 0 < len(graphs) <= distinct + 1, f"{len(graphs)} graphs for {distinct} batch_sizes patterns"


@pytest.mark.parametrize("kind,kwargs", [("LSTM", dict(proj_size=2, bidirectional=True)),
                                         ("GRU", dict(num_layers=2, batch_first=True)),
                                         ("RNN", dict(nonlinearity="relu"))])
def test_export_with_dynamic_batch_and_sequence_length(kind, kwargs, tmp_path):
    """torch.export holds our op (dynamic B and T, which torch.nn's own layers cannot give for T),
    and the saved .pt2 loads back (with fused_rnn imported: it registers the op)."""
    fused, ref = make_pair(kind, 3, 4, dtype=torch.float32, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
    example = torch.randn(5, 3, 3)
    dims = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    program = torch.export.export(fused, (example,), dynamic_shapes=({**dims},))
    assert any("fused_rnn.layer_forward" in str(n.target) for n in program.graph.nodes)
    path = tmp_path / "layer.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    for shape in [(5, 3, 3), (9, 2, 3), (4, 7, 3)]:
        x = torch.randn(*shape)
        for got, want in zip(torch.utils._pytree.tree_leaves(loaded(x)), torch.utils._pytree.tree_leaves(ref(x))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


ONNX_CASES = [("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)), ("GRU", dict(bias=False)),
              ("RNN", dict(nonlinearity="relu", bidirectional=True)), ("RNN", dict(num_layers=2))]


# Every case with torch's TorchScript-based exporter; the torch.export-based one (about 20 s a model
# here) on the first two.
ONNX_RUNS = [(kind, kwargs, False) for kind, kwargs in ONNX_CASES] + [(k, kw, True) for k, kw in ONNX_CASES[:2]]


@pytest.mark.parametrize("kind,kwargs,dynamo", ONNX_RUNS,
                         ids=[f"{k}-{i}-{'dynamo' if d else 'torchscript'}" for i, (k, _, d) in enumerate(ONNX_RUNS)])
def test_onnx_export_runs_in_onnxruntime_as_torch_nn(kind, kwargs, dynamo):
    """Fused layers export as ONNX's own LSTM, GRU and RNN operators (recorded from torch.nn's
    forward, with the same parameters) and compute torch.nn's numbers in ONNX Runtime on another
    batch size (and, with the TorchScript-based exporter, another length: torch's torch.export-based
    translation of the recurrent layers fixes the length it was given)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    fused, ref = make_pair(kind, 3, 4, dtype=torch.float32, **kwargs)
    fused.eval(), ref.eval()
    model = onnx_bytes(fused, (torch.randn(5, 2, 3),), dynamo)  # [T, B] = [5, 2], or [B, T] with batch_first
    nodes = [node for node in onnx.load_from_string(model).graph.node if node.op_type == kind]
    assert nodes, f"no ONNX {kind} operator"
    if kind == "GRU":  # torch.nn's form: the reset gate scales (W_hn h + b_hn)
        assert all(onnx.helper.get_attribute_value(a) == 1 for n in nodes for a in n.attribute
                   if a.name == "linear_before_reset")
        assert all(any(a.name == "linear_before_reset" for a in n.attribute) for n in nodes)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    if dynamo:
        x = torch.randn(3, 2, 3) if kwargs.get("batch_first") else torch.randn(5, 3, 3)
    else:
        x = torch.randn(6, 3, 3)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for g, want in zip(got, torch.utils._pytree.tree_leaves(ref(x))):
        torch.testing.assert_close(torch.from_numpy(g), want.detach(), rtol=1e-5, atol=1e-5)


def test_onnx_export_refuses_a_projection():
    """ONNX's LSTM has no projection: a clear error (torch's own exporter writes a model that ONNX
    Runtime rejects, with the torch.export-based exporter)."""
    pytest.importorskip("onnx")
    lstm = fused_rnn.LSTM(3, 4, proj_size=2).eval()
    with pytest.raises(NotImplementedError, match="proj_size cannot be exported to ONNX"):
        torch.onnx.export(lstm, (torch.randn(5, 2, 3),), io.BytesIO(), dynamo=False)


def test_onnx_export_of_cells():
    """Cells export as torch.nn's do (matrix products and activations), with torch.nn's numbers."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    for kind in ("LSTMCell", "GRUCell", "RNNCell"):
        fused, ref = make_pair(kind, 3, 4, dtype=torch.float32)
        x = torch.randn(2, 3)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fused, (x,), buffer, dynamo=False)
        session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for g, want in zip(got, torch.utils._pytree.tree_leaves(ref(x))):
            torch.testing.assert_close(torch.from_numpy(g), want.detach(), rtol=1e-5, atol=1e-5)


def test_jit_trace_records_torch_nn_ops_and_generalises():
    """A trace holds torch.nn's op (aten::lstm), so it runs on other shapes and without fused_rnn."""
    fused, ref = make_pair("LSTM", 3, 4, dtype=torch.float32, num_layers=2, bidirectional=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fused, (torch.randn(5, 2, 3),))
    assert traced.graph.findAllNodes("aten::lstm")
    x = torch.randn(8, 4, 3)
    for got, want in zip(torch.utils._pytree.tree_leaves(traced(x)), torch.utils._pytree.tree_leaves(ref(x))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_jit_script_is_refused_clearly(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile .*convert\(model, to='torch'\)"):
            torch.jit.script(getattr(fused_rnn, kind)(3, 4))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_help_reads_as_torch_nn_and_says_what_differs(kind):
    text = pydoc.render_doc(getattr(fused_rnn, kind), renderer=pydoc.plaintext)
    torch_text = getattr(torch.nn, kind).__doc__
    for section in ("Args:", "Inputs:", "Outputs:"):
        if section in torch_text:
            assert section in text
    assert f"fused_rnn.{kind}(" in text  # torch.nn's examples, on our class
    for word in ("What differs from torch.nn", "Deterministic", "CUDA", "empty_cache", "torch.export"):
        assert word in text


def test_python_m_fused_rnn_reports_the_build_and_checks_against_torch_nn():
    run = subprocess.run([sys.executable, "-m", "fused_rnn"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for line in (f"torch {torch.__version__}", "built with CUDA kernels: " + ("yes" if fused_rnn.built_with_cuda
                                                                              else "no"),
                 "CPU vector math:", "threads", "devices visible: cpu", "CPU kernel plan", "all checks passed"):
        assert line in run.stdout, run.stdout
    assert run.stdout.count(" ok") >= 6
    plan = fused_rnn.cpu_plan("LSTM", torch.float32, 64, 512, 512, pass_="backward")  # the plan's own words
    assert "; ".join(f"{k}: {v}" for k, v in plan.items()) in run.stdout
