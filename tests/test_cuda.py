"""The CUDA path against torch.nn with the same state_dict, on two devices:
 - a GPU ("gpu"): fused_rnn's kernels against cuDNN; skipped without a GPU and a CUDA build;
 - the emulation ("emulated", fused_rnn.testing.emulate_cuda()): the CUDA half's host code and kernels
   compiled for the CPU, run on CPU tensors against torch.nn on the CPU; in every CI run. Each such
   test also checks that kernels were launched (the CUDA path was taken).

Each module and its torch.nn twin come from tests/helpers.py (make_pair, run, check_parity), as in
the CPU suites. What is covered: parity of outputs, final states and every gradient in float32 (TF32
off on both sides), half types against a float32 reference, float64 gradcheck, bitwise
reproducibility, packed input, projection, bidirectional stacks, and hidden sizes that are not
multiples of the kernel's 32-unit tile; plus the three variants of the forward and the fused
backward step kernels (16 rows per block, and 4 or 1 with the reduction split across the warps;
chosen by a cost model, forced here through FUSED_RNN_CUDA_ROWS_PER_BLOCK; the backward's fused step
runs without a projection, with one the projection's pointwise kernel and cuBLAS products), weights
changed in place between calls (the gate-interleaved copy of W_hh must follow), the half types'
tensor-core kernel (16-unit, 16-row and 64-wide k tiles; one and four row tiles per block), and
float32 on the tensor cores in TF32 while torch.backends.cudnn.allow_tf32 is set. What only the GPU
can answer (speed, its memory ordering, the tensor cores' own order of summation) is in
bench/GPU_NOTES.md.
"""
import contextlib

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from fused_rnn import functional
from fused_rnn.testing import emulate_cuda
import helpers
from helpers import TOLERANCE, assert_close, check_parity, leaves, run, to_leaf

# Under the emulation a hidden size of 600 stands in as 128: on an H100 (the emulated GPU) the cost
# model picks the same variants for both at a batch of LARGE_BATCH rows (the test
# test_the_emulated_stand_in_takes_the_variants_of_the_large_layer checks it), for a twentieth of
# the emulation's time.
LARGE_HIDDEN = {"cuda": 600, "cpu": 128}
LARGE_BATCH = 261
LAYERS = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]


@pytest.fixture(params=["gpu", "emulated"])
def dev(request):
    """Where the CUDA path runs: "cuda" on a GPU, or "cpu" under the emulation (which must launch)."""
    if request.param == "gpu":
        if not torch.cuda.is_available() or not fused_rnn.built_with_cuda:
            pytest.skip("needs a CUDA GPU and a CUDA build of fused_rnn")
        yield "cuda"
        return
    with emulate_cuda() as gpu:
        request.node.cuda_emulation = gpu
        yield "cpu"
    if request.node.get_closest_marker("launches_nothing") is None:
        assert gpu.launches > 0, "the CUDA path was not taken"


@pytest.fixture
def emulation(dev, request):
    """The emulation's handle (its launch count) on the emulated device; None on a GPU."""
    return getattr(request.node, "cuda_emulation", None)


