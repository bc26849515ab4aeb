"""The CUDA step loops and their kernels (csrc/cuda/step_loops.cuh), run on the CPU.

No GPU needs to be at hand: tests/cuda_emulation/ compiles the very source that nvcc compiles over a
small emulation of CUDA's threads (fibers), blocks, shared memory, barriers and the tensor cores'
warp-wide instructions. These tests compare the two loops with the CPU op (itself checked against
torch.nn in test_parity.py): outputs, final states and saved values of the forward; every gradient
of the backward, once the test has done the products that layer.cpp does with cuBLAS after the CUDA
loop. The shapes cover partial unit tiles, several row tiles, every variant of the step kernels
(16 rows a block, 4 and 1 with the reduction split across the warps; forced as
FUSED_RNN_CUDA_ROWS_PER_BLOCK does, or the cost model's pick), more than one reduction chunk, packed
sequences in both directions (steps that grow, shrink and empty), the projection, missing output
gradients, the unfused backward (FUSED_RNN_CUDA_UNFUSED_BACKWARD=1), and outputs read through a row
stride (as the half types' backward reads them). Every result must also be bitwise the same across
runs and with the grid's blocks run in the opposite order.

The tensor-core forward kernel (float16, bfloat16, and float32 as TF32) runs here too, over an
emulation of ldmatrix and mma.sync from the PTX ISA's fragment layouts, against the CPU op in
float32 with the same rounded weights.

The persistent kernels (csrc/cuda/persistent_loops.cuh: forward and backward, each a whole
sequence in one cooperative launch) run here with every block resident at once and a grid barrier
that releases one block at a time, in either block order.

Not covered here: speed, and everything the GPU itself adds; tests/test_cuda.py runs on a GPU
against cuDNN.
"""
import contextlib
import os

import pytest
import torch
from torch.utils import cpp_extension

