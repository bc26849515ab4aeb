"""The CPU engine's blocking: hidden sizes that fill panel blocks, vectors and scalar tails in every
way, row counts around the kernel's row blocks, packed steps whose batch shrinks across a block,
and results that do not depend on the number of threads."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from helpers import check_parity, make_pair, run

# Vectors are 8 floats / 4 doubles; a panel block holds 1 vector per gate (LSTM, GRU) or 3 (RNN).
HIDDEN = [1, 3, 4, 7, 8, 9, 12, 23, 24, 25, 33]
ROWS = [1, 2, 3, 4, 5, 11, 12, 13, 25]


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


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_row_counts(kind, rows):
    torch.manual_seed(rows)
    fused, ref = make_pair(kind, 3, 10, bidirectional=True)
    check_parity(fused, ref, torch.randn(3, rows, 3, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_packed_batch_shrinking_across_row_blocks(kind):
    torch.manual_seed(1)
    fused, ref = make_pair(kind, 3, 17, num_layers=2, bidirectional=True)
    lengths = [9, 9, 8, 7, 7, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1]  # 15 sequences: row blocks empty out one by one
    x = pack_sequence([torch.randn(n, 3, dtype=torch.float64) for n in lengths])
    check_parity(fused, ref, x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_results_do_not_depend_on_thread_count(kind):
    torch.manual_seed(2)
    fused, _ = make_pair(kind, 64, 96, num_layers=2, dtype=torch.float32)
    x = torch.randn(20, 32, 64)
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


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("packed", [False, True])
def test_input_projection_in_chunks_of_steps(kind, packed):
    """x·W_ihᵀ is computed a chunk of whole steps at a time, up to 2^20 gate values: with G*H = 1200
    that is 873 rows, so these inputs (up to 1,200 rows) take two chunks, in both directions."""
    torch.manual_seed(3)
    hidden = 300 if kind == "LSTM" else 400
    fused, ref = make_pair(kind, 3, hidden, bidirectional=True)
    if packed:
        lengths = [30] * 10 + [29, 25, 17] * 10
        lengths = lengths[:40]
        x = pack_sequence([torch.randn(n, 3, dtype=torch.float64) for n in sorted(lengths, reverse=True)])
    else:
        x = torch.randn(30, 40, 3, dtype=torch.float64)
    check_parity(fused, ref, x)