def launches(emulation, fn):
    """fn()'s kernel launches under the emulation (None on a GPU, which does not count them here)."""
    before = emulation.launches if emulation is not None else None
    fn()
    return None if emulation is None else emulation.launches - before


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 matrix products on both sides (cuDNN and cuBLAS would otherwise use TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_pair(dev, kind, *args, dtype=torch.float32, seed=0, **kwargs):
    """helpers.make_pair on `dev`, in float32 unless said, from torch.manual_seed(seed) on (so that
    the inputs a test draws after it are the same on every run)."""
    torch.manual_seed(seed)
    return helpers.make_pair(kind, *args, dtype=dtype, device=dev, **kwargs)


def state_for(dev, kind, layers_dirs, batch, hidden, proj=0, scale=1.0):
    out = proj or hidden
    h = torch.randn(layers_dirs, batch, out, device=dev) * scale
    if kind == "LSTM":
        return h, torch.randn(layers_dirs, batch, hidden, device=dev) * scale
    return h


# --- float32 parity -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_parity_float32(dev, kind, batch_first, with_state):
    T, B, I, H = 5, 3, 4, 6
    fused, ref = make_pair(dev, kind, I, H, batch_first=batch_first)
    x = torch.randn(B, T, I, device=dev) if batch_first else torch.randn(T, B, I, device=dev)
    hx = state_for(dev, kind, 1, B, H) if with_state else None
    check_parity(fused, ref, x, hx)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("hidden", [1, 7, 33, 100, 257])
def test_hidden_size_sweep(dev, kind, hidden):
    """Sizes around the 32-unit tile and the 32-wide k chunk (P = H), partial tiles included."""
    T, B, I = 3, 5, 6
    fused, ref = make_pair(dev, kind, I, hidden)
    check_parity(fused, ref, torch.randn(T, B, I, device=dev), state_for(dev, kind, 1, B, hidden))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH"])
def test_large_batch_four_rows_per_thread(dev, kind):
    """A batch the cost model gives 16-row blocks (four rows per thread), not a multiple of 16."""
    # On a GPU 19 unit tiles x 17 row tiles, more blocks than an H100 has SMs; emulated, 4 x 17.
    T, B, I, H = 3, LARGE_BATCH, 8, LARGE_HIDDEN[dev]
    fused, ref = make_pair(dev, kind, I, H)
    check_parity(fused, ref, torch.randn(T, B, I, device=dev) * 0.5, state_for(dev, kind, 1, B, H, scale=0.5),
                 tol=(1e-5, 2e-5))


def test_the_emulated_stand_in_takes_the_variants_of_the_large_layer():
    """LARGE_HIDDEN's stand-in covers under the emulation what the large layer runs on a GPU: at
    LARGE_BATCH rows the cost model picks the same variant for both hidden sizes, in the forward
    and the fused backward on the CUDA cores and on the tensor cores (whichever those are)."""
    with emulate_cuda() as gpu:
        for kernel in ("forward", "backward", "tensor_core"):
            for cell in ("LSTM", "GRU", "RNN_TANH"):
                picks = [gpu.chosen_rows_per_block(kernel, cell, LARGE_BATCH, LARGE_HIDDEN[d]) for d in ("cuda", "cpu")]
                assert picks[0] == picks[1], (kernel, cell, picks)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells(dev, kind):
    fused, ref = make_pair(dev, kind, 4, 9)
    x = torch.randn(3, 4, device=dev)
    hx = (torch.randn(3, 9, device=dev), torch.randn(3, 9, device=dev)) if kind == "LSTMCell" \
        else torch.randn(3, 9, device=dev)
    check_parity(fused, ref, x, hx)


@pytest.mark.parametrize("hidden,proj", [(6, 3), (33, 7), (40, 39)])
def test_projection(dev, hidden, proj):
    T, B, I = 4, 3, 5
    fused, ref = make_pair(dev, "LSTM", I, hidden, proj_size=proj)
    check_parity(fused, ref, torch.randn(T, B, I, device=dev), state_for(dev, "LSTM", 1, B, hidden, proj))


@pytest.mark.parametrize("kind", LAYERS)
def test_bidirectional_two_layers(dev, kind):
    T, B, I, H = 4, 3, 5, 7
    fused, ref = make_pair(dev, kind, I, H, num_layers=2, bidirectional=True)
    check_parity(fused, ref, torch.randn(T, B, I, device=dev), state_for(dev, kind, 4, B, H))


def test_projection_bidirectional_two_layers(dev):
    T, B, I, H, P = 4, 3, 5, 8, 3
    fused, ref = make_pair(dev, "LSTM", I, H, num_layers=2, bidirectional=True, proj_size=P)
    check_parity(fused, ref, torch.randn(T, B, I, device=dev), state_for(dev, "LSTM", 4, B, H, P))


def packed_input(dev, features, lengths=(5, 2, 4, 1, 4), dtype=torch.float32):
    seqs = [torch.randn(n, features, dtype=dtype, device=dev) for n in lengths]
    return pack_sequence(seqs, enforce_sorted=False)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted(dev, kind, bidirectional):
    I, H = 4, 6
    fused, ref = make_pair(dev, kind, I, H, bidirectional=bidirectional)
    x = packed_input(dev, I)
    hx = state_for(dev, kind, 2 if bidirectional else 1, 5, H)
    check_parity(fused, ref, x, hx)


def test_packed_projection_bidirectional(dev):
    I, H, P = 4, 9, 5
    fused, ref = make_pair(dev, "LSTM", I, H, proj_size=P, bidirectional=True, num_layers=2)
    check_parity(fused, ref, packed_input(dev, I), state_for(dev, "LSTM", 4, 5, H, P))


@pytest.mark.parametrize("kind", LAYERS)
def test_unfused_backward_on_request(dev, kind):
    """FUSED_RNN_CUDA_UNFUSED_BACKWARD=1: the cell kernel and cuBLAS per step give the same
    gradients, packed and bidirectional (and the fused path again once the override is back at 0)."""
    I, H = 4, 40
    fused, ref = make_pair(dev, kind, I, H, bidirectional=True)
    x, hx = packed_input(dev, I), state_for(dev, kind, 2, 5, H)
    fused_rnn.set_overrides(cuda_unfused_backward=1)
    check_parity(fused, ref, x, hx)
    fused_rnn.set_overrides(cuda_unfused_backward=0)
    check_parity(fused, ref, x, hx)


@pytest.mark.parametrize("rows", [16, 4, 1], ids=["16_rows", "4_rows_split_k", "1_row_split_k"])
@pytest.mark.parametrize("kind", LAYERS)
def test_every_step_kernel_variant(dev, kind, rows):
    """FUSED_RNN_CUDA_ROWS_PER_BLOCK forces each variant of the forward and the fused backward (the
    split ones add the warps' partial sums in shared memory), packed and bidirectional, with more
    than one k chunk; and the model's own pick again once the override is back at 0."""
    I, H = 4, 70
    fused, ref = make_pair(dev, kind, I, H, bidirectional=True)
    x, hx = packed_input(dev, I), state_for(dev, kind, 2, 5, H)
    fused_rnn.set_overrides(cuda_persistent=0)
    fused_rnn.set_overrides(cuda_rows_per_block=rows)
    check_parity(fused, ref, x, hx)
    fused_rnn.set_overrides(cuda_rows_per_block=0)
    check_parity(fused, ref, x, hx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", LAYERS)
def test_persistent_kernels(dev, emulation, kind, dtype):
    """FUSED_RNN_CUDA_PERSISTENT=1: the forward and the backward each in one cooperative launch
    (W_hh's slices resident in shared memory, a grid barrier a step), packed and bidirectional, a
    batch of 100 (the override lifts the default's batch rule), every output and gradient, and
    bitwise the same on a second run. Under the emulation: 8 launches for the 2 layers' 2
    directions, forward and backward (a launch a step would be 56)."""
    I, H = 4, 70
    fused, ref = make_pair(dev, kind, I, H, bidirectional=True, num_layers=2, dtype=dtype)
    fused_rnn.set_overrides(cuda_persistent=1)
    hx = to_leaf(state_for(dev, kind, 4, 5, H), dtype)
    check_parity(fused, ref, packed_input(dev, I, dtype=dtype), hx)
    x = torch.randn(7, 100, I, device=dev, dtype=dtype)
    check_parity(fused, ref, x)
    runs = []
    assert launches(emulation, lambda: runs.append(run(fused, x))) in (None, 8)
    first, again = runs[0], run(fused, x)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))


