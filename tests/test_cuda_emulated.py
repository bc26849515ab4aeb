"""The CUDA half of the ops against the CPU half, op by op, under fused_rnn.testing.emulate_cuda().

No GPU needs to be at hand: the emulation compiles the CUDA half's host code (csrc/cuda/ops_cuda.cpp)
and its step loops and kernels (csrc/cuda/*.cu) for the CPU, over a small emulation of CUDA's
threads (fibers), blocks, shared memory, barriers, cooperative grids and the tensor cores'
warp-wide instructions (csrc/cuda_emulation/). Each test calls torch.ops.fused_rnn.layer_forward and
layer_backward twice with the same arguments: on the CPU half (itself checked against torch.nn in
test_parity.py) and, under the emulation, on the CUDA half, host code and all (the input
projection with the folded biases and GRU's b_hn, the choice of loop and kernel, the step tables,
the products of the gate gradients after the backward loop). The CUDA half is steered with a GPU's
own knobs: FUSED_RNN_CUDA_ROWS_PER_BLOCK (a variant of the step kernels: 16 rows a block, 4 and 1
with the reduction split across the warps), FUSED_RNN_CUDA_PERSISTENT, FUSED_RNN_CUDA_UNFUSED_BACKWARD
and torch.backends.cudnn.allow_tf32; and the launches counted tell which loop ran (a persistent
kernel is one cooperative launch a layer, the per-step kernels one launch a step).

The shapes cover partial unit tiles, several row tiles, more than one reduction chunk, packed
sequences in both directions (steps that grow, shrink and empty), the projection, missing output
gradients, inference without saved values, and outputs read through a row stride (the half types'
float32 copy in `saved`). Every result must also be bitwise the same across runs and with the
grid's blocks run in the opposite order. The tensor-core forward (float16, bfloat16, and float32 as
TF32) is checked against the CPU op on the same rounded values. The choices of variant and of
the persistent kernels are held to their properties (a pick is a variant and runs; chosen => fits).

Not covered here: speed, and everything the GPU itself adds (bench/GPU_NOTES.md); tests/test_cuda.py
checks whole modules on the CUDA path against torch.nn, on a GPU and under the emulation.
"""
import contextlib
import os

import pytest
import torch

import fused_rnn
from fused_rnn import _ops  # loads the extension, which registers torch.ops.fused_rnn
from fused_rnn import testing
from fused_rnn.testing import emulate_cuda

# The CPU half is the reference here: with the emulation on for the whole process there is none.
pytestmark = pytest.mark.skipif(testing.emulating_cuda(), reason="FUSED_RNN_EMULATE_CUDA=1 leaves no CPU half")

CELLS = _ops.CELL_IDS  # the ops' cell ids, and per id the cells' kGates and kSaved (csrc/cells.h)
LAYOUTS = {
    "padded": [18, 18, 18, 18],
    "packed": [18, 13, 13, 5, 1],
    "trailing_empty_steps": [6, 3, 0, 0],
}
# Rows per block of each variant (FUSED_RNN_CUDA_ROWS_PER_BLOCK), or 0: the cost model's choice.
# CUDA cores: 16 rows (4 per warp), 4 and 1 row with the k chunks split across the warps.
MODEL, CUDA_CORE_ROWS, TENSOR_CORE_ROWS = 0, [16, 4, 1], [64, 16]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
FORWARD_NAMES = ["y", "h_n", "c_n", "saved"]
GRAD_NAMES = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]


@contextlib.contextmanager
def environment(**values):
    """The CUDA overrides named by their variables (FUSED_RNN_CUDA_*), set for the duration (None:
    the default) through fused_rnn.overrides_set, which the emulated CUDA half reads per call."""
    defaults = {"cuda_persistent": "auto", "cuda_rows_per_block": 0, "cuda_unfused_backward": 0}
    overrides = {}
    for variable, value in values.items():
        name = variable[len("FUSED_RNN_"):].lower()
        overrides[name] = defaults[name] if value is None else value
    with fused_rnn.overrides_set(**overrides):
        yield


@contextlib.contextmanager
def cuda_path(rows=MODEL, persistent=False, fuse=True, **gpu):
    """The emulated CUDA path, with the variant of `rows` rows a block (0: the cost model's), the
    persistent kernels wherever they can run (else never), the fused or unfused backward."""
    with environment(FUSED_RNN_CUDA_ROWS_PER_BLOCK=rows or None, FUSED_RNN_CUDA_PERSISTENT=int(persistent),
                     FUSED_RNN_CUDA_UNFUSED_BACKWARD=None if fuse else 1), emulate_cuda(**gpu) as emulation:
        yield emulation


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 exactly (the tests that take TF32 set it themselves)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


