"""Every CUDA kernel of fused_rnn once, on small shapes, for compute-sanitizer (bench/gpu_check.sh).

Forward and backward of LSTM, GRU and RNN (tanh, relu): float32 and float64 (the CUDA-core
kernels, the fused backward step), bfloat16 and float16 (the tensor-core forward kernel), packed
and bidirectional input (steps that grow and shrink), LSTM with a projection (the unfused backward),
hidden sizes with partial tiles, and a batch large enough for the four-rows-per-thread variants.
The small cases run twice: with the per-step kernels and with the persistent ones
(FUSED_RNN_CUDA_PERSISTENT=0 and 1), which they would otherwise take by default.
Exits non-zero on a non-finite result; compute-sanitizer reports memory errors and races.

    python bench/gpu_smoke.py [--device cuda] [--reduced]

--reduced keeps one case of each kernel family (LSTM and GRU; float32, float64 and bfloat16; the
small shapes, packed and padded, and the large batch in float32 for the four-row variants), for
racecheck, which runs each kernel tens of times slower.
"""
import argparse
import os
import sys

import torch
from torch.nn.utils.rnn import pack_sequence

import fused_rnn

CASES = [  # (module class, kwargs)
    (fused_rnn.LSTM, {}), (fused_rnn.GRU, {}), (fused_rnn.RNN, {"nonlinearity": "tanh"}),
    (fused_rnn.RNN, {"nonlinearity": "relu"}), (fused_rnn.LSTM, {"proj_size": 5}),
]


def run(cls, kwargs, dtype, device, hidden, batch, packed):
    torch.manual_seed(0)
    module = cls(6, hidden, bidirectional=True, device=device, dtype=dtype, **kwargs)
    if packed:
        leaves = [torch.randn(n, 6, device=device, dtype=dtype, requires_grad=True) for n in (7, 5, 5, 2)]
        x = pack_sequence(leaves, enforce_sorted=False)
    else:
        x = torch.randn(4, batch, 6, device=device, dtype=dtype, requires_grad=True)
        leaves = [x]
    out, _ = module(x)
    data = out.data if packed else out
    data.float().square().sum().backward()
    grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
    return all(bool(torch.isfinite(t).all()) for t in [data] + grads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--reduced", action="store_true", help="one case per kernel family (for racecheck)")
    args = p.parse_args(argv)
    failures = []
    cases = CASES[:2] if args.reduced else CASES
    dtypes = (torch.float32, torch.float64, torch.bfloat16) if args.reduced else (
        torch.float32, torch.float64, torch.bfloat16, torch.float16)
    for cls, kwargs in cases:
        for dtype in dtypes:
            for hidden, batch, packed in ((37, 3, False), (37, 0, True), (600, 300, False)):
                if dtype == torch.float64 and hidden > 100:
                    continue  # the large case is there for the float32 and half kernels' variants
                if args.reduced and hidden > 100 and dtype != torch.float32:
                    continue
                for persistent in ("0", "1") if hidden <= 100 else ("0",):
                    fused_rnn.set_overrides(cuda_persistent=persistent)
                    if not run(cls, kwargs, dtype, args.device, hidden, batch, packed):
                        failures.append(f"{cls.__name__} {kwargs} {dtype} H{hidden} B{batch} packed={packed} "
                                        f"persistent={persistent}")
    fused_rnn.set_overrides(cuda_persistent="auto")
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("non-finite results: " + ("; ".join(failures) if failures else "none"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
