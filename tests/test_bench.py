"""The benchmark harness itself, on tiny shapes: records with every field and their spread, a plot,
files only where asked, optional peers skipped cleanly. Nothing here is timed."""
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fused_rnn

pytest.importorskip("matplotlib")
from bench import run  # noqa: E402

TINY = ["--shapes", "3x2x4", "--repeats", "2", "--device", "cpu"]


def check_spread(r):
    for name, median in r["ms"].items():
        s = r["spread"][name]
        assert 0 < s["min"] <= s["q1"] <= median <= s["q3"] <= s["max"], (name, s, median)
    assert set(r["speedup"]) == set(r["ms"]) - {"fused"}
    for s in r["speedup"].values():
        assert 0 < s["q1"] <= s["median"] <= s["q3"]


def test_harness_writes_records_with_spread_and_plot(tmp_path, capsys):
    records = run.main(TINY + ["--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(records) == 6  # 3 cells x 2 modes
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    assert json.load(open(tmp_path / files[0])) == records
    assert os.path.getsize(tmp_path / files[1]) > 1000
    for r in records:
        assert set(run.RECORD_FIELDS) <= set(r), set(run.RECORD_FIELDS) - set(r)
        assert (r["T"], r["B"], r["I"], r["H"], r["layers"], r["bidirectional"]) == (3, 2, 4, 4, 1, False)
        assert r["torch"] == torch.__version__ and r["threads"] == torch.get_num_threads()
        assert datetime.datetime.fromisoformat(r["date"]).tzinfo is not None
        assert r["tf32"] is None and r["mb"] is None  # GPU only
        assert r["rounds"] == 2 and r["lengths"] == "full"
        assert {"fused", "torch.nn"} <= set(r["ms"]) and "loop" not in r["ms"]  # the loop only with --loop
        check_spread(r)
        assert isinstance(r["wide_spread"], bool) and isinstance(r["loaded"], bool)
        # torch.nn timed as a long-running program runs it: glibc's malloc keeps freed memory
        if platform.libc_ver()[0] == "glibc":
            assert r["malloc"] == "glibc: mmap threshold 32 MB, trim threshold 1 GB"
    assert {(r["cell"], r["mode"]) for r in records} == {(c, m) for c in ("LSTM", "GRU", "RNN")
                                                         for m in ("inference", "training")}
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6  # header, rule, rows
    assert all("(" in row and "–" in row for row in rows[2:])  # every timing with its quartiles

    # A second run writes its own pair of files: nothing is appended to the first run's records.
    run.main(TINY + ["--cells", "GRU", "--modes", "inference", "--results-dir", str(tmp_path)])
    assert len(os.listdir(tmp_path)) == 4
    assert json.load(open(tmp_path / files[0])) == records


def test_peers_and_packed_rows():
    """int8 for LSTM/GRU inference only; packed rows time torch.nn packed and padded."""
    lstm = run.bench_one("LSTM", (4, 3, 4, 4, 1, False), torch.float32, "inference", torch.device("cpu"), 2)
    assert "int8" in lstm["ms"]
    rnn = run.bench_one("RNN", (4, 3, 4, 4, 1, False), torch.float32, "inference", torch.device("cpu"), 2)
    assert "int8" not in rnn["ms"]
    training = run.bench_one("GRU", (4, 3, 4, 4, 1, False), torch.float32, "training", torch.device("cpu"), 2)
    assert set(training["ms"]) == {"fused", "torch.nn"}  # the peers are inference-only
    packed = run.bench_one("LSTM", (8, 5, 4, 4, 1, True), torch.float32, "training", torch.device("cpu"), 3,
                           lengths="packed")
    assert packed["lengths"].startswith("packed") and packed["rounds"] == 3
    assert set(packed["ms"]) == {"fused", "torch.nn", "torch.nn padded"}
    check_spread(packed)
    peephole = run.bench_one("LSTM", (4, 3, 4, 4, 1, False), torch.float32, "training", torch.device("cpu"), 2,
                             variant="peephole")
    assert peephole["variant"] == "peephole" and set(peephole["ms"]) == {"fused", run.PLAIN, "torch.nn",
                                                                          run.COMPILED_LOOP}
    check_spread(peephole)
    lengths = run.packed_lengths(100, 64)
    assert 25 <= lengths.min() and lengths.max() <= 100 and len(set(lengths.tolist())) > 10


def test_int8_rows_time_both_int8_layers():
    """The int8 peer is torch's quantized layer (quantize_dynamic does not swap a bare layer: the
    harness once timed float32 under that name), and the int8 row times ours against it."""
    from torch.ao.nn.quantized import dynamic as nnqd
    assert type(run.quantized(torch.nn.LSTM(4, 4))) is nnqd.LSTM
    assert type(run.quantized(fused_rnn.GRU(4, 4))) is fused_rnn.quantized.GRU
    row = run.bench_one("GRU", (4, 3, 4, 4, 1, False), run.INT8, "inference", torch.device("cpu"), 2)
    assert set(row["ms"]) == {"fused", "torch.nn", "int8"} and row["dtype"] == "int8"
    assert set(row["error"]) == {"fused", "int8"} and all(e > 0 for e in row["error"].values())
    check_spread(row)
    grid = run.main(["--shapes", "4x2x4", "--cells", "LSTM,RNN", "--dtypes", "float32,int8", "--repeats", "1",
                     "--no-save"])
    assert [(r["cell"], r["dtype"], r["mode"]) for r in grid] == [
        ("LSTM", "float32", "inference"), ("LSTM", "float32", "training"), ("RNN", "float32", "inference"),
        ("RNN", "float32", "training"), ("LSTM", "int8", "inference")]


def test_absent_onnxruntime_is_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    notes = set()
    r = run.bench_one("GRU", (4, 3, 4, 4, 1, False), torch.float32, "inference", torch.device("cpu"), 2,
                      notes=notes)
    assert "onnxruntime" not in r["ms"]
    assert any("ONNX Runtime not installed" in n for n in notes)


def test_onnxruntime_peer_when_installed():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    notes = set()
    r = run.bench_one("LSTM", (4, 3, 4, 4, 1, False), torch.float32, "inference", torch.device("cpu"), 2,
                      notes=notes)
    assert "onnxruntime" in r["ms"], notes
    check_spread(r)


def test_loaded_machine_and_wide_spread_are_reported(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(run, "load_average", lambda: float(os.cpu_count() + 4))
    records = run.main(TINY + ["--cells", "RNN", "--modes", "inference", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert records[0]["loaded"] and records[0]["load_average"] == os.cpu_count() + 4
    assert "the machine was loaded" in out and "!" in [line for line in out.splitlines() if line.startswith("| RNN")][0]
    assert not run.machine_is_loaded(float(os.cpu_count())) and not run.machine_is_loaded(None)

    wide = dict(records[0], wide_spread=True, loaded=False)
    assert any("wide spread" in line for line in run.warnings_for([wide], set()))
    assert run.marks(wide) == "~"


def test_update_reference_writes_only_when_asked(monkeypatch, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    monkeypatch.setattr(run, "REFERENCE_DIR", str(reference))
    run.main(TINY + ["--cells", "RNN", "--results-dir", str(out)])
    assert not reference.exists()
    records = run.main(TINY + ["--cells", "RNN", "--results-dir", str(out), "--update-reference"])
    stem = run.device_name(torch.device("cpu")).replace(" ", "_")
    assert json.load(open(reference / f"{stem}.json")) == records  # replaced, not appended
    assert (reference / f"{stem}.png").exists()


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_default_run_leaves_the_tree_clean():
    """A run with the default folder writes into bench/out/, which git ignores."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if shutil.which("git") is None or not os.path.exists(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    assert run.OUT_DIR == os.path.join(root, "bench", "out")
    before = git("status", "--porcelain", "--untracked-files=all", cwd=root)
    existing = set(os.listdir(run.OUT_DIR)) if os.path.isdir(run.OUT_DIR) else set()
    try:
        run.main(TINY + ["--cells", "RNN", "--modes", "inference"])
        assert len(set(os.listdir(run.OUT_DIR)) - existing) == 2
        assert git("status", "--porcelain", "--untracked-files=all", cwd=root) == before
    finally:
        for name in set(os.listdir(run.OUT_DIR)) - existing:
            os.remove(os.path.join(run.OUT_DIR, name))


def test_loop_reference_matches_torch_nn():
    """The plain-loop contender computes what torch.nn computes (else its timings mean nothing)."""
    from bench.loop import LoopRNN
    for cls, kw in ((torch.nn.LSTM, {}), (torch.nn.GRU, {}), (torch.nn.RNN, {"nonlinearity": "relu"})):
        ref = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64, **kw)
        x = torch.randn(3, 6, 4, dtype=torch.float64)
        out, h = ref(x)
        out_loop, h_loop = LoopRNN(ref)(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h if not isinstance(h, tuple) else h[0])


def test_loop_reference_of_a_peephole_lstm_matches_it():
    """The variant rows' loop (eager and with its step compiled) computes fused_rnn's peephole LSTM."""
    from bench.loop import LoopRNN
    fused = fused_rnn.LSTM(4, 5, num_layers=2, bidirectional=True, dtype=torch.float64, peephole=True)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "peephole" in name:
                p.uniform_(-1, 1)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    out, (h, _) = fused(x)
    for loop in (LoopRNN(fused), LoopRNN(fused, compile_step=True)):
        out_loop, h_loop = loop(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h)
    assert all(case[1] >= 8 and case[3] >= 256 for case in run.QUICK_VARIANT_CASES + run.FULL_VARIANT_CASES)
    for cls in (fused_rnn.LSTM, fused_rnn.GRU):  # zoneout, in eval: its expectation
        zoned = cls(4, 5, num_layers=2, dtype=torch.float64, zoneout=0.3).eval()
        out, h = zoned(x)
        out_loop, h_loop = LoopRNN(zoned).eval()(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h[0] if isinstance(h, tuple) else h)
    for cls in (fused_rnn.LSTM, fused_rnn.GRU):  # recurrent dropout in training: the same seed, the same masks
        dropped = cls(4, 5, num_layers=2, bidirectional=True, dtype=torch.float64, recurrent_dropout=0.5).train()
        torch.manual_seed(3)
        out, h = dropped(x)
        torch.manual_seed(3)
        out_loop, h_loop = LoopRNN(dropped).train()(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h[0] if isinstance(h, tuple) else h)
        assert not torch.allclose(out, dropped.eval()(x)[0])  # the masks made a difference
    for cls in (fused_rnn.LSTM, fused_rnn.GRU):  # layer norm, its weights away from 1 and 0
        normed = cls(4, 5, num_layers=2, dtype=torch.float64, layer_norm=True)
        with torch.no_grad():
            for name, p in normed.named_parameters():
                if name.startswith("ln_"):
                    p.uniform_(0.5, 1.5)
        out, h = normed(x)
        out_loop, h_loop = LoopRNN(normed)(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h[0] if isinstance(h, tuple) else h)


def test_quick_grid_on_a_gpu_has_the_issue_shapes():
    """T=100, I=H=512 at B=1, 8, 64 and 256 on a GPU; the CPU's quick grid stays small."""
    gpu = {(c[1], c[3]) for c in run.quick_cases(torch.device("cuda")) if c[0] == 100 and c[2] == c[3]}
    assert {(1, 512), (8, 512), (64, 512), (256, 512)} <= gpu
    assert run.quick_cases(torch.device("cpu")) == run.QUICK_CASES


def test_gpu_smoke_script_runs_on_the_cpu():
    """bench/gpu_smoke.py (every kernel once, for compute-sanitizer on a GPU) must not rot between GPU sessions."""
    from bench import gpu_smoke
    assert gpu_smoke.main(["--device", "cpu"]) == 0


@pytest.mark.parametrize("call,files", [(1, {"summary.txt", "probe.md", "probe.json"}),
                                        (2, {"summary.txt", "ab_fused.md", "ab_unfused.md", "bench.md", "bench.log",
                                             "results"})])
def test_gpu_check_script_dry_runs_on_the_cpu(tmp_path, call, files):
    """bench/gpu_check.sh must not rot between GPU sessions: each call runs dry here (installed
    build, tests and sanitizers skipped, probe and benchmark on the CPU), every stage under its
    timeout, and leaves no more files than come back from a device call (7)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    run = subprocess.run(["bash", "bench/gpu_check.sh", str(call)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"call {call} took" in run.stdout and "TIMED OUT" not in run.stdout
    assert files <= set(os.listdir(tmp_path)), os.listdir(tmp_path)
    count = sum(len(names) for _, _, names in os.walk(tmp_path))
    assert count <= 7, sorted(os.listdir(tmp_path))


def _amx_probe_errors(output):
    line = next(text for text in output.splitlines() if "largest error against float64" in text)
    tiles, amx, chain = (float(v) for v in re.findall(r"(?:tiles|AMX|chain) ([0-9.e+-]+)", line))
    return tiles, amx, chain


@pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64", reason="needs g++ on x86-64")
def test_amx_probe_builds_and_its_split_product_is_float32_accurate(tmp_path):
    """bench/amx_probe.cpp (bench/NOTES.md, sessions 14 and 17) must not rot: it builds against
    wide_float.h and amx_float.h as they are; where the CPU has AMX-BF16, the library's product from
    three bfloat16 parts per float (six partial products) is no less accurate than a float32 FMA
    chain against float64, and the AVX-512 tiles give each output bitwise that chain."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = str(tmp_path / "amx_probe")
    subprocess.run(["g++", "-O3", "-mavx2", "-mfma", "-std=c++17", os.path.join(root, "bench", "amx_probe.cpp"), "-o", binary],
                   check=True, timeout=300, capture_output=True)
    probe = subprocess.run([binary, "64", "128", "512"], capture_output=True, text=True, timeout=120)
    if probe.returncode == 2:
        pytest.skip(probe.stdout.strip())
    assert probe.returncode == 0, probe.stdout + probe.stderr
    tiles, amx, chain = _amx_probe_errors(probe.stdout)
    assert 0 < amx <= chain and tiles == chain, probe.stdout
    assert "differ from the FMA chain's bits: 0" in probe.stdout, probe.stdout


def test_cell_loops_are_timed_against_torch_nn_cells(tmp_path, capsys):
    """A cell's row times a loop of T calls, inference and training, beside torch.nn's cell."""
    records = run.main(TINY + ["--cells", "GRUCell,LSTMCell", "--no-save"])
    out = capsys.readouterr().out
    assert {(r["cell"], r["mode"]) for r in records} == {(c, m) for c in ("GRUCell", "LSTMCell")
                                                         for m in ("inference", "training")}
    for r in records:
        assert set(r["ms"]) == {"fused", "torch.nn"}
        check_spread(r)
    assert "GRUCell x3 calls B2 H4 float32" in out
    step = run.make_cell_loop(fused_rnn.LSTMCell(4, 4), [torch.randn(3, 2, 4)], "training")
    step()  # backward through the chain of calls, once per loop


def test_the_default_grid_has_cell_loops_and_short_layer_calls():
    assert set(run.CELL_KINDS) <= set(run.CELLS)
    assert any(case[0] <= 4 for case in run.SHORT_CASES)
    assert {(b, h) for _, b, _, h, _, _ in run.FULL_CELL_LOOP_CASES} == {(b, h) for b in (1, 8, 64)
                                                                          for h in (64, 256, 512)}


def test_clients_run_an_unmodified_script_with_fused_rnn_swapped_in(tmp_path):
    """bench/clients.py's runner: the same script, once with torch.nn's classes and once with
    fused_rnn's in their place, built by the script's own `nn.LSTM(...)`; its numbers parsed."""
    from bench import clients
    (tmp_path / "example.py").write_text(
        "import sys, torch.nn as nn\n"
        "for name in ('LSTM', 'GRU', 'RNN', 'LSTMCell', 'GRUCell', 'RNNCell'):\n"
        "    print(name, getattr(nn, name)(2, 3).__class__.__module__)\n"
        "print('loss:', float(sys.argv[1]))\n")
    _, plain = clients.run_example(str(tmp_path), "example.py", ["1.5"], False, 120)
    _, swapped = clients.run_example(str(tmp_path), "example.py", ["1.5"], True, 120)
    assert plain.count("torch.nn.modules.rnn") == 6 and "fused_rnn" not in plain
    assert swapped.count("fused_rnn.modules") == 6
    assert clients.floats_after("loss:", swapped) == [1.5]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_setting_is_recorded_and_cold_malloc_leaves_glibc_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: calls.append(1) or "kept")
    kept = run.main(TINY + ["--cells", "RNN", "--modes", "inference", "--no-save"])
    cold = run.main(TINY + ["--cells", "RNN", "--modes", "inference", "--no-save", "--cold-malloc"])
    assert calls == [1]  # mallopt only when not --cold-malloc
    assert [r["malloc"] for r in kept] == ["kept"] and [r["malloc"] for r in cold] == ["glibc start-up settings"]