@pytest.mark.parametrize("kind", LAYERS)
def test_tf32_as_cudnn(dev, kind):
    """torch.backends.cudnn.allow_tf32 set: float32's recurrent product runs on the tensor cores in
    TF32, as cuDNN's does; its outputs then differ from the exact ones, by about TF32's rounding,
    and come back bit for bit once the flag is off again."""
    T, B, I, H = 20, 9, 16, 70
    fused, _ = make_pair(dev, kind, I, H)
    x = torch.randn(T, B, I, device=dev)
    exact, _ = run(fused, x)
    reference, _ = run(fused.to(torch.float64), x.double())
    fused.float()
    torch.backends.cudnn.allow_tf32 = True
    try:
        tf32, _ = run(fused, x)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    again, _ = run(fused, x)
    assert all(torch.equal(a, e) for a, e in zip(again, exact))
    assert any(not torch.equal(a, e) for a, e in zip(tf32, exact)), "TF32 was not taken"
    for a, r in zip(tf32, reference):
        torch.testing.assert_close(a.double(), r, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("kind,proj", [("LSTM", 0), ("LSTM", 3), ("GRU", 0), ("RNN_RELU", 0)])
def test_inference_without_saved(dev, kind, proj):
    """No gradient wanted: the loop runs without `saved` (the projection input goes to scratch)."""
    kwargs = dict(proj_size=proj) if proj else {}
    fused, ref = make_pair(dev, kind, 4, 6, num_layers=2, **kwargs)
    x = torch.randn(5, 3, 4, device=dev)
    with torch.no_grad():
        out_f, out_r = fused(x), ref(x)
    assert_close(leaves(out_f), leaves(out_r), *TOLERANCE[torch.float32], "output")


@pytest.mark.parametrize("kind", LAYERS)
def test_weights_changed_in_place_between_calls(dev, kind):
    """The kernel reads a gate-interleaved copy of W_hh made on every call: after in-place updates
    (under no_grad, through .data, by an optimizer step) the outputs and gradients follow the new
    weights, as cuDNN's do."""
    T, B, I, H = 4, 3, 5, 40
    fused, ref = make_pair(dev, kind, I, H)
    x = torch.randn(T, B, I, device=dev)

    def check_against_reloaded_reference():
        ref.load_state_dict(fused.state_dict())
        fused.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        check_parity(fused, ref, x)

    check_against_reloaded_reference()
    w_hh = fused.weight_hh_l0
    before = w_hh.detach().clone()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    check_against_reloaded_reference()
    for p in fused.parameters():
        p.data.copy_(torch.randn_like(p) * 0.1)
    check_against_reloaded_reference()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.01)  # gradients from the last check
    optimizer.step()
    check_against_reloaded_reference()
    assert not torch.equal(w_hh.detach(), before), "the test must change W_hh"


