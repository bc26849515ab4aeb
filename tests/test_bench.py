"""The benchmark harness itself, on a tiny shape: records with every field, a plot. No timings."""
import json
import os

import pytest

pytest.importorskip("matplotlib")
from bench import run  # noqa: E402


def test_harness_writes_records_and_plot(tmp_path, capsys):
    records = run.main(["--shapes", "3x2x4", "--repeats", "1", "--device", "cpu",
                        "--results-dir", str(tmp_path)])
    table = capsys.readouterr().out
    assert len(records) == 6  # 3 cells x 2 modes
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    saved = json.load(open(tmp_path / files[0]))
    assert saved == records
    for r in saved:
        assert set(run.RECORD_FIELDS) <= set(r), set(run.RECORD_FIELDS) - set(r)
        assert (r["T"], r["B"], r["I"], r["H"], r["layers"], r["bidirectional"]) == (3, 2, 4, 4, 1, False)
        assert r["ms_fused"] > 0 and r["ms_reference"] > 0 and r["ms_loop"] > 0
        assert r["mb_fused"] is None  # peak memory is measured on a GPU only
    assert {(r["cell"], r["mode"]) for r in saved} == {(c, m) for c in ("LSTM", "GRU", "RNN")
                                                        for m in ("inference", "training")}
    assert os.path.getsize(tmp_path / files[1]) > 1000
    assert sum(line.startswith("|") for line in table.splitlines()) == 1 + 1 + 6  # header, rule, rows

    # A second run appends instead of overwriting.
    run.main(["--shapes", "3x2x4", "--repeats", "1", "--device", "cpu", "--cells", "GRU",
              "--modes", "inference", "--results-dir", str(tmp_path)])
    assert len(json.load(open(tmp_path / files[0]))) == 7


def test_loop_reference_matches_torch_nn():
    """The plain-loop contender computes what torch.nn computes (else its timings mean nothing)."""
    import torch
    from bench.loop import LoopRNN
    for cls, kw in ((torch.nn.LSTM, {}), (torch.nn.GRU, {}), (torch.nn.RNN, {"nonlinearity": "relu"})):
        ref = cls(4, 5, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64, **kw)
        x = torch.randn(3, 6, 4, dtype=torch.float64)
        out, h = ref(x)
        out_loop, h_loop = LoopRNN(ref)(x)
        torch.testing.assert_close(out_loop, out)
        torch.testing.assert_close(h_loop, h if not isinstance(h, tuple) else h[0])


def test_quick_grid_on_a_gpu_has_the_issue_shapes():
    """T=100, I=H=512 at B=1, 8, 64 and 256 on a GPU; the CPU's quick grid stays small."""
    import torch
    gpu = {(c[1], c[3]) for c in run.quick_cases(torch.device("cuda")) if c[0] == 100 and c[2] == c[3]}
    assert {(1, 512), (8, 512), (64, 512), (256, 512)} <= gpu
    assert run.quick_cases(torch.device("cpu")) == run.QUICK_CASES


def test_gpu_smoke_script_runs_on_the_cpu():
    """bench/gpu_smoke.py (every kernel once, for compute-sanitizer on a GPU) must not rot between GPU sessions."""
    from bench import gpu_smoke
    assert gpu_smoke.main(["--device", "cpu"]) == 0
