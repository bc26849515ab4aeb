"""The timing probe of the GPU check: µs per step of fused_rnn's step kernels beside cuDNN's, on the
shapes that bench/GPU_NOTES.md models, so that the first GPU run checks the model.

    python bench/gpu_probe.py [--device cuda] [--out probe.json] [--steps 100] [--repeats 20]

Per shape (cell, B, H, dtype): one layer, T steps, forward (inference) and forward+backward
(training), fused and torch.nn (cuDNN on a GPU) interleaved round after round with CUDA events
(perf_counter on the CPU), the median of the rounds over T: µs per step. Also with
FUSED_RNN_CUDA_UNFUSED_BACKWARD's path for training (the cell kernel + cuBLAS per step); float32
with torch.backends.cudnn.allow_tf32 on (TF32 tensor cores, ours and cuDNN's) and off (exact), and
there each step-kernel variant forced (FUSED_RNN_CUDA_ROWS_PER_BLOCK) beside the cost model's pick,
so that the first GPU run checks the model's choice, and the persistent kernels (forward, and
forward + backward) against the per-step ones (FUSED_RNN_CUDA_PERSISTENT=1 / 0). Writes one JSON record (device, torch, TF32
flags, rows) and prints a markdown table. On the CPU it runs
tiny shapes, as a dry run of the script itself (no number from it means anything for a GPU).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import fused_rnn

# (cell, B, H, dtype): the models' shapes (GPU_NOTES.md, "Model"), I = H, one layer.
GPU_SHAPES = [("LSTM", 64, 512, "float32"), ("LSTM", 8, 512, "float32"), ("LSTM", 1, 512, "float32"),
              ("LSTM", 64, 512, "bfloat16"), ("LSTM", 16, 768, "bfloat16"), ("GRU", 64, 512, "float32"),
              ("LSTM", 64, 1024, "float32"), ("LSTM", 8, 256, "float32"),
              ("LSTM", 1, 256, "float32"), ("LSTM", 1, 1024, "float32"), ("LSTM", 8, 1024, "float32")]
CPU_SHAPES = [("LSTM", 2, 8, "float32"), ("GRU", 2, 8, "float32")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3  # µs
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e6


_CUDA_DEFAULTS = {"cuda_persistent": "auto", "cuda_unfused_backward": "0", "cuda_rows_per_block": "0"}


def _fused(fn, **overrides):
    """fn() under these CUDA overrides, the others at their defaults (docs/kernels.md): every fused
    contender sets all three, one call each (microseconds), so that none inherits another's."""
    values = {**_CUDA_DEFAULTS, **{k: str(v) for k, v in overrides.items()}}

    def run():
        for name, value in values.items():
            fused_rnn._C.set_override(name, value)
        fn()
    return run


def _with_tf32(allowed, fn):
    """fn() with torch.backends.cudnn.allow_tf32 (which fused_rnn's float32 kernels follow, as cuDNN's
    RNNs do) set to `allowed`, restored after."""
    def run():
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allowed
        try:
            fn()
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    return run


def _contenders(cell, batch, hidden, dtype, device, steps, tf32):
    """The runs of one shape. float32 runs under the given TF32 flag; there each variant of the
    step kernels (FUSED_RNN_CUDA_ROWS_PER_BLOCK) is timed beside the cost model's own pick."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cell)(hidden, hidden, device=device, dtype=dtype)
    fused = getattr(fused_rnn, cell)(hidden, hidden, device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()

    def inference(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def training(module):
        def run():
            module(x_grad)[0].sum().backward()
        return run

    runs = {("inference", "fused"): _fused(inference(fused)), ("inference", "torch.nn"): inference(ref),
            ("training", "fused"): _fused(training(fused)),
            ("training", "fused, unfused backward"): _fused(training(fused), cuda_unfused_backward=1),
            ("training", "torch.nn"): training(ref)}
    if dtype == torch.float32 and not tf32:  # the per-step kernels against the persistent one
        runs[("inference", "fused, per-step kernels")] = _fused(inference(fused), cuda_persistent=0)
        runs[("inference", "fused, persistent")] = _fused(inference(fused), cuda_persistent=1)
        runs[("training", "fused, per-step kernels")] = _fused(training(fused), cuda_persistent=0)
        runs[("training", "fused, persistent")] = _fused(training(fused), cuda_persistent=1)
    if dtype == torch.float32:
        rows = (64, 16) if tf32 else (16, 4, 1)  # the tensor-core variants, or the CUDA-core ones
        for r in rows:
            name = f"fused, {r} row{'s' if r > 1 else ''} a block"
            runs[("inference", name)] = _fused(inference(fused), cuda_rows_per_block=r, cuda_persistent=0)
        runs = {key: _with_tf32(tf32, fn) for key, fn in runs.items()}
    return runs


def probe(device, shapes, steps, repeats, warmup=3):
    timer, rows = _Timer(device), []
    for cell, batch, hidden, dtype_name in shapes:
        for tf32 in ((True, False) if dtype_name == "float32" else (None,)):
            runs = _contenders(cell, batch, hidden, DTYPES[dtype_name], device, steps, tf32)
            for fn in runs.values():
                for _ in range(warmup):
                    fn()
            samples = {key: [] for key in runs}
            for r in range(repeats):  # interleaved, the order rotating from round to round
                keys = list(runs)
                keys = keys[r % len(keys):] + keys[:r % len(keys)]
                for key in keys:
                    samples[key].append(timer(runs[key]) / steps)
            for (mode, who), values in samples.items():
                q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
                rows.append({"cell": cell, "B": batch, "H": hidden, "T": steps, "dtype": dtype_name, "tf32": tf32,
                             "mode": mode, "contender": who, "us_per_step": q[1], "us_q1": q[0], "us_q3": q[2]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON record (default: print only)")
    parser.add_argument("--steps", type=int, default=None, help="T (default 100 on a GPU, 5 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 20 on a GPU, 2 on the CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (100 if gpu else 5)
    repeats = args.repeats or (20 if gpu else 2)
    rows = probe(device, GPU_SHAPES if gpu else CPU_SHAPES, steps, repeats)
    record = {"device": torch.cuda.get_device_name(device) if gpu else "cpu (dry run)", "torch": torch.__version__,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(f"{record['device']}, torch {record['torch']}, T={steps}, median µs per step (quartiles)")
    print("| cell | B | H | dtype | TF32 | mode | contender | µs/step | q1–q3 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf32 = "" if r["tf32"] is None else ("on" if r["tf32"] else "off")
        print(f"| {r['cell']} | {r['B']} | {r['H']} | {r['dtype']} | {tf32} | {r['mode']} | {r['contender']} | "
              f"{r['us_per_step']:.1f} | {r['us_q1']:.1f}–{r['us_q3']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
