"""Times fused_rnn's layers against torch.nn (cuDNN on a GPU, oneDNN/native on the CPU) in one run.

    python -m bench                 # quick grid on whatever device is present
    python -m bench --cells LSTM --shapes 100x64x512 --modes inference

Contenders, in one run and with the same weights: fused_rnn, torch.nn (cuDNN on a GPU, oneDNN or
the native path on the CPU) and a plain PyTorch loop of the same cell (bench/loop.py). Prints a
markdown table (milliseconds, speedup = torch.nn time / fused time), appends JSON records to
bench/results/<device>.json and draws the speedups to bench/results/<device>.png.

Timing: warm-up first; on a GPU CUDA events around each call, on the CPU perf_counter. The
contenders run interleaved, round after round, and each reports its median, so that a drift of the
machine hits all alike, and the order of the contenders rotates from round to round. Inputs rotate
among a few tensors so that caches do not flatter.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import fused_rnn
from bench.loop import LoopRNN

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Cases (T, B, I, H, layers, bidirectional). The quick grid finishes in a few minutes on a 2-core CPU.
QUICK_CASES = [(100, 64, 512, 512, 1, False), (100, 8, 256, 256, 1, False), (100, 1, 256, 256, 1, False)]
# On a GPU the quick grid also takes the large batch and B=1/8 at the default size (seconds there).
QUICK_CASES_GPU = QUICK_CASES + [(100, 256, 512, 512, 1, False), (100, 8, 512, 512, 1, False),
                                 (100, 1, 512, 512, 1, False)]
FULL_CASES = [
    (100, 64, 512, 512, 1, False),  # the fastrnns default
    (100, 1, 256, 256, 1, False), (100, 1, 512, 512, 1, False), (100, 1, 1024, 1024, 1, False),
    (100, 8, 256, 256, 1, False), (100, 8, 512, 512, 1, False), (100, 8, 1024, 1024, 1, False),
    (100, 256, 1024, 1024, 1, False),  # large
    (1024, 16, 768, 768, 1, False),  # long
    (100, 64, 512, 512, 2, False),  # stacked
    (100, 64, 512, 512, 1, True),  # bidirectional
]
RECORD_FIELDS = ["device", "torch", "cell", "T", "B", "I", "H", "layers", "bidirectional", "dtype", "mode",
                 "ms_fused", "ms_reference", "reference", "ms_loop", "mb_fused", "mb_reference", "mb_loop"]
ROTATION = 3  # distinct inputs cycled through
CELLS = {"LSTM": (fused_rnn.LSTM, torch.nn.LSTM), "GRU": (fused_rnn.GRU, torch.nn.GRU),
         "RNN": (fused_rnn.RNN, torch.nn.RNN)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device):
    """Milliseconds of one call of fn()."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_megabytes(fn, device):
    """Peak memory allocated during one call beyond what was held before, in MB (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 2)


def make_step(module, inputs, mode):
    """A call that runs the next input through module: no_grad forward, or forward+backward."""
    state = {"k": 0}

    def step():
        x = inputs[state["k"] % len(inputs)]
        state["k"] += 1
        if mode == "inference":
            with torch.no_grad():
                module(x)
        else:
            out, _ = module(x)
            out.sum().backward()
    return step


def bench_one(cell, case, dtype, mode, device, repeats):
    steps, batch, inputs, hidden, layers, bidirectional = case
    fused_cls, ref_cls = CELLS[cell]
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    ref = ref_cls(inputs, hidden, **kwargs)
    fused = fused_cls(inputs, hidden, **kwargs)
    fused.load_state_dict(ref.state_dict())
    xs = [torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=(mode == "training"))
          for _ in range(ROTATION)]
    contenders = {"fused": make_step(fused, xs, mode), "reference": make_step(ref, xs, mode),
                  "loop": make_step(LoopRNN(ref), xs, mode)}
    for fn in contenders.values():  # warm-up: first-call allocations, cuDNN plans, page faults
        fn()
    _sync(device)
    memory = {name: peak_megabytes(fn, device) for name, fn in contenders.items()}
    samples = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        # The order rotates, so that no contender always runs right after the same other one (after
        # the slow loop, say, whose allocations leave the allocator and the caches in another state).
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            samples[name].append(time_call(contenders[name], device))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "device": device_name(device), "torch": torch.__version__, "cell": cell,
        "T": steps, "B": batch, "I": inputs, "H": hidden, "layers": layers,
        "bidirectional": bidirectional, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
        "ms_fused": round(ms["fused"], 4), "ms_reference": round(ms["reference"], 4),
        "reference": "torch.nn (cuDNN)" if device.type == "cuda" else "torch.nn (CPU)",
        "ms_loop": round(ms["loop"], 4),
        "mb_fused": memory["fused"], "mb_reference": memory["reference"], "mb_loop": memory["loop"],
    }


def case_label(r):
    return (f"{r['cell']} T{r['T']} B{r['B']} H{r['H']}" + (f" L{r['layers']}" if r["layers"] > 1 else "")
            + (" bi" if r["bidirectional"] else "") + f" {r['dtype']}")


def plot(records, path):
    """Speedups over torch.nn of fused_rnn and of the plain loop, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in records})
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 0.55 * len(records) + 2), 4 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in records if r["mode"] == mode]
        pos = range(len(rows))
        ax.bar([p - 0.2 for p in pos], [r["ms_reference"] / r["ms_fused"] for r in rows], 0.4, label="fused_rnn")
        ax.bar([p + 0.2 for p in pos], [r["ms_reference"] / r["ms_loop"] for r in rows], 0.4, label="plain loop")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(pos))
        ax.set_xticklabels([case_label(r) for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup over torch.nn")
        ax.set_title(f"{records[0]['device']}, {mode}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(records):
    print("| case | mode | fused ms | torch.nn ms | loop ms | speedup vs torch.nn | loop vs torch.nn |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {case_label(r)} | {r['mode']} | {r['ms_fused']:.2f} | {r['ms_reference']:.2f} | "
              f"{r['ms_loop']:.2f} | {r['ms_reference'] / r['ms_fused']:.2f}x | "
              f"{r['ms_reference'] / r['ms_loop']:.2f}x |")
    if records:
        speedups = [r["ms_reference"] / r["ms_fused"] for r in records]
        print(f"\ngeometric-mean speedup {statistics.geometric_mean(speedups):.2f}x over {len(records)} cases "
              f"(min {min(speedups):.2f}x, max {max(speedups):.2f}x)")


def quick_cases(device):
    return QUICK_CASES_GPU if device.type == "cuda" else QUICK_CASES


def parse_case(text):
    """TxBxH or TxBxIxH."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 3:
        parts = [parts[0], parts[1], parts[2], parts[2]]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be TxBxH or TxBxIxH, got {text!r}")
    return tuple(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole grid instead of the quick one")
    p.add_argument("--cells", default="LSTM,GRU,RNN")
    p.add_argument("--shapes", type=parse_case, nargs="+", help="TxBxH or TxBxIxH (replaces the grid)")
    p.add_argument("--layers", type=int, default=1, help="with --shapes")
    p.add_argument("--bidirectional", action="store_true", help="with --shapes")
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--dtypes", default=None, help="default: float32 (plus bfloat16,float16 on a GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 on the CPU, 25 on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true", help="neither records nor plot")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.shapes:
        cases = [s + (args.layers, args.bidirectional) for s in args.shapes]
    else:
        cases = FULL_CASES if args.full else quick_cases(device)
    dtypes = args.dtypes or ("float32,bfloat16,float16" if device.type == "cuda" else "float32")
    repeats = args.repeats or (25 if device.type == "cuda" else 5)
    grid = [(c, s, d, m) for c in args.cells.split(",") for s in cases
            for d in dtypes.split(",") for m in args.modes.split(",")]

    records = []
    print(f"# fused_rnn benchmark on {device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    t0 = time.perf_counter()
    for k, (cell, case, dtype, mode) in enumerate(grid, 1):
        print(f"[{k}/{len(grid)} {time.perf_counter() - t0:6.0f}s] {cell} T,B,I,H,layers,bi={case} "
              f"{dtype} {mode}", file=sys.stderr, flush=True)
        records.append(bench_one(cell, case, DTYPES[dtype], mode, device, repeats))
    print_table(records)

    if not args.no_save and records:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, device_name(device).replace(" ", "_"))
        old = json.load(open(stem + ".json")) if os.path.exists(stem + ".json") else []
        with open(stem + ".json", "w") as f:
            json.dump(old + records, f, indent=1)
        plot(records, stem + ".png")
        print(f"records appended to {stem}.json, plot in {stem}.png", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
