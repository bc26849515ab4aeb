"""Peephole LSTM (fused_rnn.LSTM / LSTMCell(peephole=True), issue #41) against a plain PyTorch loop of
its equations, written out here independently of the library:

    i = σ(W_ii x + b_ii + W_hi h + b_hi + p_i ⊙ c_{t-1})      f likewise with p_f ⊙ c_{t-1}
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)                      c_t = f ⊙ c_{t-1} + i ⊙ g
    o = σ(W_io x + b_io + W_ho h + b_ho + p_o ⊙ c_t)             h_t = o ⊙ tanh(c_t)  (then W_hr with proj_size)
"""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn import testing
from helpers import (TOLERANCE, assert_close, check_func_grad_and_export, leaves, onnx_bytes, run,
                     runs_at_thread_counts, to_leaf)

# Under FUSED_RNN_EMULATE_CUDA=1 (a stage of .ci/run) every module call takes the emulated CUDA path.
cuda_half = pytest.mark.skipif(not fused_rnn.built_with_cuda, reason="a CPU-only build has no CUDA path")
cpu_half = pytest.mark.skipif(testing.emulating_cuda(), reason="FUSED_RNN_EMULATE_CUDA=1 leaves no CPU half")


def reference_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, p):
    gates = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    H = c.shape[-1]
    i = torch.sigmoid(gates[:, :H] + p[:H] * c)
    f = torch.sigmoid(gates[:, H:2 * H] + p[H:2 * H] * c)
    g = torch.tanh(gates[:, 2 * H:3 * H])
    c = f * c + i * g
    o = torch.sigmoid(gates[:, 3 * H:] + p[2 * H:] * c)
    h = o * torch.tanh(c)
    return (h if w_hr is None else h @ w_hr.T), c


class ReferenceLSTM(nn.Module):
    """The equations above over a padded batch, with fused_rnn.LSTM's parameters (names, order)."""

    def __init__(self, fused: fused_rnn.LSTM):
        super().__init__()
        self.fused_config = (fused.num_layers, fused.bidirectional, fused.batch_first, fused.hidden_size,
                             fused.proj_size)
        for name, p in fused.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x, hx=None):
        layers, bidirectional, batch_first, H, P = self.fused_config
        D = 2 if bidirectional else 1
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else tuple(s.unsqueeze(1) for s in hx)
        elif batch_first:
            x = x.transpose(0, 1)
        B = x.shape[1]
        if hx is None:
            hx = (x.new_zeros(layers * D, B, P or H), x.new_zeros(layers * D, B, H))
        h_n, c_n = [], []
        for layer in range(layers):
            outputs = []
            for d in range(D):
                k = layer * D + d
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                get = lambda name: getattr(self, name + suffix, None)  # noqa: E731
                h, c = hx[0][k], hx[1][k]
                ys = [None] * x.shape[0]
                for t in (range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])):
                    h, c = reference_step(x[t], h, c, get("weight_ih"), get("weight_hh"), get("bias_ih"),
                                          get("bias_hh"), get("weight_hr"), get("weight_peephole"))
                    ys[t] = h
                outputs.append(torch.stack(ys))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, 2)
        y = x.squeeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return y, (h_n, c_n)


