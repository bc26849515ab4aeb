"""The int8 inference path (fused_rnn.quantized): its arithmetic against a reference written from
its definition, its accuracy against float32 and against torch's own int8 layers, and torch's
dynamic-quantization API around it (quantize_dynamic, from_float, state_dict, pickling, .to(),
convert)."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from fused_rnn import quantized

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")
CELL_ID = {"LSTM": 0, "GRU": 1}
FUSED = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU}
TORCH = {"LSTM": nn.LSTM, "GRU": nn.GRU}


def quantize(model, spec=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, spec, **kwargs)


def float_pair(cell, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = TORCH[cell](*args, **kwargs)
    fused = FUSED[cell](*args, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


# ------------------------------------------------------------------------------------------------
# The arithmetic, from its definition (csrc/cpu/quantized_cpu.cpp)
# ------------------------------------------------------------------------------------------------

def reference_quantize_rows(x):
    """Rows to 8 bits: range [min(0, lo), max(0, hi)] over 255 levels, zero point rounded."""
    lo = x.amin(1).clamp(max=0)
    hi = x.amax(1).clamp(min=0)
    scale = (hi - lo) / 255
    scale = torch.where(hi > lo, scale, torch.ones_like(scale))
    inverse = 1 / scale
    zero = torch.round(-lo * inverse).clamp(0, 255)
    q = (torch.round(x * inverse[:, None]) + zero[:, None]).clamp(0, 255)
    return q.to(torch.int64), scale, zero.to(torch.int64)


def reference_product(x, q_w, scale_w, row_sum, bias=None):
    q, scale, zero = reference_quantize_rows(x)
    sums = q @ q_w.to(torch.int64).t() - zero[:, None] * row_sum.to(torch.int64)[None, :]
    value, both = sums.to(torch.float32), scale[:, None] * scale_w[None, :]
    return torch.addcmul(bias.expand_as(value), value, both) if bias is not None else value * both


def unpacked(panels, gates, H, K):
    """The int8 matrix [gates·H, K] of weight panels, from their layout's definition
    (csrc/cpu/layer_cpu.h: pack_int8_panels): panels[i][j][4r + t] = q[g·H + 16m + r][4j + t],
    group i = g·⌈H/16⌉ + m."""
    rows, quad = fused_rnn._C.INT8_GROUP_ROWS, fused_rnn._C.INT8_QUAD
    groups, quads = -(-H // rows), -(-K // quad)
    q = panels.view(gates, groups, quads, rows, quad).permute(0, 1, 3, 2, 4).reshape(gates, groups * rows, quads * quad)
    return q[:, :H, :K].reshape(gates * H, K)


def reference_step(cell, x, h, c, weights):
    """One step with the kernel's quantization, the gate math in float32 by torch."""
    p_ih, s_ih, sum_ih, p_hh, s_hh, sum_hh, b_ih, b_hh = weights
    H, gates = h.size(1), 4 if cell == "LSTM" else 3
    q_ih, q_hh = unpacked(p_ih, gates, H, x.size(1)), unpacked(p_hh, gates, H, H)
    if cell == "LSTM":
        gates = reference_product(x, q_ih, s_ih, sum_ih, b_ih + b_hh) + reference_product(h, q_hh, s_hh, sum_hh)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    folded = b_ih.clone()
    folded[:2 * H] += b_hh[:2 * H]
    gx = reference_product(x, q_ih, s_ih, sum_ih, folded)
    gh = reference_product(h, q_hh, s_hh, sum_hh)
    r = torch.sigmoid(gx[:, :H] + gh[:, :H])
    z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
    n = torch.tanh(gx[:, 2 * H:] + r * (gh[:, 2 * H:] + b_hh[2 * H:]))
    return (1 - z) * n + z * h, None


def layer_weights(cell, I, H, seed=0):
    fused, _ = float_pair(cell, I, H, seed=seed)
    return quantized.LSTM.from_float(fused) if cell == "LSTM" else quantized.GRU.from_float(fused)