from fused_rnn import _ops  # loads the extension, which registers torch.ops.fused_rnn

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = _ops.CELL_IDS  # the ops' cell ids, and per id the cells' kGates and kSaved (csrc/cells.h)
LAYOUTS = {
    "padded": [18, 18, 18, 18],
    "packed": [18, 13, 13, 5, 1],
    "trailing_empty_steps": [6, 3, 0, 0],
}
SMS = 132  # an H100's multiprocessors, for the kernels' cost model
# Rows per block of each variant (FUSED_RNN_CUDA_ROWS_PER_BLOCK), or 0: the cost model's choice.
# CUDA cores: 16 rows (4 per warp), 4 and 1 row with the k chunks split across the warps.
MODEL, CUDA_CORE_ROWS, TENSOR_CORE_ROWS = 0, [16, 4, 1], [64, 16]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Built fresh for each session, so that it always matches the sources."""
    return cpp_extension.load(
        name="fused_rnn_emulated_cuda",
        sources=[os.path.join(HERE, "cuda_emulation", "emulated_loops.cpp")],
        extra_include_paths=[os.path.join(os.path.dirname(HERE), "csrc")],
        extra_cflags=["-O1"],
        build_directory=str(tmp_path_factory.mktemp("emulated_cuda")),
    )


class Layer:
    """Random weights, inputs, state and output gradients of one layer and direction."""

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

    def reference_forward(self, reverse, need_saved=True):
        return torch.ops.fused_rnn.layer_forward(self.cell, self.x, self.batch_sizes, reverse, self.h0, self.c0,
                                                 self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr, need_saved)

    def emulated_forward(self, emulated, reverse, rows=MODEL, need_saved=True, tf32=False):
        """As layer.cpp on CUDA: x·W_ihᵀ plus the biases that only add (all but GRU's b_hn), then the loop."""
        H = self.H
        bias = self.b_ih + self.b_hh
        b_hn = None
        if self.kind == "GRU":
            bias[2 * H:] = self.b_ih[2 * H:]
            b_hn = self.b_hh[2 * H:]
        gx = self.x @ self.w_ih.t() + bias
        with forced_rows(emulated, rows):
            return emulated.forward(self.cell, gx, self.batch_sizes, reverse, self.h0, self.c0, self.w_hh, b_hn,
                                    self.w_hr, need_saved, SMS, tf32)

    def reference_backward(self, reverse, y, saved, with_dy=True):
        return torch.ops.fused_rnn.layer_backward(
            self.cell, self.x, self.batch_sizes, reverse, self.h0, self.c0, self.w_ih, self.w_hh, self.w_hr, True,
            y, saved, self.dy if with_dy else None, self.dh_n, self.dc_n, True)

    def emulated_backward(self, emulated, reverse, y, saved, rows=MODEL, with_dy=True, fuse=True, outputs=None):
        """The loop, then layer.cpp's products on CUDA, in the reference's order of results. The loop
        reads h_{t-1} from `outputs` (y unless given: a view of y with another row stride)."""
        with forced_rows(emulated, rows):
            dgx, dgh, dh0, dc0, dh_total = emulated.backward(
                self.cell, self.batch_sizes, reverse, self.w_hh, self.w_hr, y if outputs is None else outputs,
                self.h0, self.c0, saved, self.dy if with_dy else None, self.dh_n, self.dc_n, SMS, fuse)
        db_ih = dgx.sum(0)
        db_hh = dgh.sum(0) if self.kind == "GRU" else db_ih
        dw_hr = None
        if self.w_hr is not None:
            proj_input = saved[:, _ops._SAVED_PER_UNIT[self.cell] * self.H:][:, :self.H]
            dw_hr = dh_total.t() @ proj_input
        h_prev = previous_outputs(y, self.h0, self.batch_sizes, reverse)
        return [dgx @ self.w_ih, dh0, dc0 if self.c0 is not None else None, dgx.t() @ self.x, dgh.t() @ h_prev,
                db_ih, db_hh, dw_hr]


@pytest.fixture(autouse=True)
def per_step_kernels(monkeypatch):
    """The per-step kernels unless a test asks for the persistent one (or for the default choice)."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")


@contextlib.contextmanager
def forced_rows(emulated, rows):
    """The variant with `rows` rows per block runs (0: the cost model's choice)."""
    emulated.set_rows_per_block(rows)
    try:
        yield
    finally:
        emulated.set_rows_per_block(0)


def previous_outputs(y, h0, batch_sizes, reverse):
    """h_{t-1} of every row of a packed sequence: the step before's output, or h0 where a sequence starts."""
    offsets = [sum(batch_sizes[:t]) for t in range(len(batch_sizes))]
    rows = []
    for t, n in enumerate(batch_sizes):
        before = t + 1 if reverse else t - 1
        if 0 <= before < len(batch_sizes):
            carried = min(n, batch_sizes[before])
            rows.append(y[offsets[before]:offsets[before] + carried])
        else:
            carried = 0
        rows.append(h0[carried:n])
    return torch.cat(rows)


def assert_close_all(actual, expected, dtype, names):
    for name, a, e in zip(names, actual, expected):
        if e is None or e.numel() == 0:
            assert a is None or a.numel() == 0, f"{name}: expected nothing"
            continue
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"{name}: {m}")


FORWARD_NAMES = ["y", "h_n", "c_n", "saved"]
GRAD_NAMES = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"]


def check_layer(emulated, layer, reverse, rows=MODEL, dtype=torch.float64, with_dy=True, fuse=True,
                outputs_stride=None):
    expected = layer.reference_forward(reverse)
    actual = layer.emulated_forward(emulated, reverse, rows)
    assert_close_all(actual, expected, dtype, FORWARD_NAMES)
    y, saved = expected[0], expected[3]
    outputs = None
    if outputs_stride is not None:  # y inside wider rows, as the half types' float32 copy in `saved`
        wide = torch.full((y.shape[0], outputs_stride), float("nan"), dtype=y.dtype)
        outputs = wide[:, 2:2 + y.shape[1]]
        outputs.copy_(y)
    grads = layer.emulated_backward(emulated, reverse, y, saved, rows, with_dy, fuse, outputs)
    assert_close_all(grads, layer.reference_backward(reverse, y, saved, with_dy), dtype, GRAD_NAMES)


@pytest.mark.parametrize("rows", [MODEL] + CUDA_CORE_ROWS, ids=["model"] + [f"{r}_rows" for r in CUDA_CORE_ROWS])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_loops_match_the_cpu_op(emulated, kind, layout, reverse, rows):
    check_layer(emulated, Layer(kind, LAYOUTS[layout]), reverse, rows)


@pytest.mark.parametrize("rows", CUDA_CORE_ROWS, ids=[f"{r}_rows" for r in CUDA_CORE_ROWS])
@pytest.mark.parametrize("hidden", [1, 32, 70])
@pytest.mark.parametrize("kind", list(CELLS))
def test_hidden_sizes_around_the_tiles(emulated, kind, hidden, rows):
    """One unit, exactly one 32-unit tile, and three tiles with more than eight 32-row chunks of G*H."""
    for reverse in (False, True):
        check_layer(emulated, Layer(kind, LAYOUTS["packed"], hidden=hidden, seed=hidden), reverse, rows)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_float32(emulated, kind, layout):
    for reverse in (False, True):
        layer = Layer(kind, LAYOUTS[layout], dtype=torch.float32, seed=3)
        for rows in CUDA_CORE_ROWS:
            check_layer(emulated, layer, reverse, rows, dtype=torch.float32)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_unfused_backward(emulated, kind, layout, reverse):
    """FUSED_RNN_CUDA_UNFUSED_BACKWARD's path: the cell backward kernel and the dh product apart."""
    check_layer(emulated, Layer(kind, LAYOUTS[layout], seed=19), reverse, fuse=False)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_backward_reads_outputs_through_a_row_stride(emulated, kind, fuse):
    """Half types keep y's float32 copy inside `saved`, which backward reads with saved's row stride."""
    for reverse in (False, True):
        check_layer(emulated, Layer(kind, LAYOUTS["packed"], seed=23), reverse, fuse=fuse,
                    outputs_stride=37 + 9)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lstm_projection(emulated, layout, reverse):
    """proj_size: the forward kernel writes o*tanh(c_t) for W_hr; backward takes the unfused path."""
    check_layer(emulated, Layer("LSTM", LAYOUTS[layout], hidden=37, proj=6, seed=5), reverse)


@pytest.mark.parametrize("kind", list(CELLS))
def test_gradient_of_the_final_state_only(emulated, kind):
    """No gradient of the outputs (dy undefined): only h_n (and c_n) carry one."""
    for reverse in (False, True):
        check_layer(emulated, Layer(kind, LAYOUTS["packed"], seed=7), reverse, with_dy=False)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_inference_without_saved_values(emulated, kind):
    """need_saved=False: nothing saved; with a projection o*tanh(c_t) goes to a scratch buffer."""
    for proj in (0, 4):
        if proj and kind != "LSTM":
            continue
        layer = Layer(kind, LAYOUTS["packed"], proj=proj, seed=11)
        expected = layer.reference_forward(True, need_saved=False)
        actual = layer.emulated_forward(emulated, True, need_saved=False)
        assert_close_all(actual[:3], expected[:3], torch.float64, FORWARD_NAMES)
        assert actual[3].numel() == 0


def every_kernel(emulated, kind, reverse):
    """The results of every kernel and variant on one layer: forward, fused and unfused backward,
    and (but for the float64 layer's own dtype) the tensor-core forward."""
    layer = Layer(kind, LAYOUTS["packed"], hidden=70, seed=13)
    results = []
    for rows in CUDA_CORE_ROWS:
        y, h, c, saved = layer.emulated_forward(emulated, reverse, rows)
        results += [y, h, c, saved]
        for fuse in (True, False):
            results += layer.emulated_backward(emulated, reverse, y, saved, rows, fuse=fuse)
    half = Layer(kind, LAYOUTS["packed"], hidden=70, dtype=torch.float32, seed=13)
    for rows in TENSOR_CORE_ROWS:
        results += list(half.emulated_forward(emulated, reverse, rows, tf32=True))
    half.w_hh = half.w_hh.to(torch.bfloat16)
    for rows in TENSOR_CORE_ROWS:
        results += list(half.emulated_forward(emulated, reverse, rows))
    return results


@pytest.mark.parametrize("kind", list(CELLS))
def test_bitwise_identical_across_runs_and_block_orders(emulated, kind):
    """Each element is written by one thread and each sum runs in a fixed order, so repeated runs
    agree bit for bit (a missing barrier would make the emulated threads race), and so do runs
    whose blocks go in the opposite order (a block that read what another block of the same
    launch writes would see other values)."""
    for reverse in (False, True):
        first = every_kernel(emulated, kind, reverse)
        again = every_kernel(emulated, kind, reverse)
        emulated.set_blocks_descending(True)
        try:
            flipped = every_kernel(emulated, kind, reverse)
        finally:
            emulated.set_blocks_descending(False)
        for other in (again, flipped):
            for a, b in zip(first, other):
                assert (a is None and b is None) or torch.equal(a, b)


# The tensor-core kernel rounds h_{t-1} to the operand type for the product; nothing else differs
# from the float32 reference. Measured here: errors up to 5e-4 (float16) and 4e-3 (bfloat16) of
# 1 + |value|; the bounds leave four times that. TF32 has float16's 10-bit mantissa. Errors of
# indexing are of the order of the values.
HALF_TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.5e-2, atol=1.5e-2),
            "tf32": dict(rtol=2e-3, atol=2e-3)}