# --- half types against a float32 reference ---------------------------------------------------------

def rel_err(a, e):
    a, e = a.double(), e.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-12)).item()


def compare_half_with_float32(dev, kind, dtype, x, hx, *args, **kwargs):
    """A half-type module within 1e-2 relative (in norm) of a float32 torch.nn run on the same
    rounded weights, inputs (x, hx: given in the half type) and loss weights; every output and
    gradient in the half type.

    The recurrent product runs on the tensor cores with h_{t-1} rounded to the half type, so a
    pre-activation within that rounding of 0 can flip relu's gradient (a whole dL/dh element):
    for RNN_RELU only the outputs are compared (as test_ecosystem does for torch.nn's bfloat16)."""
    fused, ref = make_pair(dev, kind, *args, dtype=dtype, ref_dtype=torch.float32, **kwargs)
    out_f, grad_f = run(fused, x, hx, loss_dtype=dtype)
    out_r, grad_r = run(ref, x, hx, dtype=torch.float32, loss_dtype=dtype)
    for what, fs, rs in (("output", out_f, out_r), ("grad", grad_f, grad_r)):
        assert len(fs) == len(rs)
        for i, (f, r) in enumerate(zip(fs, rs)):
            assert f.dtype == dtype, f"{what}[{i}] has dtype {f.dtype}"
            if what == "grad" and kind == "RNN_RELU":
                continue
            assert rel_err(f, r) < 1e-2, f"{what}[{i}]: relative error {rel_err(f, r):.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kwargs", [
    ("LSTM", {}), ("GRU", {}), ("RNN_TANH", {}), ("RNN_RELU", {}),
    ("LSTM", dict(proj_size=4, bidirectional=True)),
])
def test_half_types(dev, dtype, kind, kwargs):
    T, B, I, H = 6, 4, 5, 12
    compare_half_with_float32(dev, kind, dtype, torch.randn(T, B, I, device=dev).to(dtype), None, I, H, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("batch", [1, 8, 33])
@pytest.mark.parametrize("hidden", [16, 128, 12, 70])
def test_half_tensor_core_tiles(dev, dtype, kind, batch, hidden):
    """The tensor-core kernel's tiles (16 units, 16 rows, k in chunks of 64) with hidden sizes that
    are multiples of 16 (one k chunk, two) and that are not (a partial unit tile; two k chunks, the
    second partial), batches of one row, a partial row tile and three row tiles; initial state given."""
    T, I = 4, 10
    x = torch.randn(T, batch, I, device=dev).to(dtype)
    hx = to_leaf(state_for(dev, kind, 1, batch, hidden), dtype)
    compare_half_with_float32(dev, kind, dtype, x, hx, I, hidden)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kwargs,shape", [
    ("LSTM", dict(proj_size=20), (4, 9, 6, 33)),            # P = 20: a partial k chunk, P != H
    ("GRU", dict(bidirectional=True, num_layers=2), (5, 8, 6, 24)),
    ("LSTM", {}, (3, LARGE_BATCH, 8, "large")),      # 38 unit tiles x 5 row tiles of 64: four row tiles per block
    ("GRU", {}, (3, LARGE_BATCH, 8, "large")),
    ("RNN_TANH", {}, (3, LARGE_BATCH, 8, "large")),
])
def test_half_tensor_core_layers(dev, dtype, kind, kwargs, shape):
    T, B, I, H = shape
    H = LARGE_HIDDEN[dev] if H == "large" else H
    x = (torch.randn(T, B, I, device=dev) * 0.5).to(dtype)
    compare_half_with_float32(dev, kind, dtype, x, None, I, H, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_half_packed(dev, dtype, kind):
    I, H = 4, 20
    x = packed_input(dev, I, dtype=dtype)
    hx = to_leaf(state_for(dev, kind, 2, 5, H), dtype)
    compare_half_with_float32(dev, kind, dtype, x, hx, I, H, bidirectional=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"])
@pytest.mark.parametrize("kind", LAYERS)
def test_persistent_tensor_cores(dev, emulation, dtype, kind):
    """The persistent forward on the tensor cores (FUSED_RNN_CUDA_PERSISTENT=1) gives the per-step
    tensor-core kernel's bits (the same k order and roundings), packed and bidirectional, a batch
    of two 16-row passes; within the half types' bounds of float32 (compare_half_with_float32).
    Under the emulation: one launch a direction and call, 4 in all (a launch a step: 28)."""
    I, H, tf32 = 6, 70, dtype == "tf32"
    module_dtype = torch.float32 if tf32 else dtype
    fused, _ = make_pair(dev, kind, I, H, bidirectional=True, dtype=module_dtype)
    x = torch.randn(9, 20, I, device=dev).to(module_dtype)
    packed = packed_input(dev, I, dtype=module_dtype)
    runs, counts = {}, {}
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        for choice in ("0", "1"):
            fused_rnn.set_overrides(cuda_persistent=choice)

            def forward():
                with torch.no_grad():
                    runs[choice] = [fused(x)[0], fused(packed)[0].data]
            counts[choice] = launches(emulation, forward)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    assert all(torch.equal(a, b) for a, b in zip(runs["0"], runs["1"]))
    assert emulation is None or (counts["0"], counts["1"]) == (28, 4), counts
    if not tf32:
        fused_rnn.set_overrides(cuda_persistent=1)
        compare_half_with_float32(dev, kind, dtype, x[:, :8], None, I, H)


# --- float64 gradcheck on the CUDA path ----------------------------------------------------------------

@pytest.mark.parametrize("kind,reverse,proj,batch_sizes", [
    ("LSTM", False, 0, [3, 3, 3]),
    ("LSTM", True, 0, [3, 2, 2, 1]),
    ("LSTM", False, 2, [3, 2, 1]),
    ("LSTM", True, 2, [3, 3, 1]),
    ("GRU", False, 0, [3, 2, 2, 1]),
    ("GRU", True, 0, [3, 2, 1]),
    ("RNN_TANH", False, 0, [3, 2, 1]),
    ("RNN_TANH", True, 0, [2, 2, 1]),
    ("RNN_RELU", False, 0, [3, 2, 1]),
])
def test_gradcheck_float64(dev, kind, reverse, proj, batch_sizes):
    cell = functional.CELL_IDS[kind]
    G = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    I, H, B, N = 3, 4, batch_sizes[0], sum(batch_sizes)
    P = proj or H
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return (torch.rand(*shape, dtype=torch.float64, device=dev, generator=gen) - 0.5).requires_grad_()

    x, h0 = rand(N, I), rand(B, P)
    c0 = rand(B, H) if kind == "LSTM" else None
    w_ih, w_hh, b_ih, b_hh = rand(G * H, I), rand(G * H, P), rand(G * H), rand(G * H)
    w_hr = rand(P, H) if proj else None
    if kind == "RNN_RELU":  # keep pre-activations away from the kink for finite differences
        with torch.no_grad():
            b_ih.add_(0.6)

    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        y, h, c = functional.layer(cell, x, batch_sizes, reverse, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        return (y, h, c) if kind == "LSTM" else (y, h)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))


# --- reproducibility ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,kwargs,shape", [
    ("LSTM", dict(num_layers=2, bidirectional=True), (6, 8, 10, 40)),
    ("LSTM", dict(proj_size=17), (4, 5, 10, 70)),
    ("GRU", {}, (5, LARGE_BATCH, 16, "large")),   # four rows per thread (float32), four row tiles per block (half)
    ("RNN_TANH", dict(bidirectional=True), (6, 8, 10, 33)),
])
def test_bitwise_reproducible(dev, kind, kwargs, shape, dtype):
    """Two runs give the same bits. The emulation runs a grid's blocks in a fixed order, so there
    the second run takes them in the opposite one: a block that depended on another of its launch
    would see other values."""
    T, B, I, H = shape
    H = LARGE_HIDDEN[dev] if H == "large" else H
    fused, _ = make_pair(dev, kind, I, H, dtype=dtype, **kwargs)
    x = (torch.randn(T, B, I, device=dev) * 0.5).to(dtype)
    runs = []
    for blocks_descending in (False, True):
        fused.zero_grad(set_to_none=True)
        with emulate_cuda(blocks_descending=True) if dev == "cpu" and blocks_descending else contextlib.nullcontext():
            runs.append(run(fused, x))
    (out1, grad1), (out2, grad2) = runs
    for what, a, b in (("output", out1, out2), ("grad", grad1, grad2)):
        for i, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), f"{what}[{i}] differs between two identical runs"


# --- what the CUDA path does not do ------------------------------------------------------------------

@pytest.mark.launches_nothing
def test_complex_rejected_on_cuda(dev):
    m = fused_rnn.LSTM(3, 4, dtype=torch.complex64, device=dev)
    with pytest.raises(RuntimeError, match="complex inputs are not supported on CUDA"):
        m(torch.randn(2, 1, 3, dtype=torch.complex64, device=dev))