def op(cell, x, batch_sizes, reverse, h, c, weights):
    return torch.ops.fused_rnn.quantized_layer_forward(CELL_ID[cell], x, batch_sizes, reverse, h, c, *weights)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("B,I,H", [(1, 5, 3), (3, 37, 29), (8, 64, 128), (11, 200, 67), (2, 1, 1), (7, 20, 48),
                                   (13, 70, 16)])
def test_one_step_is_the_definition(cell, B, I, H):
    """Tails of every kind: K not a multiple of 4, 32 or 64; batch rows in tiles of 8, 4, 2 and 1;
    odd groups of weight rows, and groups cut short by a gate's end."""
    weights = layer_weights(cell, I, H)._layer_weights()[0]
    torch.manual_seed(1)
    x, h, c = torch.randn(B, I), torch.randn(B, H) * 0.7, torch.randn(B, H)
    y, h_n, c_n = op(cell, x, [], False, h, c if cell == "LSTM" else None, weights)
    want_h, want_c = reference_step(cell, x, h, c, weights)
    # The integers and the scaling are the reference's to the bit; only the float gate math differs.
    torch.testing.assert_close(y, want_h, rtol=0, atol=2e-6)
    torch.testing.assert_close(h_n, want_h, rtol=0, atol=2e-6)
    if cell == "LSTM":
        torch.testing.assert_close(c_n, want_c, rtol=0, atol=2e-6)


@pytest.mark.parametrize("gates,H,K", [(4, 3, 5), (3, 29, 37), (4, 32, 64), (1, 17, 1)])
def test_weight_panels_hold_the_weights_and_zeros(gates, H, K):
    """Every weight in its place, and nothing but zeros in the padding (past H in each gate's last
    group, past K in the last quad), which the kernel multiplies too."""
    torch.manual_seed(5)
    q = torch.randint(-128, 128, (gates * H, K), dtype=torch.int8)
    panels = torch.ops.fused_rnn.quantized_pack_weight(q, gates)
    rows, quad = fused_rnn._C.INT8_GROUP_ROWS, fused_rnn._C.INT8_QUAD
    groups, quads = -(-H // rows), -(-K // quad)
    assert panels.shape == (gates * groups, quads, fused_rnn._C.INT8_PANEL_BYTES) and panels.dtype == torch.int8
    assert torch.equal(unpacked(panels, gates, H, K), q)
    padded = torch.zeros(gates, groups * rows, quads * quad, dtype=torch.int8)
    padded[:, :H, :K] = q.view(gates, H, K)
    assert torch.equal(unpacked(panels, gates, groups * rows, quads * quad), padded.view(-1, quads * quad))
    with pytest.raises(RuntimeError, match="int8 CPU weight"):
        torch.ops.fused_rnn.quantized_pack_weight(q.float(), gates)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake:
        assert torch.ops.fused_rnn.quantized_pack_weight(fake.from_tensor(q), gates).shape == panels.shape


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("reverse", [False, True])
def test_a_sequence_is_its_steps(cell, reverse):
    """The whole sequence gives bitwise what one call per step gives, either direction."""
    weights = layer_weights(cell, 24, 40)._layer_weights()[0]
    T, B = 9, 3
    torch.manual_seed(2)
    x, h, c = torch.randn(T, B, 24), torch.randn(B, 40), torch.randn(B, 40)
    y, h_n, c_n = op(cell, x.reshape(T * B, 24), [], reverse, h, c if cell == "LSTM" else None, weights)
    state = (h, c if cell == "LSTM" else None)
    for t in (reversed(range(T)) if reverse else range(T)):
        y_t, h_t, c_t = op(cell, x[t], [], False, state[0], state[1], weights)
        assert torch.equal(y.view(T, B, 40)[t], y_t)
        state = (h_t, c_t if cell == "LSTM" else None)
    assert torch.equal(h_n, state[0])
    if cell == "LSTM":
        assert torch.equal(c_n, state[1])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_each_sequence_is_computed_on_its_own(cell):
    """Activations are quantized per row: a sequence gets bitwise the same outputs alone as in a
    packed batch of others, in both directions of a bidirectional two-layer model."""
    fused, _ = float_pair(cell, 12, 20, num_layers=2, bidirectional=True)
    q = quantize(nn.Sequential(fused), {FUSED[cell]})[0]
    torch.manual_seed(3)
    sequences = [torch.randn(n, 12) for n in (7, 3, 5, 1)]
    packed_out, packed_hidden = q(pack_sequence(sequences, enforce_sorted=False))
    outputs, lengths = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
    for k, seq in enumerate(sequences):
        alone, alone_hidden = q(seq.unsqueeze(1))
        assert torch.equal(outputs[:lengths[k], k], alone[:, 0])
        h_all = packed_hidden[0] if cell == "LSTM" else packed_hidden
        h_one = alone_hidden[0] if cell == "LSTM" else alone_hidden
        assert torch.equal(h_all[:, k], h_one[:, 0])


def test_threads_and_kernels_give_the_same_bits():
    """The same bits for 1 and 2 threads, and for every integer kernel this CPU has (VNNI, AVX2,
    scalar: the int8_kernel override, and the plan follows it)."""
    kernels = fused_rnn.override_choices()["int8_kernel"]
    assert "scalar" in kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        q = quantized.LSTM.from_float(fused_rnn.LSTM(70, 90, num_layers=2))
    x = torch.randn(13, 9, 70)
    results, planned = [], set()
    threads = torch.get_num_threads()
    try:
        for kernel in kernels:
            with fused_rnn.overrides_set(int8_kernel=kernel):
                planned.add(fused_rnn.cpu_plan("LSTM", batch=9, input_size=70, hidden_size=90, pass_="int8")["products"])
                for n in (1, 2):
                    torch.set_num_threads(n)
                    results.append(q(x)[0])
    finally:
        torch.set_num_threads(threads)
    assert len(planned) == len([k for k in kernels if k != "auto"])  # each choice is a kernel of its own
    for r in results[1:]:
        assert torch.equal(results[0], r)


def test_too_wide_for_int32_sums_is_refused():
    q = torch.ops.fused_rnn.quantized_layer_forward
    w_ih = torch.ops.fused_rnn.quantized_pack_weight(torch.zeros(3, 40000, dtype=torch.int8), 3)
    w_hh = torch.ops.fused_rnn.quantized_pack_weight(torch.zeros(3, 1, dtype=torch.int8), 3)
    scale, sums = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="at most 32768"):
        q(1, torch.zeros(2, 40000), [], False, torch.zeros(1, 1), None, w_ih, scale, sums, w_hh, scale, sums,
          None, None)