class Layer:
    """Random weights, inputs, state and output gradients of one layer and direction, and the two
    ops called on them (on the CPU half, or on the CUDA half inside cuda_path())."""

    def __init__(self, kind, batch_sizes, hidden=37, proj=0, inputs=5, dtype=torch.float64, seed=0):
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape, scale=0.5):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

        G, H, P = _ops.GATES[CELLS[kind]], hidden, proj or hidden
        N, B = sum(batch_sizes), batch_sizes[0]
        self.kind, self.cell, self.batch_sizes, self.H, self.P = kind, CELLS[kind], batch_sizes, H, P
        k = H ** -0.5  # torch.nn's scale: the recurrence neither explodes nor amplifies roundings
        self.w_ih, self.w_hh = rand(G * H, inputs, scale=k), rand(G * H, P, scale=k)
        self.b_ih, self.b_hh = rand(G * H, scale=k), rand(G * H, scale=k)
        self.w_hr = rand(P, H, scale=k) if proj else None
        self.x, self.h0 = rand(N, inputs), rand(B, P)
        self.c0 = rand(B, H) if kind == "LSTM" else None
        self.dy, self.dh_n = rand(N, P), rand(B, P)
        self.dc_n = rand(B, H) if kind == "LSTM" else None

    def tensors(self):
        return [self.x, self.h0, self.c0, self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr]

    def to(self, convert):
        """A copy with every tensor passed through convert."""
        other = object.__new__(Layer)
        other.__dict__.update({k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})
        return other

    def forward(self, reverse, need_saved=True):
        return torch.ops.fused_rnn.layer_forward(self.cell, self.x, self.batch_sizes, reverse, self.h0, self.c0,
                                                 self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr, need_saved)

    def backward(self, reverse, y, saved, with_dy=True):
        return torch.ops.fused_rnn.layer_backward(
            self.cell, self.x, self.batch_sizes, reverse, self.h0, self.c0, self.w_ih, self.w_hh, self.w_hr, True,
            y, saved, self.dy if with_dy else None, self.dh_n, self.dc_n, True)

    def steps(self):
        """Steps with rows: the per-step loops' launches."""
        return sum(n > 0 for n in self.batch_sizes)


def assert_close_all(actual, expected, names, tol):
    for name, a, e in zip(names, actual, expected):
        if e is None or e.numel() == 0:
            assert a is None or a.numel() == 0, f"{name}: expected nothing"
            continue
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{name}: {m}")


def check_layer(layer, reverse, rows=MODEL, persistent=False, fuse=True, with_dy=True):
    """The CUDA half's forward and backward against the CPU half's, and one launch a step (or one
    a layer for the persistent kernels). The backward takes the CPU half's y and saved: the two
    halves lay `saved` out alike (layer.h), which the forward's comparison checks."""
    tol = TOL[layer.x.dtype]
    expected = layer.forward(reverse)
    with cuda_path(rows, persistent, fuse) as gpu:
        actual = layer.forward(reverse)
    assert_close_all(actual, expected, FORWARD_NAMES, tol)
    assert gpu.launches == (1 if persistent else layer.steps()), gpu.launches
    y, saved = expected[0], expected[3]
    with cuda_path(rows, persistent, fuse) as gpu:
        grads = layer.backward(reverse, y, saved, with_dy)
    assert_close_all(grads, layer.backward(reverse, y, saved, with_dy), GRAD_NAMES, tol)
    assert gpu.launches == (1 if persistent and fuse else layer.steps()), gpu.launches


@pytest.mark.parametrize("rows", [MODEL] + CUDA_CORE_ROWS, ids=["model"] + [f"{r}_rows" for r in CUDA_CORE_ROWS])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_cuda_half_matches_the_cpu_half(kind, layout, reverse, rows):
    check_layer(Layer(kind, LAYOUTS[layout]), reverse, rows)