def random_peepholes(module, scale=0.5):
    """Peephole weights large enough to matter (the default init is within 1/√H)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "peephole" in name:
                p.uniform_(-scale, scale)


@pytest.mark.parametrize("num_layers,bidirectional,proj_size,bias,batch_first", [
    (1, False, 0, True, False),
    (2, True, 0, True, True),
    (2, False, 3, True, False),
    (1, True, 4, False, True),
    (3, True, 0, False, False),
])
@pytest.mark.parametrize("with_hx", [False, True])
def test_layer_matches_the_equations_float64(num_layers, bidirectional, proj_size, bias, batch_first, with_hx):
    torch.manual_seed(1)
    fused = fused_rnn.LSTM(5, 6, num_layers, bias, batch_first, 0.0, bidirectional, proj_size,
                           dtype=torch.float64, peephole=True)
    random_peepholes(fused)
    ref = ReferenceLSTM(fused)
    T, B = 7, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=torch.float64)
    D = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * D, B, proj_size or 6, dtype=torch.float64),
          torch.randn(num_layers * D, B, 6, dtype=torch.float64)) if with_hx else None
    out_f, grad_f = run(fused, x, hx)
    out_r, grad_r = run(ref, x, hx)
    rtol, atol = TOLERANCE[torch.float64]
    assert_close(out_f, out_r, rtol, atol, "outputs")
    assert_close(grad_f, grad_r, rtol, atol, "gradients")  # x, hx and every parameter, the peepholes' included
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in fused.named_parameters() if "peephole" in n)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.complex128, marks=cpu_half)])
def test_layer_matches_the_equations_in_other_dtypes(dtype):
    torch.manual_seed(2)
    fused = fused_rnn.LSTM(4, 5, 2, bidirectional=True, dtype=dtype, peephole=True)
    random_peepholes(fused)
    ref = ReferenceLSTM(fused)
    x = torch.randn(6, 2, 4, dtype=dtype)
    out_f, grad_f = run(fused, x)
    out_r, grad_r = run(ref, x)
    rtol, atol = TOLERANCE[dtype]
    assert_close(out_f, out_r, rtol, atol, "outputs")
    assert_close(grad_f, grad_r, rtol, atol, "gradients")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_float32(dtype):
    """Half types: float32 state and gate math, as the plain layers; against the float32 reference
    on the same (rounded) weights and input, within the half type's rounding of the outputs."""
    torch.manual_seed(3)
    fused = fused_rnn.LSTM(4, 8, dtype=dtype, peephole=True)
    random_peepholes(fused)
    ref = ReferenceLSTM(fused).float()
    x = torch.randn(5, 3, 4).to(dtype)
    y, (h, c) = fused(x)
    y_r, (h_r, c_r) = ref(x.float())
    assert y.dtype == dtype and c.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for a, e in ((y, y_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a.float(), e, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert fused.weight_peephole_l0.grad.dtype == dtype and fused.weight_peephole_l0.grad.abs().sum() > 0


def test_packed_sequences_match_each_sequence_alone():
    torch.manual_seed(4)
    fused = fused_rnn.LSTM(3, 5, 2, bidirectional=True, dtype=torch.float64, peephole=True)
    random_peepholes(fused)
    lengths = [6, 4, 4, 1]
    x = torch.randn(6, len(lengths), 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    y, (h_n, c_n) = fused(packed)
    y_padded, _ = torch.nn.utils.rnn.pad_packed_sequence(y)
    for b, length in enumerate(lengths):
        y_b, (h_b, c_b) = fused(x[:length, b])  # unbatched: one sequence of its own length
        torch.testing.assert_close(y_padded[:length, b], y_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, b], h_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_n[:, b], c_b, rtol=1e-12, atol=1e-12)


def test_unbatched_input_matches_the_equations():
    torch.manual_seed(5)
    fused = fused_rnn.LSTM(3, 4, 2, dtype=torch.float64, peephole=True)
    random_peepholes(fused)
    ref = ReferenceLSTM(fused)
    x = torch.randn(5, 3, dtype=torch.float64)
    hx = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    out_f, grad_f = run(fused, x, hx)
    out_r, grad_r = run(ref, x, hx)
    assert_close(out_f, out_r, 1e-10, 1e-10, "outputs")
    assert_close(grad_f, grad_r, 1e-10, 1e-10, "gradients")


@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_the_equations(bias):
    torch.manual_seed(6)
    cell = fused_rnn.LSTMCell(4, 7, bias, dtype=torch.float64, peephole=True)
    random_peepholes(cell)
    params = dict(cell.named_parameters())
    x = to_leaf(torch.randn(3, 4, dtype=torch.float64))
    h0, c0 = to_leaf(torch.randn(3, 7, dtype=torch.float64)), to_leaf(torch.randn(3, 7, dtype=torch.float64))
    h, c = cell(x, (h0, c0))
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    x_r, h0_r, c0_r = (to_leaf(t) for t in (x, h0, c0))
    h_r, c_r = reference_step(x_r, h0_r, c0_r, ref_params["weight_ih"], ref_params["weight_hh"],
                              ref_params.get("bias_ih"), ref_params.get("bias_hh"), None,
                              ref_params["weight_peephole"])
    torch.testing.assert_close(h, h_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_r, rtol=1e-12, atol=1e-12)
    w = torch.randn(2, 3, 7, dtype=torch.float64)
    ((h * w[0]).sum() + (c * w[1]).sum()).backward()
    ((h_r * w[0]).sum() + (c_r * w[1]).sum()).backward()
    for name in params:
        torch.testing.assert_close(params[name].grad, ref_params[name].grad, rtol=1e-10, atol=1e-10)
    for a, e in ((x, x_r), (h0, h0_r), (c0, c0_r)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-10, atol=1e-10)
    # unbatched and without hx: the same step on zeros
    h1, c1 = cell(x[0].detach())
    h1_r, c1_r = reference_step(x[0:1].detach(), torch.zeros(1, 7, dtype=torch.float64),
                                torch.zeros(1, 7, dtype=torch.float64), *(params[n].detach() if n in params else None
                                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), None,
                                params["weight_peephole"].detach())
    torch.testing.assert_close(h1, h1_r[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1, c1_r[0], rtol=1e-12, atol=1e-12)


def test_zero_peepholes_give_the_plain_layer_bit_for_bit():
    """p = 0 adds exact zeros: outputs and the other gradients are the plain layer's bits."""
    torch.manual_seed(7)
    plain = fused_rnn.LSTM(6, 20, 2, bidirectional=True)
    peephole = fused_rnn.LSTM(6, 20, 2, bidirectional=True, peephole=True)
    peephole.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in peephole.named_parameters():
            if "peephole" in name:
                p.zero_()
    x = torch.randn(9, 5, 6)
    out_p, grads_p = run(plain, x)
    out_q, grads_q = run(peephole, x)
    for a, b in zip(out_p + grads_p, out_q + grads_q[:len(grads_p)]):
        assert torch.equal(a, b)
    assert all(g.abs().sum() > 0 for g in grads_q[len(grads_p):])  # the peepholes still learn


def test_all_options_off_is_torch_nn():
    torch.manual_seed(8)
    ours = fused_rnn.LSTM(3, 4, 2, bidirectional=True)
    torch.manual_seed(8)
    theirs = nn.LSTM(3, 4, 2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert not ours.peephole and repr(ours) == repr(theirs)


def test_parameters_names_shapes_and_initialisation():
    torch.manual_seed(9)
    ours = fused_rnn.LSTM(3, 16, 2, bidirectional=True, proj_size=5, peephole=True)
    torch.manual_seed(9)
    theirs = nn.LSTM(3, 16, 2, bidirectional=True, proj_size=5)
    names = list(ours.state_dict())
    assert names[:len(theirs.state_dict())] == list(theirs.state_dict())
    assert names[len(theirs.state_dict()):] == ["weight_peephole_l0", "weight_peephole_l0_reverse",
                                                "weight_peephole_l1", "weight_peephole_l1_reverse"]
    for name, value in theirs.state_dict().items():  # torch.nn's parameters from the same seed
        assert torch.equal(ours.state_dict()[name], value)
    bound = 1 / math.sqrt(16)
    for name in names[len(theirs.state_dict()):]:
        p = getattr(ours, name)
        assert p.shape == (48,) and p.abs().max() <= bound and p.std() > bound / 4
    assert "peephole=True" in repr(ours)
    cell = fused_rnn.LSTMCell(3, 16, peephole=True)
    assert [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                      "weight_peephole"]
    assert cell.weight_peephole.shape == (48,)


def test_same_bits_for_any_number_of_threads():
    torch.manual_seed(10)
    fused = fused_rnn.LSTM(32, 200, 2, peephole=True)
    random_peepholes(fused)
    x = torch.randn(12, 9, 32)
    results = runs_at_thread_counts(fused, x, (1, 2, 3))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_gradcheck_and_double_backward():
    torch.manual_seed(11)
    fused = fused_rnn.LSTM(2, 3, 2, bidirectional=True, dtype=torch.float64, peephole=True)
    random_peepholes(fused)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in fused.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in fused.parameters())

    def f(x, *weights):
        y, (h, c) = torch.func.functional_call(fused, dict(zip(names, weights)), (x,))
        return y, h, c

    def of_peepholes(x, *peepholes):  # the other weights held fixed
        return f(x, *params[:-len(peepholes)], *peepholes)

    assert torch.autograd.gradcheck(f, (x,) + params)
    assert torch.autograd.gradgradcheck(of_peepholes, (x,) + params[-4:])


def test_torch_func_and_compile():
    torch.manual_seed(12)
    fused = fused_rnn.LSTM(3, 4, peephole=True, dtype=torch.float64)
    random_peepholes(fused)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    check_func_grad_and_export(fused, x)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x)[0], fused(x)[0], rtol=0, atol=0)


def test_an_optimizer_step_on_the_peepholes_is_seen():
    torch.manual_seed(13)
    fused = fused_rnn.LSTM(3, 4, peephole=True)
    x = torch.randn(5, 2, 3)
    before = fused(x)[0].detach()
    fused(x)[0].sum().backward()
    torch.optim.SGD([fused.weight_peephole_l0], lr=0.5).step()
    after = fused(x)[0].detach()
    ref = ReferenceLSTM(fused)
    torch.testing.assert_close(after, ref(x)[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(before, after)


def test_bad_arguments_and_unsupported_transforms():
    with pytest.raises(TypeError, match="peephole should be of type bool"):
        fused_rnn.LSTM(3, 4, peephole=1)
    with pytest.raises(TypeError, match="peephole should be of type bool"):
        fused_rnn.LSTMCell(3, 4, peephole="yes")
    for cls in (fused_rnn.GRU, fused_rnn.RNN):  # torch.nn's TypeError for an argument it does not take, and why
        with pytest.raises(TypeError, match="(?s)unexpected keyword argument 'peephole'.*are an LSTM's"):
            cls(3, 4, peephole=True)
    with pytest.raises(TypeError):
        fused_rnn.GRUCell(3, 4, peephole=True)
    lstm = fused_rnn.LSTM(3, 4, peephole=True)
    model = nn.Sequential(lstm)
    with pytest.raises(ValueError, match="peephole connections, zoneout, recurrent dropout or layer norm"):
        fused_rnn.convert(model, to="torch")
    assert type(lstm) is fused_rnn.LSTM
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a LSTM with peephole"):
        torch.jit.trace(lstm, (torch.randn(2, 1, 3),))
    cell = fused_rnn.LSTMCell(3, 4, peephole=True)
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a LSTMCell with peephole"):
        torch.jit.trace(cell, (torch.randn(2, 3),))


@cuda_half
@cpu_half
@pytest.mark.parametrize("persistent,unfused_backward", [("0", 0), ("0", 1), ("1", 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_cuda_path_matches_the_cpu(persistent, unfused_backward, dtype, exact_float32):
    """The CUDA kernels under the emulation (a launch per step or the persistent kernel; the fused or
    the unfused backward; the tensor cores for bfloat16), forward and backward, against the CPU half."""
    torch.manual_seed(14)
    fused = fused_rnn.LSTM(5, 24, 2, bidirectional=True, dtype=dtype, peephole=True)
    random_peepholes(fused)
    x = torch.randn(6, 3, 5, dtype=dtype)
    out_cpu, grads_cpu = run(fused, x)
    fused.zero_grad()
    with fused_rnn.overrides_set(cuda_persistent=persistent, cuda_unfused_backward=unfused_backward):
        with testing.emulate_cuda() as gpu:
            out_gpu, grads_gpu = run(fused, x)
            assert gpu.launches > 0
            kernel = "bfloat16" if dtype == torch.bfloat16 else "forward"  # the tensor cores' or the CUDA cores'
            takes_persistent = gpu.takes_persistent_kernel(kernel, "LSTM", 3, 24, dtype=dtype)
    assert takes_persistent == (persistent == "1")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert_close(out_gpu, out_cpu, tol, tol, "outputs")
    assert_close(grads_gpu, grads_cpu, tol, tol, "gradients")


@cuda_half
@cpu_half
def test_the_cuda_path_with_a_projection_and_packed_input():
    torch.manual_seed(15)
    fused = fused_rnn.LSTM(4, 9, proj_size=3, dtype=torch.float64, peephole=True)
    random_peepholes(fused)
    x = torch.randn(7, 4, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([7, 5, 5, 2]), enforce_sorted=False)
    for inputs in (x, packed):
        fused.zero_grad()
        out_cpu, grads_cpu = run(fused, inputs)
        fused.zero_grad()
        with testing.emulate_cuda():
            out_gpu, grads_gpu = run(fused, inputs)
        assert_close(out_gpu, out_cpu, 1e-10, 1e-10, "outputs")
        assert_close(grads_gpu, grads_cpu, 1e-10, 1e-10, "gradients")


@cpu_half
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(dynamo):
    """TorchScript-based exporter: ONNX's LSTM operator with its P input, a node per layer and direction,
    on any batch and length. torch.export-based exporter: the equations in standard operators."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(16)
    fused = fused_rnn.LSTM(3, 4, 2, bidirectional=True, batch_first=not dynamo, peephole=True).eval()
    random_peepholes(fused)
    x = torch.randn((2, 5, 3) if fused.batch_first else (5, 2, 3))
    hx = (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    model = onnx_bytes(fused, (x, hx), dynamo)
    nodes = [n for n in onnx.load_from_string(model).graph.node if n.op_type == "LSTM"]
    if dynamo:
        assert not nodes
    else:
        assert len(nodes) == 4 and all(len(n.input) == 8 and n.input[7] for n in nodes)  # P given
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = torch.randn((3, 7, 3) if fused.batch_first else (5, 3, 3))  # another batch (and length: TorchScript's)
    hx = (torch.randn(4, 3, 4), torch.randn(4, 3, 4))
    feeds = dict(zip([i.name for i in session.get_inputs()], (x.numpy(), hx[0].numpy(), hx[1].numpy())))
    got = session.run(None, feeds)
    want = torch.utils._pytree.tree_leaves(fused(x, hx))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w.detach(), rtol=1e-5, atol=1e-5)


@cpu_half
def test_onnx_export_of_a_peephole_cell_and_what_is_refused():
    import io
    import warnings
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(17)
    cell = fused_rnn.LSTMCell(3, 4, peephole=True)
    random_peepholes(cell)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(cell, (torch.randn(2, 3),), buffer, dynamo=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3)
    for g, w in zip(session.run(None, {session.get_inputs()[0].name: x.numpy()}), cell(x)):
        torch.testing.assert_close(torch.from_numpy(g), w.detach(), rtol=1e-5, atol=1e-5)
    lstm = fused_rnn.LSTM(3, 4, proj_size=2, peephole=True)
    with pytest.raises(NotImplementedError, match="proj_size cannot be exported to ONNX"):
        torch.onnx.export(lstm, (torch.randn(5, 2, 3),), io.BytesIO(), dynamo=False)
    packed = pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        torch.onnx.export(fused_rnn.LSTM(3, 4, peephole=True), (packed,), io.BytesIO(), dynamo=False)


def test_quantizing_a_peephole_layer_is_refused():
    """Neither int8 layer has peepholes: quantize_dynamic must not drop them silently."""
    for module in (fused_rnn.LSTM(3, 4, peephole=True), fused_rnn.LSTMCell(3, 4, peephole=True)):
        for dtype in (torch.qint8, torch.float16):
            with pytest.raises(NotImplementedError, match="recurrent dropout or layer norm cannot be dynamically"):
                torch.ao.quantization.quantize_dynamic(nn.Sequential(module), dtype=dtype)


@cpu_half
def test_autocast_and_whole_model_pickling(tmp_path):
    torch.manual_seed(18)
    fused = fused_rnn.LSTM(3, 8, peephole=True)
    random_peepholes(fused)
    x = torch.randn(5, 2, 3)
    want = fused(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x)[0]
    # the plain LSTM's autocast rule (functional._autocast_dtypes), the peepholes cast along
    plain = fused_rnn.LSTM(3, 8)
    plain.load_state_dict(fused.state_dict(), strict=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert got.dtype == plain(x)[0].dtype
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(fused), path)
    # fused_rnn's classes are allowed since `import fused_rnn` (and naming them here would take them
    # off torch's list again when the context ends)
    with torch.serialization.safe_globals([nn.Sequential]):
        loaded = torch.load(path)
    assert loaded[0].peephole and torch.equal(loaded[0](x)[0], want)