def test_non_finite_input_gives_nan_not_garbage():
    weights = layer_weights("GRU", 6, 5)._layer_weights()[0]
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    y, _, _ = op("GRU", x, [], False, torch.zeros(1, 5), None, weights)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()  # later steps carry the NaN on


# ------------------------------------------------------------------------------------------------
# Accuracy: against float32, and against torch's int8 layers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("B,H", [(1, 64), (4, 256), (8, 512), (2, 1024)])
def test_error_is_below_torchs_int8(cell, B, H):
    fused, ref = float_pair(cell, H, H)
    ours = quantize(nn.Sequential(fused))
    theirs = quantize(nn.Sequential(ref))
    assert type(ours[0]) is getattr(quantized, cell) and type(theirs[0]) is getattr(nnqd, cell)
    torch.manual_seed(4)
    x = torch.randn(30, B, H)
    with torch.no_grad():
        want = ref(x)[0]
        error = (ours(x)[0] - want).abs().max().item()
        torch_error = (theirs(x)[0] - want).abs().max().item()
    assert error <= torch_error and error < 2e-2, (error, torch_error)


# ------------------------------------------------------------------------------------------------
# torch's API: quantize_dynamic, from_float, state_dict, pickling, .to(), convert
# ------------------------------------------------------------------------------------------------

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.gru = nn.GRU(8, 5, bidirectional=True)
        self.cell = nn.LSTMCell(10, 4)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        h, _ = self.cell(y[-1])
        return self.head(y[-1]), h


