"""Long runs and concurrency: no memory growth over 1,000 forward+backward calls, correct results from
two threads calling one module at once, and (on a GPU) sizes past 2^31 elements and a
compute-sanitizer memcheck run. CUDA tests skip without a GPU.
"""
import ctypes
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fused_rnn
from helpers import leaves, make_pair

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available() and fused_rnn.built_with_cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_rnn")

ITERATIONS = 1000
RSS_TOLERANCE = 8 * 2**20  # bytes; a leak of one iteration's tensors would be tens of MB


@pytest.fixture
def one_thread():
    """Small shapes on a shared 2-core machine: one intra-op thread keeps 1,000 calls quick.
    (Memory behaviour does not depend on it; the thread test below runs with the default.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rss() -> int:
    """Resident memory, after handing freed heap pages back to the system where glibc allows: else
    memory freed by earlier tests would absorb a leak here without any growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _backward(out):
    total = sum(t.sum() for t in leaves(out))
    total.backward()


def _steps(kind):
    """One forward+backward of the module, alternating the input layouts it takes."""
    torch.manual_seed(0)
    if kind == "LSTM":
        m = fused_rnn.LSTM(8, 16, bidirectional=True, proj_size=4)
    elif kind == "GRU":
        m = fused_rnn.GRU(8, 16, num_layers=2, dropout=0.3)  # dropout in training: masks every call
    elif kind == "RNN":
        m = fused_rnn.RNN(8, 16, nonlinearity="relu", bidirectional=True)
    else:
        m = getattr(fused_rnn, kind)(8, 64)
    cell = kind.endswith("Cell")
    # Big enough that keeping one call's tensors alive would show as tens of MB over 1,000 calls.
    x = torch.randn(64, 8) if cell else torch.randn(10, 16, 8)
    packed = None if cell else pack_sequence([torch.randn(n, 8) for n in (10, 9, 9, 7, 7, 7, 5, 2)] * 2,
                                             enforce_sorted=False)

    def step(i):
        xi = x.clone().requires_grad_()
        out = m(xi) if cell or i % 2 else m(packed)
        _backward(out)
        return out
    return m, step


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_no_memory_growth_cpu(kind, one_thread):
    m, step = _steps(kind)
    for i in range(100):  # warm up: allocator pools, autograd and dispatcher caches
        step(i)
    gc.collect()
    before = _rss()
    for i in range(ITERATIONS):
        out = step(i)
    gc.collect()
    growth = _rss() - before
    assert growth < RSS_TOLERANCE, f"RSS grew by {growth / 2**20:.1f} MB over {ITERATIONS} calls"
    # nothing keeps the last output (and so its graph) alive once we let go of it
    ref = weakref.ref(leaves(out)[0])
    del out
    gc.collect()
    assert ref() is None, "the output is still referenced after the call"
    assert all(p.grad is not None for p in m.parameters())


@needs_cuda
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell"])
def test_no_memory_growth_cuda(kind):
    m, _ = _steps(kind)
    m = m.cuda()
    cell = kind.endswith("Cell")
    x = (torch.randn(4, 8) if cell else torch.randn(10, 4, 8)).cuda()

    def step():
        _backward(m(x.clone().requires_grad_()))
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(ITERATIONS):
        step()
    torch.cuda.synchronize()
    # parameters' .grad were allocated in warm-up; anything beyond that is a leak
    assert torch.cuda.memory_allocated() - before < 256 * 1024


# ---------------------------------------------------------------------------------------------------
# Two threads, one module
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [("LSTM", {"num_layers": 2, "bidirectional": True, "proj_size": 3}),
                                        ("GRU", {"num_layers": 2}), ("RNN", {"nonlinearity": "relu"}),
                                        ("LSTMCell", {}), ("GRUCell", {})])
def test_two_threads_one_module(kind, extra):
    """Both threads call the same module at once, many times; every result (outputs and gradients
    via autograd.grad, which leaves .grad alone) equals torch.nn's for that thread's input."""
    torch.manual_seed(1)
    fused, ref = make_pair(kind, 5, 6, **extra)
    cell = kind.endswith("Cell")
    rounds = 6
    inputs = [[torch.randn((3, 5) if cell else (7, 3, 5), dtype=torch.float64) for _ in range(rounds)]
              for _ in range(2)]
    params = list(fused.parameters())
    results = [[None] * rounds for _ in range(2)]
    errors = []
    barrier = threading.Barrier(2)

    def compute(module, x, module_params):
        x = x.clone().requires_grad_()
        outs = leaves(module(x))
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outs))
        grads = torch.autograd.grad(loss, [x] + module_params)
        return [o.detach() for o in outs] + list(grads)

    def worker(t):
        try:
            barrier.wait()
            for r in range(rounds):
                results[t][r] = compute(fused, inputs[t][r], params)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    ref_params = list(ref.parameters())
    for t in range(2):
        for r in range(rounds):
            expected = compute(ref, inputs[t][r], ref_params)
            for a, e in zip(results[t][r], expected):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a GPU with 40 GB")
def test_sizes_past_2_31_elements_cuda():
    """x·W_ihᵀ for all steps has T·B·4H > 2^31 elements (and so do the row offsets into it): the
    result must be right. The CUDA path refuses no such size (the only size it refuses is a step
    that its kernel's grid cannot hold, "step too large for the CUDA kernel's grid": 2^31 rows, or
    65,535 unit tiles, far from these 1,024 rows of 512 units), so a refusal fails the test."""
    torch.manual_seed(2)
    T, B, I, H = 1025, 1024, 1, 512
    assert T * B * 4 * H > 2**31
    lstm = fused_rnn.LSTM(I, H, device="cuda")
    x = torch.randn(T, B, I, device="cuda")
    with torch.no_grad():
        out, (h_n, c_n) = lstm(x)
    # The last batch rows, computed alone (a small problem), must agree with the big call.
    rows = slice(B - 4, B)
    with torch.no_grad():
        out_small, (h_small, c_small) = lstm(x[:, rows].contiguous())
    torch.testing.assert_close(out[:, rows], out_small, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_n[:, rows], h_small, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_n[:, rows], c_small, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(out).all()


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    from torch.nn.utils.rnn import pack_sequence
    import fused_rnn

    torch.manual_seed(0)
    dev = "cuda"
    for cls, kw in [(fused_rnn.LSTM, dict(proj_size=5)), (fused_rnn.GRU, {}),
                    (fused_rnn.RNN, dict(nonlinearity="relu"))]:
        m = cls(7, 33, num_layers=2, bidirectional=True, device=dev, **kw)  # 33: not a tile multiple
        x = torch.randn(6, 3, 7, device=dev, requires_grad=True)
        out, _ = m(x)
        out.sum().backward()
        packed = pack_sequence([torch.randn(n, 7, device=dev) for n in (6, 4, 1)], enforce_sorted=False)
        out, _ = m(packed)
        out.data.sum().backward()
    for cls in (fused_rnn.LSTMCell, fused_rnn.GRUCell, fused_rnn.RNNCell):
        cell = cls(7, 33, device=dev)
        out = cell(torch.randn(5, 7, device=dev))
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@needs_cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer on PATH")
def test_compute_sanitizer_memcheck(tmp_path):
    script = tmp_path / "sanitize_me.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # so memcheck sees each allocation's bounds
    proc = subprocess.run(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, str(script)],
        env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-5000:]
    assert "sanitizer script done" in report
    assert "ERROR SUMMARY: 0 errors" in report, report[-5000:]
