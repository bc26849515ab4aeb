"""The timing probe of the GPU check: µs per step of fused_rnn's step kernels beside cuDNN's, on the
shapes that bench/GPU_NOTES.md models, so that the first GPU run checks the model.

    python bench/gpu_probe.py [--device cuda] [--out probe.json] [--steps 100] [--repeats 20]

Per shape (cell, B, H, dtype): one layer, T steps, forward (inference) and forward+backward
(training), fused and torch.nn (cuDNN on a GPU) interleaved round after round with CUDA events
(perf_counter on the CPU), the median of the rounds over T: µs per step. Also with
FUSED_RNN_CUDA_UNFUSED_BACKWARD's path for training (the cell kernel + cuBLAS per step). Writes
one JSON record (device, torch, TF32 flags, rows) and prints a markdown table. On the CPU it runs
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
              ("LSTM", 64, 1024, "float32"), ("LSTM", 8, 256, "float32")]
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


def _contenders(cell, batch, hidden, dtype, device, steps):
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

    def training(module, unfused=False):
        def run():
            previous = os.environ.get("FUSED_RNN_CUDA_UNFUSED_BACKWARD")
            os.environ["FUSED_RNN_CUDA_UNFUSED_BACKWARD"] = "1" if unfused else "0"
            try:
                module(x_grad)[0].sum().backward()
            finally:
                if previous is None:
                    del os.environ["FUSED_RNN_CUDA_UNFUSED_BACKWARD"]
                else:
                    os.environ["FUSED_RNN_CUDA_UNFUSED_BACKWARD"] = previous
        return run

    return {("inference", "fused"): inference(fused), ("inference", "torch.nn"): inference(ref),
            ("training", "fused"): training(fused), ("training", "fused, unfused backward"): training(fused, True),
            ("training", "torch.nn"): training(ref)}


def probe(device, shapes, steps, repeats, warmup=3):
    timer, rows = _Timer(device), []
    for cell, batch, hidden, dtype_name in shapes:
        runs = _contenders(cell, batch, hidden, DTYPES[dtype_name], device, steps)
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
            rows.append({"cell": cell, "B": batch, "H": hidden, "T": steps, "dtype": dtype_name, "mode": mode,
                         "contender": who, "us_per_step": q[1], "us_q1": q[0], "us_q3": q[2]})
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
    print("| cell | B | H | dtype | mode | contender | µs/step | q1–q3 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['B']} | {r['H']} | {r['dtype']} | {r['mode']} | {r['contender']} | "
              f"{r['us_per_step']:.1f} | {r['us_q1']:.1f}–{r['us_q3']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