@pytest.mark.parametrize("spec", [None, "torch types", "fused types", "dict"])
def test_quantize_dynamic_reaches_converted_layers(spec):
    torch.manual_seed(5)
    model = fused_rnn.convert(Model())
    specs = {None: None, "torch types": {nn.LSTM, nn.GRU, nn.LSTMCell, nn.Linear},
             "fused types": {fused_rnn.LSTM, fused_rnn.GRU, fused_rnn.LSTMCell, nn.Linear},
             "dict": {nn.LSTM: torch.ao.quantization.default_dynamic_qconfig,
                      nn.GRU: torch.ao.quantization.default_dynamic_qconfig,
                      nn.LSTMCell: torch.ao.quantization.default_dynamic_qconfig,
                      nn.Linear: torch.ao.quantization.default_dynamic_qconfig}}
    q = quantize(model, specs[spec])
    assert type(q.lstm) is quantized.LSTM and type(q.gru) is quantized.GRU
    assert type(q.cell) is nnqd.LSTMCell  # the cells have no int8 kernel of ours: torch's
    assert type(model.lstm) is fused_rnn.LSTM  # not in place: the float model is untouched
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        (out, h), (want_out, want_h) = q(x), model(x)
    torch.testing.assert_close(out, want_out, atol=5e-2, rtol=0)
    torch.testing.assert_close(h, want_h, atol=5e-2, rtol=0)


def test_quantize_dynamic_with_a_mapping_of_ones_own():
    model = fused_rnn.convert(nn.Sequential(nn.LSTM(4, 4)))
    mapping = {nn.Linear: nnqd.Linear}
    q = quantize(model, {nn.LSTM}, mapping=mapping)
    assert type(q[0]) is quantized.LSTM and mapping == {nn.Linear: nnqd.Linear}


def test_torch_nn_layers_still_get_torchs_modules():
    q = quantize(nn.Sequential(nn.LSTM(4, 4), nn.GRU(4, 4)))
    assert type(q[0]) is nnqd.LSTM and type(q[1]) is nnqd.GRU


def test_float16_gives_torchs_float16_layers():
    model = fused_rnn.convert(nn.Sequential(nn.LSTM(4, 6)))
    q = quantize(model, dtype=torch.float16)
    assert type(q[0]) is nnqd.LSTM and q[0].dtype == torch.float16
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(q[0](x)[0], model[0](x)[0], atol=1e-2, rtol=0)


def test_projection_is_refused_clearly():
    model = fused_rnn.convert(nn.Sequential(nn.LSTM(4, 6, proj_size=3)))
    with pytest.raises(NotImplementedError, match="proj_size"):
        quantize(model)


def test_no_bias():
    fused, ref = float_pair("GRU", 5, 7, bias=False)
    q = quantized.GRU.from_float(fused)
    x = torch.randn(4, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(q(x)[0], ref(x)[0], atol=2e-2, rtol=0)


def test_input_layouts_and_states():
    fused, ref = float_pair("LSTM", 5, 7, num_layers=2, batch_first=True, bidirectional=True)
    q = quantized.LSTM.from_float(fused)
    torch.manual_seed(6)
    x = torch.randn(3, 6, 5)
    hx = (torch.randn(4, 3, 7) * 0.5, torch.randn(4, 3, 7) * 0.5)
    with torch.no_grad():
        for args in ((x,), (x, hx)):
            out, (h, c) = q(*args)
            want, (want_h, want_c) = ref(*args)
            for got, exp in ((out, want), (h, want_h), (c, want_c)):
                torch.testing.assert_close(got, exp, atol=3e-2, rtol=0)
        # one unbatched sequence, as torch.nn takes it (torch's quantized layers do not)
        out, (h, c) = q(x[0], (hx[0][:, 0], hx[1][:, 0]))
        assert out.shape == (6, 14) and h.shape == (4, 7)
        assert torch.equal(out, q(x[:1], (hx[0][:, :1], hx[1][:, :1]))[0][0])
    assert not out.requires_grad


def test_state_dict_moves_between_ours_and_torchs():
    fused, ref = float_pair("LSTM", 6, 9, num_layers=2)
    ours = quantized.LSTM.from_float(fused)
    theirs = nnqd.LSTM(6, 9, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 6)
    with torch.no_grad():
        # torch's kernel on our per-row weights: close to ours (its activations are coarser)
        torch.testing.assert_close(theirs(x)[0], ours(x)[0], atol=3e-2, rtol=0)
        # and torch's per-tensor weights in ours: the very weights, so ours is close to theirs too
        back = quantized.LSTM(6, 9, num_layers=2)
        torch_made = quantize(nn.Sequential(ref))[0]
        back.load_state_dict(torch_made.state_dict())
        torch.testing.assert_close(back(x)[0], torch_made(x)[0], atol=3e-2, rtol=0)
        # load_state_dict replaces the weights our kernel caches
        before = ours(x)[0]
        ours.load_state_dict(torch_made.state_dict())
        assert torch.equal(ours(x)[0], back(x)[0]) and not torch.equal(before, ours(x)[0])


def test_pickle_deepcopy_and_to_behave_as_torchs():
    q = quantized.GRU.from_float(float_pair("GRU", 4, 6, num_layers=2)[0])
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        want = q(x)[0]
        for copied in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
            assert type(copied) is quantized.GRU and "_kernel_cache" not in copied.__dict__
            assert torch.equal(copied(x)[0], want)
        buffer = io.BytesIO()
        torch.save(q, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x)[0], want)
        # no parameters or buffers, as torch's: .to() and .double() change nothing
        assert list(q.parameters()) == [] and list(q.buffers()) == []
        assert torch.equal(q.to(torch.float64)(x)[0], want) and torch.equal(q.double()(x)[0], want)


