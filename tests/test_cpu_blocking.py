"""The CPU engine's blocking: hidden sizes that fill panel blocks, vectors and scalar tails in every
way, row counts around the kernel's row blocks, packed steps whose batch shrinks across a block,
and results that do not depend on the number of threads. Every test runs once per float32 kernel
configuration the CPU plan can pick here (csrc/cpu/kernel_plan.h), set by overrides: the defaults,
then AVX2 in place of AVX-512, the other weight-gradient GEMM, and with AMX the AVX-512 tiles in its
place and AMX steps from one row. float64 takes the AVX2 tiles and BLAS in all of them."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from helpers import check_parity, make_pair, run


# The float32 overrides at their defaults, whatever the environment says.
DEFAULTS = {"float_kernel": "auto", "chunk_gemm": "auto", "amx_step_rows": 16}


def _float_kernel_configurations():
    """Changes from DEFAULTS for every float32 kernel the plan can pick on this CPU, none first."""
    choices = fused_rnn.override_choices()["float_kernel"]
    with fused_rnn.overrides_set(**DEFAULTS):
        default_dw = fused_rnn.cpu_plan("LSTM", batch=8, input_size=8, hidden_size=8, pass_="backward")["dW"]
    configurations = [{}]
    if "amx" in choices:
        configurations += [{"float_kernel": "avx512"}, {"amx_step_rows": 1}]
    if "avx512" in choices:
        configurations.append({"chunk_gemm": "blas" if default_dw == "AVX-512 tiles" else "tiles"})
        if "avx2" in choices:
            configurations.append({"float_kernel": "avx2"})
    return configurations


CONFIGURATIONS = _float_kernel_configurations()


@pytest.fixture(autouse=True, params=CONFIGURATIONS,
                ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default-kernels")
def float_kernels(request):
    """The whole file under each configuration (the plan reads the overrides per call)."""
    with fused_rnn.overrides_set(**{**DEFAULTS, **request.param}):
        yield request.param

# AVX2 vectors are 8 floats / 4 doubles; a panel block holds 1 vector per gate (LSTM, GRU) or 3 (RNN).
HIDDEN = [1, 3, 4, 7, 8, 9, 12, 23, 24, 25, 33]
# AVX-512 groups are 16 floats; a block holds 1 group per gate (LSTM, GRU) or 4 (RNN, dG·W_hh: 64 columns).
WIDE_HIDDEN = [15, 16, 17, 47, 48, 49, 63, 64, 65, 80]
# Row tiles: 8 (AVX2 float: 12 / gates); AVX-512: 6 rows for 4 groups (halves of the groups at 6-8
# rows), 8 for 3 or 1, 12 for 2.
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 17, 25]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"}),
                                     ("LSTM", {"proj_size": 1})])
def test_hidden_sizes(kind, kw, hidden, dtype):
    if kw.get("proj_size", 0) >= hidden:
        pytest.skip("proj_size must be smaller than hidden_size")
    torch.manual_seed(hidden)
    fused, ref = make_pair(kind, 5, hidden, num_layers=2, bidirectional=True, dtype=dtype, **kw)
    check_parity(fused, ref, torch.randn(4, 6, 5, dtype=dtype))


@pytest.mark.parametrize("hidden", WIDE_HIDDEN)
@pytest.mark.parametrize("inputs", [1, 17, 33])
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", {"proj_size": 5})])
def test_wide_hidden_and_input_sizes(kind, kw, inputs, hidden):
    """Around the AVX-512 groups and blocks, and input sizes (x's panels' k, dX's columns) off 16."""
    torch.manual_seed(hidden + inputs)
    fused, ref = make_pair(kind, inputs, hidden, num_layers=2, bidirectional=True, dtype=torch.float32, **kw)
    check_parity(fused, ref, torch.randn(5, 7, inputs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_row_counts(kind, rows, dtype):
    torch.manual_seed(rows)
    fused, ref = make_pair(kind, 3, 10, bidirectional=True, dtype=dtype)
    check_parity(fused, ref, torch.randn(3, rows, 3, dtype=dtype))


@pytest.mark.parametrize("rows", [5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 24, 25])
@pytest.mark.parametrize("kind,hidden", [("LSTM", 48), ("GRU", 48), ("RNN", 48), ("RNN", 20)])
def test_wide_row_counts(kind, hidden, rows):
    """Row counts around every AVX-512 tile: H = 48 gives LSTM blocks of 4 groups (6-row tiles),
    GRU 3 (8 rows), RNN 2 (12 rows); RNN H = 20 one-group blocks."""
    torch.manual_seed(rows + hidden)
    fused, ref = make_pair(kind, 33, hidden, bidirectional=True, dtype=torch.float32)
    check_parity(fused, ref, torch.randn(3, rows, 33))


@pytest.mark.parametrize("hidden", [1, 7, 8, 9, 16, 17, 40, 65])
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", {"proj_size": 5})])
def test_batch_of_one_float32(kind, kw, hidden):
    """A batch of one takes dot products on W_hh's rows instead of packed panels (wide_float.h's
    wide_row_dots, with AVX-512): 8 rows at a time and single rows, k in 16s and a masked tail
    (input and hidden sizes off 16); batched, unbatched and one packed sequence, two layers."""
    if kw.get("proj_size", 0) >= hidden:
        pytest.skip("proj_size must be smaller than hidden_size")
    torch.manual_seed(hidden)
    fused, ref = make_pair(kind, 21, hidden, num_layers=2, bidirectional=True, dtype=torch.float32, **kw)
    check_parity(fused, ref, torch.randn(7, 1, 21))
    check_parity(fused, ref, torch.randn(5, 21))
    check_parity(fused, ref, pack_sequence([torch.randn(6, 21)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_packed_batch_shrinking_across_row_blocks(kind, dtype):
    torch.manual_seed(1)
    fused, ref = make_pair(kind, 3, 17, num_layers=2, bidirectional=True, dtype=dtype)
    lengths = [9, 9, 8, 7, 7, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1]  # 15 sequences: row blocks empty out one by one
    x = pack_sequence([torch.randn(n, 3, dtype=dtype) for n in lengths])
    check_parity(fused, ref, x)


THREAD_CASES = {  # (input size, hidden size, module arguments, T, B, packed)
    "plain": (64, 96, {}, 20, 32, False),
    "tails": (33, 100, {"bidirectional": True}, 9, 7, False),
    "proj": (40, 70, {"proj_size": 30}, 9, 13, False),
    "packed": (48, 65, {"bidirectional": True}, 12, 11, True),
    "chunks": (5, 300, {}, 30, 64, False),  # G*H = 1200 for LSTM: 3 chunks of steps
    "batch of one": (40, 300, {"bidirectional": True}, 12, 1, False),  # W_hh's rows as they are
}


@pytest.mark.parametrize("case", list(THREAD_CASES))
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_results_do_not_depend_on_thread_count(kind, case):
    inputs, hidden, kw, T, B, packed = THREAD_CASES[case]
    if "proj_size" in kw and kind != "LSTM":
        pytest.skip("proj_size is LSTM's")
    torch.manual_seed(2)
    fused, _ = make_pair(kind, inputs, hidden, num_layers=2, dtype=torch.float32, **kw)
    if packed:
        x = pack_sequence([torch.randn(n, inputs) for n in range(T, T - B, -1)])
    else:
        x = torch.randn(T, B, inputs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out_1, grads_1 = run(fused, x, None)
        torch.set_num_threads(max(2, threads))
        out_n, grads_n = run(fused, x, None)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out_1 + grads_1, out_n + grads_n):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("packed", [False, True])
def test_input_projection_in_chunks_of_steps(kind, packed, dtype):
    """x·W_ihᵀ is computed a chunk of whole steps at a time, up to 2^20 gate values: with G*H = 1200
    that is 873 rows, so these inputs (up to 1,200 rows) take two chunks, in both directions; the
    weight gradients add up chunk after chunk, the runs of h_{t-1} of each packed into one panel."""
    torch.manual_seed(3)
    hidden = 300 if kind == "LSTM" else 400
    fused, ref = make_pair(kind, 3, hidden, bidirectional=True, dtype=dtype)
    if packed:
        lengths = [30] * 10 + [29, 25, 17] * 10
        lengths = lengths[:40]
        x = pack_sequence([torch.randn(n, 3, dtype=dtype) for n in sorted(lengths, reverse=True)])
    else:
        x = torch.randn(30, 40, 3, dtype=dtype)
    # float32 sums over 1,200 rows: the weight gradients reach 50 and more, their error 1e-5 relative
    check_parity(fused, ref, x, tol=(2e-5, 2e-5) if dtype == torch.float32 else None)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_weight_gradients_over_several_chunks_float32(kind):
    """Four chunks of steps (3,000 rows, 873 a chunk): both gate-gradient buffers reused, and the
    chunk's panels of x and h_{t-1} packed again for each (float32: the AVX-512 path where it runs)."""
    torch.manual_seed(4)
    fused, ref = make_pair(kind, 3, 300 if kind == "LSTM" else 400, dtype=torch.float32)
    check_parity(fused, ref, torch.randn(30, 100, 3) * 0.5, tol=(3e-5, 3e-5))


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("LSTM", {"proj_size": 1}), ("GRU", {}), ("RNN", {})])
def test_edge_shapes_float32(kind, kw):
    """tests/test_edge_cases.py's shapes (float64 there) once in float32: sizes 1, one step, a long
    sequence, strided input, an empty batch."""
    torch.manual_seed(6)
    for inputs, hidden_size in [(1, 2), (5, 2), (1, 17)]:
        fused, ref = make_pair(kind, inputs, hidden_size, num_layers=2, bidirectional=True, dtype=torch.float32, **kw)
        check_parity(fused, ref, torch.randn(4, 1, inputs))
        check_parity(fused, ref, torch.randn(1, 3, inputs))
    fused, ref = make_pair(kind, 1, 3, dtype=torch.float32, **kw)
    check_parity(fused, ref, torch.randn(2000, 2, 1), tol=(1e-4, 1e-4))  # gradients summed over 2,000 steps
    fused, ref = make_pair(kind, 6, 20, bidirectional=True, dtype=torch.float32, **kw)
    check_parity(fused, ref, torch.randn(10, 5, 12)[::2, :, ::2])
    out_f, out_r = fused(torch.randn(4, 0, 6))[0], ref(torch.randn(4, 0, 6))[0]
    assert out_f.shape == out_r.shape


def test_strip_tails_of_six_rows():
    """G*H = 102 = 6 x 16 + 6: the last strip of dG's columns is 6 wide, against 4 groups of x's
    panels (I = 100): the 6-row, two-halves tile of the transposed product."""
    torch.manual_seed(5)
    fused, ref = make_pair("GRU", 100, 34, dtype=torch.float32)
    check_parity(fused, ref, torch.randn(6, 9, 100))


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", {}), ("RNN", {}), ("LSTM", {"proj_size": 7})])
def test_input_projection_in_passes(kind, kw):
    """x·W_ihᵀ in several passes of rows per chunk (with AMX: 96-row passes at input size 1000, off
    32, so the k of the last tile is partly padding), 205 rows ending in a partial 16-row tile,
    G*H = 4*45 columns ending in a partial pair of 16-column tiles; without bias too."""
    torch.manual_seed(7)
    for bias in (True, False):
        fused, ref = make_pair(kind, 1000, 45, bias=bias, dtype=torch.float32, **kw)
        check_parity(fused, ref, torch.randn(5, 41, 1000) * 0.3)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_float32_accurate_to_float32_arithmetic(kind):
    """Against float64, float32 outputs stay within a bound set by float32's arithmetic alone,
    whichever kernel takes x·W_ihᵀ (this file runs again in children with every kernel the CPU can
    pick: AMX, whose product splits each float into three bfloat16s and keeps six of the nine
    partial products; the AVX-512 tiles; AVX2 and BLAS). Input size K = 1024, so that sums are long.

    The bound: a dot product of K terms summed in float32 in any order errs by Σ_j δ_j s_j, with
    |δ_j| <= u = 2^-24 and s_j its partial sums. For terms of random sign the partial sums grow as
    √j·σ (σ the terms' RMS, about |x|·|w|/K), so even one chain over all of k (the worst order)
    errs by about u·σ·K/√6 = 0.41·u·|x|·|w| in RMS, 4x that at most over these 12672 outputs;
    blocked sums err less. The gates' slopes are at most 1, and six steps of a recurrence with
    K = 64 add little. So 3·u·max|x_r|·max|w_m| (norms of x's rows and W_ih's rows) holds for any
    float32 summation, while a product that kept only four of the nine bfloat16 partial products
    (2^-16 relative per product, about 8·u·|x|·|w| here) or ran in bfloat16 fails it. Measured on an
    AMD Zen 5 (2026-12-06): 0.49-0.69 of u·|x|·|w| with the AVX-512 tiles, 0.23-0.42 with AVX2 and
    BLAS (torch.nn's oneDNN: 0.38-0.73)."""
    torch.manual_seed(8)
    fused, ref = make_pair(kind, 1024, 64, dtype=torch.float32)
    x = torch.randn(6, 33, 1024)
    with torch.no_grad():
        exact, _ = ref.double()(x.double())
        error = (fused(x)[0].double() - exact).abs().max().item()
    unit_roundoff = 2.0 ** -24
    scale = x.norm(dim=-1).max().item() * fused.weight_ih_l0.norm(dim=1).max().item()
    assert 0 < error <= 3 * unit_roundoff * scale, (error, unit_roundoff * scale)


def test_each_configuration_changes_the_plan(float_kernels):
    """The overrides this file runs under reach the plan: each configuration but the defaults takes
    another kernel for some product of a float32 layer (B = 1 and 32, forward and backward)."""
    def plans():
        return [fused_rnn.cpu_plan("LSTM", batch=b, input_size=40, hidden_size=48, pass_=p)
                for b in (1, 32) for p in ("forward", "backward")]
    current = plans()
    with fused_rnn.overrides_set(**DEFAULTS):
        defaults = plans()
    assert (current == defaults) == (float_kernels == {})


@pytest.mark.parametrize("hidden", [15, 17, 40, 64, 65])
@pytest.mark.parametrize("inputs", [1, 17, 33])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_call_of_a_few_rows_gives_the_bits_of_a_longer_one(kind, inputs, hidden):
    """A call of at most 4 rows (a cell's step) multiplies x by W_ih as it lies, a longer one by its
    packed panels (forward_loop.cpp): the same sums in the same order, so the first step's outputs
    are the same bits either way, for every batch that fits."""
    torch.manual_seed(9)
    fused, _ = make_pair(kind, inputs, hidden, dtype=torch.float32)
    for batch in (1, 2, 4):
        cell = kind if kind != "RNN" else "RNN_TANH"
        plans = [fused_rnn.cpu_plan(cell, batch=batch, input_size=inputs, hidden_size=hidden, steps=steps)
                 for steps in (1, 3)]
        if any(plan["x·W_ihᵀ"] != "AVX-512 tiles" for plan in plans):
            continue  # BLAS's bits may depend on the rows (the other configurations)
        x = torch.randn(3, batch, inputs)
        with torch.no_grad():
            assert torch.equal(fused(x[:1])[0], fused(x)[0][:1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_weight_gradients_of_no_rows_are_zeros(kind):
    """The tiles write dW whole from the first chunk, which here has no rows: zeros, not leftovers."""
    fused, _ = make_pair(kind, 6, 64, dtype=torch.float32)
    for _ in range(2):  # the second call's dW may come from the first's freed blocks
        fused.zero_grad(set_to_none=True)
        out, _ = fused(torch.randn(4, 0, 6, requires_grad=True))
        out.sum().backward()
        for p in fused.parameters():
            assert p.grad is not None and not p.grad.any()