@pytest.mark.parametrize("rows", CUDA_CORE_ROWS, ids=[f"{r}_rows" for r in CUDA_CORE_ROWS])
@pytest.mark.parametrize("hidden", [1, 32, 70])
@pytest.mark.parametrize("kind", list(CELLS))
def test_hidden_sizes_around_the_tiles(kind, hidden, rows):
    """One unit, exactly one 32-unit tile, and three tiles with more than eight 32-row chunks of G*H."""
    for reverse in (False, True):
        check_layer(Layer(kind, LAYOUTS["packed"], hidden=hidden, seed=hidden), reverse, rows)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_float32(kind, layout):
    for reverse in (False, True):
        layer = Layer(kind, LAYOUTS[layout], dtype=torch.float32, seed=3)
        for rows in CUDA_CORE_ROWS:
            check_layer(layer, reverse, rows)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_unfused_backward(kind, layout, reverse):
    """FUSED_RNN_CUDA_UNFUSED_BACKWARD's path: the cell backward kernel and the dh product apart."""
    check_layer(Layer(kind, LAYOUTS[layout], seed=19), reverse, fuse=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lstm_projection(layout, reverse):
    """proj_size: the forward kernel writes o*tanh(c_t) for W_hr; backward takes the unfused path."""
    check_layer(Layer("LSTM", LAYOUTS[layout], hidden=37, proj=6, seed=5), reverse)


@pytest.mark.parametrize("kind", list(CELLS))
def test_gradient_of_the_final_state_only(kind):
    """No gradient of the outputs (dy undefined): only h_n (and c_n) carry one."""
    for reverse in (False, True):
        check_layer(Layer(kind, LAYOUTS["packed"], seed=7), reverse, with_dy=False)


@pytest.mark.parametrize("persistent", [False, True], ids=["per_step", "persistent"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_inference_without_saved_values(kind, persistent):
    """need_saved=False: nothing saved; with a projection o*tanh(c_t) goes to a scratch buffer."""
    for proj in (0, 4):
        if proj and (kind != "LSTM" or persistent):
            continue
        layer = Layer(kind, LAYOUTS["packed"], proj=proj, seed=11)
        expected = layer.forward(True, need_saved=False)
        with cuda_path(persistent=persistent):
            actual = layer.forward(True, need_saved=False)
        assert_close_all(actual[:3], expected[:3], FORWARD_NAMES, TOL[torch.float64])
        assert actual[3].numel() == 0


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(CELLS))
def test_half_types_below_the_tensor_cores(kind, dtype, fuse):
    """On a GPU below compute capability 8.0 the half types run in float32 throughout, as on the
    CPU, and keep y's float32 copy in `saved`, which the backward reads with saved's row stride:
    the CPU half's numbers, but for the last bit of the results' rounding to the half type."""
    layer = Layer(kind, LAYOUTS["packed"], seed=23).to(lambda t: t.to(dtype))
    rounding = dict(rtol=2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10, atol=1e-5)
    for reverse in (False, True):
        expected = layer.forward(reverse)
        with cuda_path(fuse=fuse, compute_capability=(7, 5)):
            actual = layer.forward(reverse)
            grads = layer.backward(reverse, *actual[::3])
        assert_close_all(actual[:3], expected[:3], FORWARD_NAMES, rounding)
        assert_close_all(actual[3:], expected[3:], ["saved"], TOL[torch.float32])
        assert_close_all(grads, layer.backward(reverse, *expected[::3]), GRAD_NAMES, rounding)


def every_kernel(kind, reverse, **gpu):
    """The results of every kernel and variant on one layer: forward, fused and unfused backward,
    and the tensor-core forward in TF32 and bfloat16."""
    layer = Layer(kind, LAYOUTS["packed"], hidden=70, seed=13)
    results = []
    for rows in CUDA_CORE_ROWS:
        with cuda_path(rows, **gpu):
            y, h, c, saved = layer.forward(reverse)
        results += [y, h, c, saved]
        for fuse in (True, False):
            with cuda_path(rows, fuse=fuse, **gpu):
                results += layer.backward(reverse, y, saved)
    single = layer.to(lambda t: t.float())
    torch.backends.cudnn.allow_tf32 = True
    try:
        for rows in TENSOR_CORE_ROWS:
            with cuda_path(rows, **gpu):
                results += list(single.forward(reverse))
    finally:
        torch.backends.cudnn.allow_tf32 = False
    half = layer.to(lambda t: t.to(torch.bfloat16))
    for rows in TENSOR_CORE_ROWS:
        with cuda_path(rows, **gpu):
            results += list(half.forward(reverse))
    return results


@pytest.mark.parametrize("kind", list(CELLS))
def test_bitwise_identical_across_runs_and_block_orders(kind):
    """Each element is written by one thread and each sum runs in a fixed order, so repeated runs
    agree bit for bit (a missing barrier would make the emulated threads race), and so do runs
    whose blocks go in the opposite order (a block that read what another block of the same
    launch writes would see other values)."""
    for reverse in (False, True):
        first = every_kernel(kind, reverse)
        again = every_kernel(kind, reverse)
        flipped = every_kernel(kind, reverse, blocks_descending=True)
        for other in (again, flipped):
            for a, b in zip(first, other):
                assert (a is None and b is None) or torch.equal(a, b)


# The tensor-core kernel rounds h_{t-1} to the operand type for the product; nothing else differs
# from the float32 reference on the same rounded values (but y's rounding to the half type).
# Measured here: errors up to 5e-4 (float16) and 4e-3 (bfloat16) of 1 + |value|; the bounds leave
# four times that. TF32 has float16's 10-bit mantissa. Errors of indexing are of the order of the
# values.
HALF_TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.5e-2, atol=1.5e-2),
            "tf32": dict(rtol=2e-3, atol=2e-3)}