def to_tf32(t):
    """float32 rounded to TF32's 10-bit mantissa, to nearest with ties away from zero (cvt.rna)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


TENSOR_CORE_SHAPES = [pytest.param(kind, hidden, proj, id=f"{kind}-H{hidden}" + (f"-proj{proj}" if proj else ""))
                      for kind in CELLS for hidden, proj in [(37, 0), (70, 0), (37, 6)]
                      if not proj or kind == "LSTM"]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("rows", TENSOR_CORE_ROWS, ids=["4_row_tiles", "1_row_tile"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"], ids=["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind,hidden,proj", TENSOR_CORE_SHAPES)
def test_tensor_core_forward(emulated, kind, hidden, proj, dtype, rows, reverse):
    """Partial 16-unit tiles, one and two 64-wide k chunks, row counts that are not multiples of 16
    or 64, both row tilings, the projection; the reference takes the same rounded W_hh."""
    layer = Layer(kind, [70, 70, 41, 3], hidden=hidden, proj=proj, dtype=torch.float32, seed=17)
    w_hh = layer.w_hh
    layer.w_hh = to_tf32(w_hh) if dtype == "tf32" else w_hh.to(dtype).float()
    expected = layer.reference_forward(reverse)
    layer.w_hh = w_hh if dtype == "tf32" else w_hh.to(dtype)
    actual = layer.emulated_forward(emulated, reverse, rows, tf32=dtype == "tf32")
    for name, a, e in zip(FORWARD_NAMES, actual, expected):
        if e.numel():
            torch.testing.assert_close(a, e, **HALF_TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_tf32_rounds_as_the_hardware():
    """The reference's rounding: to nearest, ties away from zero, 13 low bits cleared."""
    one = torch.tensor([1.0], dtype=torch.float32)
    ulp = 2.0 ** -10
    below, tie, above = (one + ulp * f for f in (0.49, 0.5, 0.51))
    assert to_tf32(below).item() == 1.0 and to_tf32(tie).item() == 1.0 + ulp and to_tf32(above).item() == 1.0 + ulp
    assert to_tf32(-tie).item() == -(1.0 + ulp)


