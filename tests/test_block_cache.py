"""The CPU block cache behind the large per-call buffers (csrc/cpu/block_cache.cpp): kept blocks are
reused, what they held before never reaches a result, the cache is bounded and can be emptied.

The shapes are chosen so that the buffers pass the cache's 1 MB threshold (smaller ones go to the
ordinary allocator)."""
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from helpers import check_parity, make_pair

T, B, H = 40, 32, 128  # float64: saved values of one LSTM layer and direction 6.5 MB, y 1.3 MB


def _training_step(module, x):
    y, _ = module(x)
    y.sum().backward()


def test_reused_blocks_give_torch_nn_results():
    fused_rnn.empty_cache()
    torch.manual_seed(0)
    for kind in ("LSTM", "GRU", "RNN"):
        fused, ref = make_pair(kind, H, H, num_layers=2, bidirectional=True)
        for _ in range(3):  # every call after the first runs on blocks that held the call before's values
            check_parity(fused, ref, torch.randn(T, B, H, dtype=torch.float64))
    assert fused_rnn.cpu_cache_bytes() > 0


def test_packed_sequences_of_varying_length_reuse_blocks():
    torch.manual_seed(1)
    fused, ref = make_pair("LSTM", H, H, proj_size=48)
    for longest in (40, 36, 38, 31):  # sizes within the 5/4 that a kept block may serve
        lengths = torch.randint(longest // 2, longest + 1, (B,)).tolist()
        lengths[0] = longest
        seqs = [torch.randn(n, H, dtype=torch.float64) for n in sorted(lengths, reverse=True)]
        check_parity(fused, ref, pack_sequence(seqs))


def test_repeated_steps_reuse_instead_of_growing():
    torch.manual_seed(2)
    fused_rnn.empty_cache()
    module = fused_rnn.LSTM(H, H, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, B, H, dtype=torch.float64)
    kept = []
    for _ in range(4):
        _training_step(module, x)
        kept.append(fused_rnn.cpu_cache_bytes())
    assert kept[0] > 0
    assert kept[1] == kept[2] == kept[3], kept  # the same blocks go round


def test_empty_cache_gives_everything_back():
    torch.manual_seed(3)
    _training_step(fused_rnn.GRU(H, H, dtype=torch.float64), torch.randn(T, B, H, dtype=torch.float64))
    assert fused_rnn.cpu_cache_bytes() > 0
    fused_rnn.empty_cache()
    assert fused_rnn.cpu_cache_bytes() == 0


def _run_with_limit(limit_mb):
    """A fresh process with FUSED_RNN_CPU_CACHE_MB set: two calls checked against torch.nn, then
    cpu_cache_bytes() printed."""
    script = (
        "import sys, torch, fused_rnn\n"
        "sys.path.insert(0, 'tests')\n"
        "from helpers import check_parity, make_pair\n"
        "torch.manual_seed(0)\n"
        f"fused, ref = make_pair('LSTM', {H}, {H})\n"
        f"for _ in range(2): check_parity(fused, ref, torch.randn({T}, {B}, {H}, dtype=torch.float64))\n"
        "print(fused_rnn.cpu_cache_bytes())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FUSED_RNN_CPU_CACHE_MB=str(limit_mb))
    return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _cache_bytes_under(limit_mb):
    done = _run_with_limit(limit_mb)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_limit_from_the_environment():
    assert _cache_bytes_under(0) == 0  # off
    assert 0 < _cache_bytes_under(8) <= 8 << 20


def test_a_limit_that_is_not_a_number_is_refused():
    done = _run_with_limit("lots")
    assert done.returncode != 0
    assert "FUSED_RNN_CPU_CACHE_MB='lots' is not valid; it must be a whole number" in done.stderr


def test_the_limit_changes_at_run_time():
    """cpu_cache_mb is an override: 0 turns the cache off for the blocks freed from then on."""
    layer = fused_rnn.LSTM(H, H)
    x = torch.randn(T, B, H)
    fused_rnn.empty_cache()
    with fused_rnn.overrides_set(cpu_cache_mb=0):
        layer(x)
        assert fused_rnn.cpu_cache_bytes() == 0
    layer(x)
    assert fused_rnn.cpu_cache_bytes() > 0
    with pytest.raises(ValueError, match="cpu_cache_mb='-1' is not valid; it must be a whole number"):
        fused_rnn.set_overrides(cpu_cache_mb=-1)


def test_backward_fills_no_zero_gradient_for_outputs_the_loss_leaves_out():
    """autograd fills zeros for every output without a gradient unless the op says it takes None:
    for the op's saved buffer (N rows of every gate and state) that was 262 MB a backward at LSTM
    T50 B256 H1024, and here h_n and c_n too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "zero" in func.__name__ or "fill" in func.__name__:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    layer = fused_rnn.LSTM(8, 16)
    x = torch.randn(5, 3, 8, requires_grad=True)
    y, _ = layer(x)
    fills = ZeroFills()
    with fills:
        y.sum().backward()
    assert fills.seen == []
    assert x.grad is not None and layer.weight_hh_l0.grad.abs().sum() > 0
