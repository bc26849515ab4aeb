"""Times fused_rnn's layers against torch.nn (cuDNN on a GPU, oneDNN/native on the CPU) in one run.

    python -m bench                 # quick grid on whatever device is present
    python -m bench --cells LSTM --shapes 100x64x512 --modes inference

Prints a markdown table (milliseconds and speedup = torch.nn time / fused time) and appends JSON
records to bench/results/<device>.json.
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

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (T, B, I, H): the fastrnns default, then small batches.
QUICK_SHAPES = [(100, 64, 512, 512), (100, 8, 256, 256), (100, 1, 256, 256)]
FULL_SHAPES = QUICK_SHAPES + [(100, 1, 512, 512), (100, 8, 512, 512), (100, 8, 1024, 1024),
                              (100, 1, 1024, 1024), (100, 256, 1024, 1024), (1024, 16, 768, 768)]
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


def time_call(fn, device, repeats):
    """Median milliseconds of fn(), after fn has been warmed up by the caller."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_step(module, x, mode):
    if mode == "inference":
        def step():
            with torch.no_grad():
                module(x)
    else:
        def step():
            out, _ = module(x)
            out.sum().backward()
    return step


def bench_one(cell, shape, layers, bidirectional, dtype, mode, device, repeats):
    steps, batch, inputs, hidden = shape
    fused_cls, ref_cls = CELLS[cell]
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    ref = ref_cls(inputs, hidden, **kwargs)
    fused = fused_cls(inputs, hidden, **kwargs)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=(mode == "training"))
    contenders = {"fused": make_step(fused, x, mode), "reference": make_step(ref, x, mode)}
    for fn in contenders.values():  # warm-up
        fn()
    _sync(device)
    # Interleave the contenders so that drifts of the machine hit both alike.
    samples = {name: [] for name in contenders}
    rounds = max(1, repeats // 3)
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(time_call(fn, device, 3))
    ms = {name: statistics.median(v) for name, v in samples.items()}
    return {
        "device": device_name(device), "torch": torch.__version__, "cell": cell,
        "T": steps, "B": batch, "I": inputs, "H": hidden, "layers": layers,
        "bidirectional": bidirectional, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
        "ms_fused": round(ms["fused"], 4), "ms_reference": round(ms["reference"], 4),
        "reference": "torch.nn (cuDNN)" if device.type == "cuda" else "torch.nn (CPU)",
    }


def parse_shape(text):
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 3:  # TxBxH with I = H
        parts = [parts[0], parts[1], parts[2], parts[2]]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must be TxBxH or TxBxIxH, got {text!r}")
    return tuple(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the whole grid instead of the quick one")
    p.add_argument("--cells", default="LSTM,GRU,RNN")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help="TxBxH or TxBxIxH")
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--dtypes", default=None, help="default: float32 (plus bfloat16 on a GPU)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    shapes = args.shapes or (FULL_SHAPES if args.full else QUICK_SHAPES)
    dtypes = args.dtypes or ("float32,bfloat16" if device.type == "cuda" else "float32")
    grid = [(c, s, d, m) for c in args.cells.split(",") for s in shapes
            for d in dtypes.split(",") for m in args.modes.split(",")]

    records = []
    print(f"# fused_rnn benchmark on {device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    for k, (cell, shape, dtype, mode) in enumerate(grid, 1):
        print(f"[{k}/{len(grid)}] {cell} T,B,I,H={shape} {dtype} {mode}", file=sys.stderr, flush=True)
        records.append(bench_one(cell, shape, args.layers, args.bidirectional, DTYPES[dtype], mode,
                                 device, args.repeats))

    print(f"| cell | T | B | I | H | layers | dtype | mode | fused ms | torch.nn ms | speedup |")
    print(f"|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['cell']} | {r['T']} | {r['B']} | {r['I']} | {r['H']} | {r['layers']}"
              f"{' bi' if r['bidirectional'] else ''} | {r['dtype']} | {r['mode']} | {r['ms_fused']:.2f} | "
              f"{r['ms_reference']:.2f} | {r['ms_reference'] / r['ms_fused']:.2f}x |")
    if records:
        speedups = [r["ms_reference"] / r["ms_fused"] for r in records]
        geo = statistics.geometric_mean(speedups)
        print(f"\ngeometric-mean speedup {geo:.2f}x over {len(records)} cases "
              f"(min {min(speedups):.2f}x, max {max(speedups):.2f}x)")

    if not args.no_save:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, device_name(device).replace(" ", "_") + ".json")
        old = json.load(open(path)) if os.path.exists(path) else []
        with open(path, "w") as f:
            json.dump(old + records, f, indent=1)
        print(f"records appended to {os.path.relpath(path)}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