def to_tf32(t):
    """float32 rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (cvt.rna)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def tensor_core_layers(layer, dtype):
    """(the layer the CUDA half takes, its float32 reference on the CPU half): float16 / bfloat16
    throughout, or float32 with W_hh rounded to TF32 for the reference, as the kernel rounds it."""
    if dtype == "tf32":
        single = layer.to(lambda t: t.float())
        reference = single.to(lambda t: t)
        reference.w_hh = to_tf32(single.w_hh)
        return single, reference
    half = layer.to(lambda t: t.to(dtype))
    return half, half.to(lambda t: t.float())


def tensor_core_forward(layer, dtype, reverse, rows=MODEL, **path):
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        with cuda_path(rows, **path) as gpu:
            return layer.forward(reverse), gpu.launches
    finally:
        torch.backends.cudnn.allow_tf32 = False


def assert_tensor_core_close(actual, expected, dtype):
    """Within HALF_TOL of the float32 reference; `saved` in its reference's columns (the half types
    keep a float32 copy of y after them)."""
    for name, a, e in zip(FORWARD_NAMES, actual, expected):
        if e.numel():
            a = a.float()[:, :e.shape[1]] if name == "saved" else a.float()
            torch.testing.assert_close(a, e, **HALF_TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(CELLS))
def test_half_types_project_the_input_in_float32(kind, dtype):
    """x·W_ihᵀ of half operands is summed and kept in float32 (cuBLAS's mixed precision), biases
    added in float32: with W_hh = 0 the recurrent product adds exact zeros, so the float32 values
    that the forward saves (the gates, LSTM's c_t, y's float32 copy) are the CPU op's on the same
    rounded values to float32's precision, where a gx rounded to the half type would be 2^-11 or
    2^-8 away."""
    layer = Layer(kind, LAYOUTS["packed"], seed=67).to(lambda t: t.to(dtype))
    layer.w_hh = torch.zeros_like(layer.w_hh)
    reference = layer.to(lambda t: t.float())
    for reverse in (False, True):
        expected = reference.forward(reverse)[3]
        with cuda_path():
            saved = layer.forward(reverse)[3]
        assert_close_all([saved[:, :expected.shape[1]]], [expected], ["saved"], TOL[torch.float32])
        torch.testing.assert_close(saved[:, expected.shape[1]:], reference.forward(reverse)[0], **TOL[torch.float32])


TENSOR_CORE_SHAPES = [pytest.param(kind, hidden, proj, id=f"{kind}-H{hidden}" + (f"-proj{proj}" if proj else ""))
                      for kind in CELLS for hidden, proj in [(37, 0), (70, 0), (37, 6)]
                      if not proj or kind == "LSTM"]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("rows", TENSOR_CORE_ROWS, ids=["4_row_tiles", "1_row_tile"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"], ids=["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind,hidden,proj", TENSOR_CORE_SHAPES)
def test_tensor_core_forward(kind, hidden, proj, dtype, rows, reverse):
    """Partial 16-unit tiles, one and two 64-wide k chunks, row counts that are not multiples of 16
    or 64, both row tilings, the projection; the reference takes the same rounded values."""
    layer, reference = tensor_core_layers(Layer(kind, [70, 70, 41, 3], hidden=hidden, proj=proj, seed=17), dtype)
    actual, launches = tensor_core_forward(layer, dtype, reverse, rows)
    assert_tensor_core_close(actual, reference.forward(reverse), dtype)
    assert launches == layer.steps()


def test_tf32_rounds_as_the_hardware():
    """The reference's rounding: to nearest, ties away from zero, 13 low bits cleared."""
    one = torch.tensor([1.0], dtype=torch.float32)
    ulp = 2.0 ** -10
    below, tie, above = (one + ulp * f for f in (0.49, 0.5, 0.51))
    assert to_tf32(below).item() == 1.0 and to_tf32(tie).item() == 1.0 + ulp and to_tf32(above).item() == 1.0 + ulp
    assert to_tf32(-tie).item() == -(1.0 + ulp)


# --- the persistent kernels (csrc/cuda/persistent_loops.cuh): one cooperative launch a sequence ---

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_forward(kind, layout, reverse, dtype):
    """Every cell, padded and packed (steps that grow, shrink and empty), both directions; 37 units
    are 5 blocks of 8 (LSTM), 4 of 10 (GRU), 2 of 32 (RNN), the last one partial; 18 rows are five
    4-row passes, the last one partial. The persistent backward after it reads what it saved: its
    G*H gate rows split over 4 warps and S lanes a unit (LSTM 148 rows: 4 quarters of 37, rounded
    up to 40 for S = 4)."""
    check_layer(Layer(kind, LAYOUTS[layout], dtype=dtype, seed=29), reverse, persistent=True)


@pytest.mark.parametrize("hidden", [1, 8, 30, 70, 100])
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_hidden_sizes(kind, hidden):
    """One unit (one warp has all of k); exactly one LSTM block; P = 30, 70, 100 split into four
    uneven quarters of k over 4, 9 and 13 LSTM blocks."""
    for reverse in (False, True):
        check_layer(Layer(kind, LAYOUTS["packed"], hidden=hidden, seed=31 + hidden), reverse, persistent=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_weights_in_registers_and_shared_memory(kind, dtype):
    """The first 32 k (float32; 16 in float64) of each warp's share come from registers, the rest
    from the resident slice: at H = 150 every warp has both (forward: 38 k a warp; backward: 38
    rows of S gate rows a lane)."""
    for reverse in (False, True):
        check_layer(Layer(kind, LAYOUTS["packed"], hidden=150, dtype=dtype, seed=53), reverse, persistent=True)


def test_persistent_bitwise_across_runs_and_block_orders():
    """Every block resident at once, in either order: the same bits, forward and backward (a block
    reading another's h_t or dG_t before the grid barrier would see other values, or NaN)."""
    for kind in CELLS:
        layer = Layer(kind, LAYOUTS["packed"], hidden=70, seed=41)
        for reverse in (False, True):
            def both(**gpu):
                with cuda_path(persistent=True, **gpu):
                    forward = layer.forward(reverse)
                    return list(forward) + [g for g in layer.backward(reverse, forward[0], forward[3])
                                            if g is not None]
            first, again, flipped = both(), both(), both(blocks_descending=True)
            for other in (again, flipped):
                assert all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_backward_after_the_per_step_forward(kind):
    """The persistent backward on its own (the forward's launches per step), with and without dy,
    and FUSED_RNN_CUDA_UNFUSED_BACKWARD's path (fuse=False) untouched by it."""
    layer = Layer(kind, LAYOUTS["trailing_empty_steps"], hidden=45, seed=43)
    for reverse in (False, True):
        y, _, _, saved = layer.forward(reverse)
        for with_dy in (True, False):
            expected = layer.backward(reverse, y, saved, with_dy)
            for fuse in (True, False):
                with cuda_path(persistent=True, fuse=fuse) as gpu:
                    grads = layer.backward(reverse, y, saved, with_dy)
                assert_close_all(grads, expected, GRAD_NAMES, TOL[torch.float64])
                assert gpu.launches == (1 if fuse else layer.steps())


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["packed", "trailing_empty_steps"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"], ids=["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind,hidden", [("LSTM", 37), ("LSTM", 70), ("GRU", 37), ("RNN_TANH", 37),
                                         ("RNN_RELU", 70)])
def test_persistent_tensor_core_forward(kind, hidden, dtype, layout, reverse):
    """The persistent forward on the tensor cores: against the CPU op on the same rounded values,
    and bitwise the same as the per-step tensor-core kernel (the same k order, the same rounding of
    h_{t-1}), also with the blocks run in the opposite order. 37 units: 3 blocks of 16, the last
    partial; P = 37 and 70 padded to 48 and 80 k; the batch in one or two 16-row passes."""
    layer, reference = tensor_core_layers(Layer(kind, LAYOUTS[layout], hidden=hidden, seed=47), dtype)
    per_step, _ = tensor_core_forward(layer, dtype, reverse)
    actual, launches = tensor_core_forward(layer, dtype, reverse, persistent=True)
    flipped, _ = tensor_core_forward(layer, dtype, reverse, persistent=True, blocks_descending=True)
    assert launches == 1
    assert_tensor_core_close(actual, reference.forward(reverse), dtype)
    for name, a, p, f in zip(FORWARD_NAMES, actual, per_step, flipped):
        assert torch.equal(a, p), f"{name}: not the per-step kernel's bits"
        assert torch.equal(a, f), f"{name}: not the same bits in the other block order"


# --- the choices of variant and kernel: what they must satisfy, not where their limits fall ---------
# The cost model (csrc/cuda/step_loops.cuh) and the persistent kernels' rule (persistent_loops.cuh)
# place their limits by an estimate of a GPU's speed that only a GPU can check (bench/GPU_NOTES.md).
# The tests hold the choices to what any placement must satisfy, on emulated GPUs of several sizes
# (an H100's 132 multiprocessors among them): a pick is one of the kernel's variants and is the one
# that runs; a persistent kernel is chosen only where its grid fits on the GPU at once (the
# emulation refuses a cooperative launch that does not, as a GPU does), for every hidden size up to
# a limit, which grows with the GPU and shrinks with wider elements; what runs by default is what
# the choice says.

GPU_SIZES = [1, 2, 4, 132]  # the emulated GPUs' multiprocessors
VARIANTS = {"forward": CUDA_CORE_ROWS, "backward": CUDA_CORE_ROWS, "tensor_core": TENSOR_CORE_ROWS}
PICK_BATCHES = list(range(1, 70)) + [96, 128, 200, 256, 261, 333, 512, 1000, 1024, 4096]
PICK_HIDDEN = [1, 16, 33, 70, 128, 512, 1024, 2048]
# The persistent kernels and their dtypes: on the CUDA cores the forward and the fused backward; on
# the tensor cores the forward, by its operand type (float32 modules take TF32).
PERSISTENT = {"forward": [torch.float32, torch.float64], "backward": [torch.float32, torch.float64],
              "float16": [torch.float32], "bfloat16": [torch.float32], "tf32": [torch.float32]}
PERSISTENT_CASES = [pytest.param(k, d, id=f"{k}-{str(d)[6:]}" if k in ("forward", "backward") else k)
                    for k, dtypes in PERSISTENT.items() for d in dtypes]
TENSOR_CORE_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "tf32": "tf32"}
SWEPT_HIDDEN = 4096  # the persistent kernels' limits are looked for in hidden sizes 1 to this