def test_the_cost_model_picks_split_rows_for_small_batches(emulated):
    """On an H100's 132 SMs at H = 512, float32 LSTM. Forward: one row a block at B = 1 (every warp
    takes a quarter of the reduction instead of three of four multiplying padding), four at B = 8,
    sixteen (the weights cross from L2 once per 16 rows) once the batch gives every SM blocks. The
    fused backward's chunks are short (one "gate" of 32 columns): at B = 8 every variant waits out
    one L2 round trip a chunk, and the 16-row one moves the fewest bytes. The tensor cores: one
    16-row tile at B = 1, four at B = 256."""
    lstm = CELLS["LSTM"]
    expected = {"forward": [1, 4, 16], "backward": [1, 16, 16]}
    for kernel, rows in expected.items():
        picks = [emulated.chosen_rows_per_block(kernel, lstm, b, 512, 512, False, SMS) for b in (1, 8, 256)]
        assert picks == rows, (kernel, picks)
    picks = [emulated.chosen_rows_per_block("tensor_core", lstm, b, 512, 512, False, SMS) for b in (1, 256)]
    assert picks == [16, 64]
    # FUSED_RNN_CUDA_ROWS_PER_BLOCK wins over the model; a count that no variant has leaves the model's pick
    with forced_rows(emulated, 16):
        assert emulated.chosen_rows_per_block("forward", lstm, 1, 512, 512, False, SMS) == 16
        assert emulated.chosen_rows_per_block("tensor_core", lstm, 1, 512, 512, False, SMS) == 16
    with forced_rows(emulated, 7):
        assert emulated.chosen_rows_per_block("backward", lstm, 1, 512, 512, False, SMS) == 1