def test_convert_swaps_quantized_layers_both_ways():
    model = quantize(nn.Sequential(nn.LSTM(4, 5), nn.GRU(5, 5)))
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        y_torch = model[1](model[0](x)[0])[0]
        fused_rnn.convert(model)
        assert type(model[0]) is quantized.LSTM and type(model[1]) is quantized.GRU
        y_ours = model[1](model[0](x)[0])[0]
        torch.testing.assert_close(y_ours, y_torch, atol=3e-2, rtol=0)
        fused_rnn.convert(model, to="torch")
        assert type(model[0]) is nnqd.LSTM and "_kernel_cache" not in model[0].__dict__
        assert torch.equal(model[1](model[0](x)[0])[0], y_torch)


def test_repr_names_the_fused_layer():
    q = quantized.LSTM.from_float(fused_rnn.LSTM(3, 4, num_layers=2))
    assert repr(q).startswith("FusedDynamicQuantizedLSTM(3, 4, num_layers=2")


@pytest.mark.parametrize("bad, error, torch_words", [
    (lambda x, h: (x.double(), None), RuntimeError, "expected scalar type Float but found Double"),
    (lambda x, h: (x[..., :3], None), RuntimeError, "input.size(-1) must be equal to input_size"),
    (lambda x, h: (x, (h[0][:1], h[1])), RuntimeError, "Expected hidden[0] size"),
    (lambda x, h: (x.unsqueeze(0), None), RuntimeError, "input must have 3 dimensions"),
])
def test_bad_input_gets_torchs_exception(bad, error, torch_words):
    q = quantized.LSTM.from_float(fused_rnn.LSTM(4, 5, num_layers=2))
    x = torch.randn(3, 2, 4)
    hx = (torch.zeros(2, 2, 5), torch.zeros(2, 2, 5))
    args = bad(x, hx)
    with pytest.raises(error) as info:
        q(*args)
    assert torch_words in str(info.value)


def test_from_float_refuses_other_modules():
    with pytest.raises(TypeError, match="from_float takes"):
        quantized.LSTM.from_float(nn.GRU(3, 3))


def test_the_op_passes_opcheck():
    weights = layer_weights("LSTM", 8, 6)._layer_weights()[0]
    x, h, c = torch.randn(10, 8), torch.randn(2, 6), torch.randn(2, 6)
    torch.library.opcheck(torch.ops.fused_rnn.quantized_layer_forward, (0, x, [], False, h, c, *weights),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_in_one_graph(backend):
    """torch.compile(fullgraph=True) holds the int8 op (its fake implementation gives the shapes), and
    gives eager's bits."""
    torch._dynamo.reset()
    q = quantized.GRU.from_float(float_pair("GRU", 4, 6, num_layers=2, bidirectional=True)[0])
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        want = q(x)
        got = torch.compile(q, fullgraph=True, backend=backend)(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