def model_picks(gpu, kernel, cell, dtype):
    """{(batch, hidden): the model's rows per block} over PICK_BATCHES x PICK_HIDDEN."""
    return {(b, h): gpu.chosen_rows_per_block(kernel, cell, b, h, dtype=dtype)
            for b in PICK_BATCHES for h in PICK_HIDDEN}


@pytest.mark.parametrize("kernel", list(VARIANTS))
def test_the_cost_model_picks_a_variant_of_the_kernel(kernel):
    """Over batches of 1 to 4096 rows and hidden sizes of 1 to 2048, on each GPU, every cell and
    dtype: the model's pick is one of the kernel's variants, and on the H100 each variant is the
    pick somewhere (none is left to FUSED_RNN_CUDA_ROWS_PER_BLOCK alone). The variable forces each
    variant for every shape; a count that no variant has leaves the model's pick."""
    dtypes = [torch.float32] if kernel == "tensor_core" else [torch.float32, torch.float64]
    for sms in GPU_SIZES:
        picked = set()
        with environment(FUSED_RNN_CUDA_ROWS_PER_BLOCK=None), emulate_cuda(multiprocessors=sms) as gpu:
            for cell in CELLS:
                for dtype in dtypes:
                    picks = model_picks(gpu, kernel, cell, dtype)
                    assert set(picks.values()) <= set(VARIANTS[kernel]), (sms, cell, dtype, set(picks.values()))
                    picked |= set(picks.values())
                    with environment(FUSED_RNN_CUDA_ROWS_PER_BLOCK=7):
                        assert model_picks(gpu, kernel, cell, dtype) == picks
                    for rows in VARIANTS[kernel]:
                        with environment(FUSED_RNN_CUDA_ROWS_PER_BLOCK=rows):
                            assert set(model_picks(gpu, kernel, cell, dtype).values()) == {rows}
        if sms == 132:
            assert picked == set(VARIANTS[kernel]), f"on an H100 the model never picks {set(VARIANTS[kernel]) - picked}"