# --- the persistent kernels (csrc/cuda/persistent_loops.cuh): one cooperative launch a sequence ---

@pytest.fixture
def persistent(monkeypatch):
    """FUSED_RNN_CUDA_PERSISTENT=1: the forward and the backward take the persistent kernels wherever
    they can run."""
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_forward(emulated, persistent, kind, layout, reverse, dtype):
    """Every cell, padded and packed (steps that grow, shrink and empty), both directions; 37 units
    are 5 blocks of 8 (LSTM), 4 of 10 (GRU), 2 of 32 (RNN), the last one partial; 18 rows are five
    4-row passes, the last one partial. The persistent backward after it reads what it saved: its
    G*H gate rows split over 4 warps and S lanes a unit (LSTM 148 rows: 4 quarters of 37, rounded
    up to 40 for S = 4)."""
    check_layer(emulated, Layer(kind, LAYOUTS[layout], dtype=dtype, seed=29), reverse, dtype=dtype)


@pytest.mark.parametrize("hidden", [1, 8, 30, 70, 100])
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_hidden_sizes(emulated, persistent, kind, hidden):
    """One unit (one warp has all of k); exactly one LSTM block; P = 30, 70, 100 split into four
    uneven quarters of k over 4, 9 and 13 LSTM blocks."""
    for reverse in (False, True):
        check_layer(emulated, Layer(kind, LAYOUTS["packed"], hidden=hidden, seed=31 + hidden), reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_weights_in_registers_and_shared_memory(emulated, persistent, kind, dtype):
    """The first 32 k (float32; 16 in float64) of each warp's share come from registers, the rest
    from the resident slice: at H = 150 every warp has both (forward: 38 k a warp; backward: 38
    rows of S gate rows a lane)."""
    for reverse in (False, True):
        check_layer(emulated, Layer(kind, LAYOUTS["packed"], hidden=150, dtype=dtype, seed=53), reverse, dtype=dtype)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_persistent_inference(emulated, persistent, kind):
    """need_saved=False: nothing saved, the same outputs and final states."""
    layer = Layer(kind, LAYOUTS["packed"], seed=37)
    expected = layer.reference_forward(False, need_saved=False)
    actual = layer.emulated_forward(emulated, False, need_saved=False)
    assert_close_all(actual[:3], expected[:3], torch.float64, FORWARD_NAMES)
    assert actual[3].numel() == 0


def test_persistent_bitwise_across_runs_and_block_orders(emulated, persistent):
    """Every block resident at once, in either order: the same bits, forward and backward (a block
    reading another's h_t or dG_t before the grid barrier would see other values, or NaN)."""
    for kind in CELLS:
        layer = Layer(kind, LAYOUTS["packed"], hidden=70, seed=41)
        for reverse in (False, True):
            def both():
                y, h, c, saved = forward = layer.emulated_forward(emulated, reverse)
                return list(forward) + [g for g in layer.emulated_backward(emulated, reverse, y, saved)
                                        if g is not None]
            first, again = both(), both()
            emulated.set_blocks_descending(True)
            try:
                flipped = both()
            finally:
                emulated.set_blocks_descending(False)
            for other in (again, flipped):
                assert all(torch.equal(a, b) for a, b in zip(first, other))


def test_persistent_choice(emulated, monkeypatch):
    """Where the persistent forward runs by default, on an H100's 132 SMs and 227 KB a block: LSTM
    float32 up to H = 1056 (132 blocks of 8 units; 1024: 128 blocks of 146 KB; 1100 needs 138), not in
    float64 at H = 1024 (its slice needs 270 KB); GRU up to 132 blocks of 10 units, RNN up to
    227 KB of slice and rows; never with a projection, and only up to B = 8.
    FUSED_RNN_CUDA_PERSISTENT=1 lifts the batch rule, =0 turns it off."""
    lstm, gru, rnn = CELLS["LSTM"], CELLS["GRU"], CELLS["RNN_TANH"]
    monkeypatch.delenv("FUSED_RNN_CUDA_PERSISTENT", raising=False)
    assert emulated.persistent_chosen("forward", lstm, 8, 1024, 0, False, SMS)
    assert not emulated.persistent_chosen("forward", lstm, 8, 1100, 0, False, SMS)
    assert not emulated.persistent_chosen("forward", lstm, 8, 1024, 0, True, SMS)
    assert emulated.persistent_chosen("forward", lstm, 8, 512, 0, True, SMS)
    assert not emulated.persistent_chosen("forward", lstm, 8, 512, 256, False, SMS)
    assert emulated.persistent_chosen("forward", lstm, 8, 512, 0, False, SMS)
    assert not emulated.persistent_chosen("forward", lstm, 9, 512, 0, False, SMS)
    assert emulated.persistent_chosen("forward", gru, 1, 1300, 0, False, SMS)  # 130 blocks of 10
    assert not emulated.persistent_chosen("forward", gru, 1, 1340, 0, False, SMS)  # 134
    assert emulated.persistent_chosen("forward", rnn, 1, 1500, 0, False, SMS)  # 213 KB of slice and rows
    assert not emulated.persistent_chosen("forward", rnn, 1, 1700, 0, False, SMS)  # 245 KB
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
    assert emulated.persistent_chosen("forward", lstm, 256, 512, 0, False, SMS)
    assert not emulated.persistent_chosen("forward", lstm, 8, 1100, 0, False, SMS)  # still cannot run
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")
    assert not emulated.persistent_chosen("forward", lstm, 8, 512, 0, False, SMS)


def test_persistent_backward_choice(emulated, monkeypatch):
    """Where the persistent backward runs by default: W's columns [G*H][U] and 4 rows of dG a block,
    192 bytes a unit in LSTM float32: LSTM up to H = 1056 (132 blocks of 8, 200 KB each), not 1064
    (133 blocks); float64 to about half (512: 196 KB a block, 1024: 388 KB); GRU up to 1308 and
    RNN up to 1600 by the shared memory; never with a projection, only up to B = 8; the
    environment variable as for the forward."""
    lstm, gru, rnn = CELLS["LSTM"], CELLS["GRU"], CELLS["RNN_TANH"]
    monkeypatch.delenv("FUSED_RNN_CUDA_PERSISTENT", raising=False)
    assert emulated.persistent_chosen("backward", lstm, 8, 1056, 0, False, SMS)
    assert not emulated.persistent_chosen("backward", lstm, 8, 1064, 0, False, SMS)
    assert emulated.persistent_chosen("backward", lstm, 8, 512, 0, True, SMS)
    assert not emulated.persistent_chosen("backward", lstm, 8, 1024, 0, True, SMS)
    assert not emulated.persistent_chosen("backward", lstm, 8, 512, 256, False, SMS)
    assert not emulated.persistent_chosen("backward", lstm, 9, 512, 0, False, SMS)
    assert emulated.persistent_chosen("backward", gru, 1, 1308, 0, False, SMS)
    assert not emulated.persistent_chosen("backward", gru, 1, 1316, 0, False, SMS)
    assert emulated.persistent_chosen("backward", rnn, 1, 1600, 0, False, SMS)
    assert not emulated.persistent_chosen("backward", rnn, 1, 1620, 0, False, SMS)
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
    assert emulated.persistent_chosen("backward", lstm, 256, 512, 0, False, SMS)
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")
    assert not emulated.persistent_chosen("backward", lstm, 8, 512, 0, False, SMS)


@pytest.mark.parametrize("kind", list(CELLS))
def test_persistent_backward_after_the_per_step_forward(emulated, monkeypatch, kind):
    """The persistent backward on its own (the forward's launches per step), with and without dy,
    and FUSED_RNN_CUDA_UNFUSED_BACKWARD's path (fuse=False) untouched by it."""
    layer = Layer(kind, LAYOUTS["trailing_empty_steps"], hidden=45, seed=43)
    for reverse in (False, True):
        y, _, _, saved = layer.reference_forward(reverse)
        expected = {dy: layer.reference_backward(reverse, y, saved, dy) for dy in (True, False)}
        monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
        for with_dy in (True, False):
            for fuse in (True, False):
                grads = layer.emulated_backward(emulated, reverse, y, saved, with_dy=with_dy, fuse=fuse)
                assert_close_all(grads, expected[with_dy], torch.float64, GRAD_NAMES)
        monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("layout", ["packed", "trailing_empty_steps"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "tf32"], ids=["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("kind,hidden", [("LSTM", 37), ("LSTM", 70), ("GRU", 37), ("RNN_TANH", 37),
                                         ("RNN_RELU", 70)])
def test_persistent_tensor_core_forward(emulated, monkeypatch, kind, hidden, dtype, layout, reverse):
    """The persistent forward on the tensor cores: against the CPU op with the same rounded W_hh,
    and bitwise the same as the per-step tensor-core kernel (the same k order, the same rounding of
    h_{t-1}), also with the blocks run in the opposite order. 37 units: 3 blocks of 16, the last
    partial; P = 37 and 70 padded to 48 and 80 k; the batch in one or two 16-row passes."""
    layer = Layer(kind, [18, 13, 13, 5, 1] if layout == "packed" else LAYOUTS[layout], hidden=hidden,
                  dtype=torch.float32, seed=47)
    w_hh = layer.w_hh
    layer.w_hh = to_tf32(w_hh) if dtype == "tf32" else w_hh.to(dtype).float()
    expected = layer.reference_forward(reverse)
    layer.w_hh = w_hh if dtype == "tf32" else w_hh.to(dtype)
    tf32 = dtype == "tf32"
    per_step = layer.emulated_forward(emulated, reverse, tf32=tf32)
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
    actual = layer.emulated_forward(emulated, reverse, tf32=tf32)
    emulated.set_blocks_descending(True)
    try:
        flipped = layer.emulated_forward(emulated, reverse, tf32=tf32)
    finally:
        emulated.set_blocks_descending(False)
    for name, a, e, p, f in zip(FORWARD_NAMES, actual, expected, per_step, flipped):
        if e.numel():
            torch.testing.assert_close(a, e, **HALF_TOL[dtype], msg=lambda m: f"{name}: {m}")
        assert torch.equal(a, p), f"{name}: not the per-step kernel's bits"
        assert torch.equal(a, f), f"{name}: not the same bits in the other block order"


def test_persistent_tensor_core_choice(emulated, monkeypatch):
    """Where the persistent forward on the tensor cores runs by default (227 KB a block, 132 SMs):
    the slice [Pk][G*16 + 8] and 16 rows of h in the operand type, 176 bytes a k for LSTM in
    float16 / bfloat16 (up to H = 1280), 352 in TF32 (up to 640); GRU and RNN further; never with
    a projection; only up to B = 8 unless FUSED_RNN_CUDA_PERSISTENT=1."""
    lstm, gru, rnn = CELLS["LSTM"], CELLS["GRU"], CELLS["RNN_TANH"]
    monkeypatch.delenv("FUSED_RNN_CUDA_PERSISTENT", raising=False)
    for half in ("float16", "bfloat16"):
        assert emulated.persistent_chosen(half, lstm, 8, 1280, 0, False, SMS)
        assert not emulated.persistent_chosen(half, lstm, 8, 1288, 0, False, SMS)
        assert emulated.persistent_chosen(half, gru, 1, 1584, 0, False, SMS)
        assert not emulated.persistent_chosen(half, gru, 1, 1592, 0, False, SMS)
        assert emulated.persistent_chosen(half, rnn, 1, 2112, 0, False, SMS)  # 132 blocks of 16
        assert not emulated.persistent_chosen(half, rnn, 1, 2120, 0, False, SMS)
        assert not emulated.persistent_chosen(half, lstm, 8, 512, 256, False, SMS)
        assert not emulated.persistent_chosen(half, lstm, 9, 512, 0, False, SMS)
    assert emulated.persistent_chosen("tf32", lstm, 8, 640, 0, False, SMS)
    assert not emulated.persistent_chosen("tf32", lstm, 8, 648, 0, False, SMS)
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "1")
    assert emulated.persistent_chosen("bfloat16", lstm, 64, 512, 0, False, SMS)
    monkeypatch.setenv("FUSED_RNN_CUDA_PERSISTENT", "0")
    assert not emulated.persistent_chosen("bfloat16", lstm, 8, 512, 0, False, SMS)