@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_the_model_runs_the_variant_it_picks(kind, kernel):
    """chosen_rows_per_block names the variant that runs: at a batch where the model (on an H100,
    H = 70) picks each variant, its run gives that variant's bits when forced. In float32 the bits
    tell the 16-row variant from the split ones (which split k alike, so agree with each other)."""
    H = 70
    with environment(FUSED_RNN_CUDA_ROWS_PER_BLOCK=None), emulate_cuda() as gpu:
        batch_for = {}
        for batch in range(1, 300):
            batch_for.setdefault(gpu.chosen_rows_per_block(kernel, kind, batch, H), batch)
    assert len(batch_for) > 1, f"the model picks {set(batch_for)} at every batch of H = {H}"
    for rows, batch in sorted(batch_for.items()):
        layer = Layer(kind, [batch] * 3, hidden=H, dtype=torch.float32, seed=71)
        y, _, _, saved = layer.forward(False)

        def run(forced):
            with cuda_path(forced):
                return list(layer.forward(False) if kernel == "forward" else layer.backward(False, y, saved))

        def same(a, b):
            return all((u is None and v is None) or torch.equal(u, v) for u, v in zip(a, b))

        model, forced = run(MODEL), {r: run(r) for r in CUDA_CORE_ROWS}
        assert same(model, forced[rows]), f"batch {batch}: the model's run is not the {rows}-row variant's"
        assert not all(same(model, forced[r]) for r in CUDA_CORE_ROWS), f"batch {batch}: the variants agree"


def persistent_limit(gpu, kernel, cell, dtype, batch=1):
    """The largest hidden size at which the persistent `kernel` is chosen for a padded layer of
    `batch` rows, checked to be a limit: chosen at every size up to it, at none past it (a larger
    layer needs more blocks and more shared memory a block), and past one unit."""
    chosen = [gpu.takes_persistent_kernel(kernel, cell, batch, h, dtype=dtype) for h in range(1, SWEPT_HIDDEN + 1)]
    limit = chosen.index(False) if False in chosen else SWEPT_HIDDEN
    assert 1 <= limit < SWEPT_HIDDEN, (kernel, cell, dtype, batch, limit)
    assert True not in chosen[limit:], \
        f"{kernel} {cell}: chosen at H = {chosen.index(True, limit) + 1}, not at {limit + 1}"
    return limit


def persistent_limits(kernel):
    """{(multiprocessors, cell, dtype): persistent_limit} on every GPU of GPU_SIZES, by default."""
    limits = {}
    for sms in GPU_SIZES:
        with environment(FUSED_RNN_CUDA_PERSISTENT=None), emulate_cuda(multiprocessors=sms) as gpu:
            for cell in CELLS:
                for dtype in PERSISTENT[kernel]:
                    limits[sms, cell, dtype] = persistent_limit(gpu, kernel, cell, dtype)
    return limits


@pytest.mark.parametrize("kernel", list(PERSISTENT))
def test_the_persistent_choice_is_a_limit_on_the_hidden_size(kernel):
    """For a batch of one, each cell and dtype, on each GPU: the persistent kernel is chosen up to
    a hidden size and not past it (persistent_limit); the limit does not shrink on a GPU with more
    multiprocessors, nor grow with float64's wider elements; with a projection, which the persistent
    kernels do not have, never."""
    limits = persistent_limits(kernel)
    for (sms, cell, dtype), limit in limits.items():
        for more in (s for s in GPU_SIZES if s > sms):
            assert limits[more, cell, dtype] >= limit, (cell, dtype, {s: limits[s, cell, dtype] for s in GPU_SIZES})
        assert limit <= limits[sms, cell, torch.float32], (sms, cell, limit, limits[sms, cell, torch.float32])
    with environment(FUSED_RNN_CUDA_PERSISTENT=None), emulate_cuda() as gpu:
        for hidden in range(2, limits[132, "LSTM", torch.float32] + 1):
            assert not gpu.takes_persistent_kernel(kernel, "LSTM", 1, hidden, proj=hidden // 2), hidden


def test_the_tensor_cores_persistent_limit_follows_the_operand_size():
    """The tensor cores' persistent forward keeps W_hh in shared memory in the operand type: the two
    16-bit types reach the same hidden size on every GPU, TF32 (4 bytes) no further."""
    f16, bf16, tf32 = (persistent_limits(kernel) for kernel in ("float16", "bfloat16", "tf32"))
    assert f16 == bf16
    assert all(tf32[key] <= f16[key] for key in f16), (tf32, f16)


@pytest.mark.parametrize("kernel", list(PERSISTENT))
def test_the_persistent_choice_and_the_batch(kernel):
    """On the H100, at hidden sizes up to and past each cell's limit: what fits does not depend on
    the batch (the kernels pass over the rows), so FUSED_RNN_CUDA_PERSISTENT=1 takes the kernel at
    any batch where it takes it at one; =0 never. By default: where it is taken at a batch it is
    at every smaller one, at one row wherever it fits, and it stops at some batch (beyond, the
    per-step kernels spread the rows over more multiprocessors)."""
    batches = list(range(1, 65)) + [100, 256, 1024]
    for cell in CELLS:
        for dtype in PERSISTENT[kernel]:
            with environment(FUSED_RNN_CUDA_PERSISTENT=None), emulate_cuda() as gpu:
                limit = persistent_limit(gpu, kernel, cell, dtype)
                hidden_sizes = [1, max(1, limit // 2), limit, limit + 1]
                default = {h: [gpu.takes_persistent_kernel(kernel, cell, b, h, dtype=dtype) for b in batches]
                           for h in hidden_sizes}
                with environment(FUSED_RNN_CUDA_PERSISTENT=1):
                    forced = {h: [gpu.takes_persistent_kernel(kernel, cell, b, h, dtype=dtype) for b in batches]
                              for h in hidden_sizes}
                with environment(FUSED_RNN_CUDA_PERSISTENT=0):
                    assert not any(gpu.takes_persistent_kernel(kernel, cell, b, h, dtype=dtype)
                                   for b in batches for h in hidden_sizes)
            for h in hidden_sizes:
                assert forced[h] == [h <= limit] * len(batches), (cell, dtype, h)
                assert default[h][0] == (h <= limit), (cell, dtype, h)
                taken = default[h].count(True)
                assert default[h] == [True] * taken + [False] * (len(batches) - taken), (cell, dtype, h)
                assert taken < len(batches), f"{cell} {dtype} H = {h}: taken by default at a batch of {batches[-1]}"


@pytest.mark.parametrize("kernel,dtype", PERSISTENT_CASES)
@pytest.mark.parametrize("kind", list(CELLS))
def test_a_chosen_persistent_kernel_fits_the_gpu(kind, kernel, dtype):
    """Chosen => fits: on a GPU of two multiprocessors (small limits, quick layers), at the largest
    hidden size where the persistent kernel is chosen for the packed layout's batch, it runs the
    layer in one cooperative launch, which the emulation makes only where every block of its grid
    is resident at once, as a GPU does, with the CPU half's results. One unit more it is not chosen
    even with FUSED_RNN_CUDA_PERSISTENT=1, and the layer runs a launch a step, with the same results."""
    sms, batch_sizes = 2, LAYOUTS["packed"]
    with environment(FUSED_RNN_CUDA_PERSISTENT=1), emulate_cuda(multiprocessors=sms) as gpu:
        limit = persistent_limit(gpu, kernel, kind, dtype, batch=batch_sizes[0])
    for hidden, chosen in ((limit, True), (limit + 1, False)):
        layer = Layer(kind, batch_sizes, hidden=hidden, dtype=dtype, seed=73)
        expected_launches = 1 if chosen else layer.steps()
        if kernel in TENSOR_CORE_TYPES:
            layer, reference = tensor_core_layers(layer, TENSOR_CORE_TYPES[kernel])
            actual, launches = tensor_core_forward(layer, TENSOR_CORE_TYPES[kernel], False, persistent=True,
                                                   multiprocessors=sms)
            assert_tensor_core_close(actual, reference.forward(False), TENSOR_CORE_TYPES[kernel])
        else:
            expected = layer.forward(False)
            y, saved = expected[0], expected[3]
            names = FORWARD_NAMES
            if kernel == "backward":
                expected, names = layer.backward(False, y, saved), GRAD_NAMES
            with cuda_path(persistent=True, multiprocessors=sms) as run:
                actual = layer.forward(False) if kernel == "forward" else layer.backward(False, y, saved)
            launches = run.launches
            assert_close_all(actual, expected, names, TOL[dtype])
        assert launches == expected_launches, (hidden, launches)


def test_the_default_run_follows_the_choice():
    """With FUSED_RNN_CUDA_PERSISTENT unset, a layer runs as takes_persistent_kernel says, forward
    and backward (one launch each, or one a step): at the largest batch the default takes each
    for, one row more, and with a projection."""
    H, dtype = 40, torch.float64
    with environment(FUSED_RNN_CUDA_PERSISTENT=None), emulate_cuda() as gpu:
        largest = [max(b for b in range(1, 1025) if gpu.takes_persistent_kernel(kernel, "LSTM", b, H, dtype=dtype))
                   for kernel in ("forward", "backward")]
        seen = set()
        for batch, proj in sorted({(b + more, 0) for b in largest for more in (0, 1)} | {(1, 4)}):
            layer = Layer("LSTM", [batch] * 3, hidden=H, proj=proj, dtype=dtype, seed=59)
            persistent = [gpu.takes_persistent_kernel(kernel, "LSTM", batch, H, proj, dtype=dtype)
                          for kernel in ("forward", "backward")]
            before = gpu.launches
            y, _, _, saved = layer.forward(False)
            layer.backward(False, y, saved)
            expected = sum(1 if p else layer.steps() for p in persistent)
            assert gpu.launches - before == expected, (batch, proj, persistent)
            seen.update(persistent)
    assert seen == {True, False}, "the default took one way only"


def test_the_emulation_gives_the_cpu_half_its_ops_back():
    """Outside emulate_cuda() nothing is launched; inside it the same call launches; contexts nest,
    the innermost one's GPU emulated (4 SMs hold a smaller persistent LSTM forward than 132: not
    the outer GPU's largest) and the outer one's again after it."""
    layer = Layer("GRU", LAYOUTS["packed"], seed=61)
    with environment(FUSED_RNN_CUDA_PERSISTENT=None), emulate_cuda() as outer:
        layer.forward(False)
        limit = persistent_limit(outer, "forward", "LSTM", torch.float32)
        with emulate_cuda(multiprocessors=4) as inner:
            assert persistent_limit(inner, "forward", "LSTM", torch.float32) < limit
            layer.forward(False)
        assert persistent_limit(outer, "forward", "LSTM", torch.float32) == limit
        assert inner.launches == layer.steps()  # a batch of 18: a launch a step
        layer.forward(False)
    assert outer.launches == 3 * layer.steps()
    layer.forward(False)
    assert outer.launches == 3 * layer.steps()


def test_the_environment_variable_takes_the_cuda_path_for_the_whole_process(tmp_path):
    """FUSED_RNN_EMULATE_CUDA=1: a process that only imports fused_rnn runs its modules on the CUDA
    path (kernels are launched), and rejects complex input as CUDA does."""
    import subprocess
    import sys
    script = ("import torch, fused_rnn\n"
              "from fused_rnn import testing\n"
              "assert testing.emulating_cuda()\n"
              "before = testing.emulated_launches()\n"
              "fused_rnn.GRU(3, 5)(torch.randn(4, 2, 3))[0].sum().backward()\n"
              "print(testing.emulated_launches() - before)\n"
              "try:\n"
              "    fused_rnn.RNN(3, 5, dtype=torch.complex64)(torch.randn(4, 2, 3, dtype=torch.complex64))\n"
              "except RuntimeError as e:\n"
              "    print('refused' if 'not supported on CUDA' in str(e) else e)\n")
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, FUSED_RNN_EMULATE_CUDA="1"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    launches, refused = result.stdout.split()
    assert int(launches) > 0 and refused == "refused"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_the_cuda_plan_follows_the_gpu_and_the_overrides(cell):
    """plan_cuda (csrc/cuda/cuda_plan.h) decides per call: its persistent choice agrees with the
    cost model's handle (takes_persistent_kernel) at every batch and size, on a large and a small
    GPU; the overrides reach it; half types multiply in their own type from compute capability 8.0,
    in float32 below. (What the call then runs: the next test.)"""
    for gpu_config in ({}, {"multiprocessors": 2}):
        with emulate_cuda(**gpu_config) as gpu:
            for batch, hidden in ((1, 32), (8, 200), (9, 200), (4, 1300)):
                plan = gpu.plan(cell, torch.float64, batch, 16, hidden, steps=3)
                persistent = plan["launches"].startswith("one per sequence")
                assert persistent == gpu.takes_persistent_kernel("forward", cell, batch, hidden, dtype=torch.float64)
                backward = gpu.plan(cell, torch.float64, batch, 16, hidden, steps=3, backward=True)
                assert backward["launches"].startswith("one") == gpu.takes_persistent_kernel(
                    "backward", cell, batch, hidden, dtype=torch.float64)
            with fused_rnn.overrides_set(cuda_persistent="0", cuda_unfused_backward=1):
                assert gpu.plan(cell, torch.float32, 1, 16, 32)["launches"] == "per step"
                unfused = gpu.plan(cell, torch.float32, 1, 16, 32, backward=True)
                assert unfused["step"] == "cell kernel, then cuBLAS" and unfused["launches"] == "per step"
            with fused_rnn.overrides_set(cuda_persistent="1"):
                assert gpu.plan(cell, torch.float32, 64, 16, 32)["launches"] != "per step"
    with emulate_cuda() as gpu:
        half = gpu.plan(cell, torch.float16, 4, 16, 32)
        assert half["cuBLAS operands"] == "float16" and half["h·W_hhᵀ"] == "float16 (tensor cores)"
        assert gpu.plan(cell, torch.bfloat16, 4, 16, 32, backward=True)["dG·W_hh"] == "float32 (CUDA cores)"
    with emulate_cuda(compute_capability=(7, 5)) as gpu:
        old = gpu.plan(cell, torch.float16, 4, 16, 32)
        assert old["cuBLAS operands"] == "float32" and old["h·W_hhᵀ"] == "float32 (CUDA cores)"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_the_run_follows_the_cuda_plan(cell):
    """A layer the plan runs persistent takes one launch forward and one backward; one it runs per
    step takes one or more a step (the emulation counts launches)."""
    layer = getattr(fused_rnn, cell)(16, 32).double()
    name = "RNN_TANH" if cell == "RNN" else cell
    x = torch.randn(6, 2, 16, dtype=torch.float64, requires_grad=True)
    with emulate_cuda() as gpu:
        for choice in ("1", "0"):
            with fused_rnn.overrides_set(cuda_persistent=choice):
                forward = gpu.plan(name, torch.float64, 2, 16, 32, steps=6)["launches"] != "per step"
                backward = gpu.plan(name, torch.float64, 2, 16, 32, steps=6, backward=True)["launches"] != "per step"
                assert forward == backward == (choice == "1")
                before = gpu.launches
                y, _ = layer(x)
                forward_launches = gpu.launches - before
                y.sum().backward()
                backward_launches = gpu.launches - before - forward_launches
                for persistent, launches in ((forward, forward_launches), (backward, backward_launches)):
                    assert (launches == 1) if persistent else (launches >= 6)
