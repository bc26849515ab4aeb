"""python -m fused_rnn: what this build is, which kernels the CPU plan picks for a few shapes, and a
tiny check of every module against torch.nn.

Exit status 0 when every check passes. The check runs each module forward and backward in float64
on the CPU and on every visible GPU, with torch.nn's layer (the same state_dict) as the reference.
"""
import os
import platform
import sys

import torch

import fused_rnn
from fused_rnn import _C

MODULES = [("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)), ("GRU", dict(bidirectional=True)),
           ("RNN", dict(nonlinearity="relu")), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]
TOLERANCE = 1e-10  # float64 parity, as the tests ask


def build_report():
    cuda = f"yes, for compute capability {_C.cuda_archs or 'unknown'}" if _C.built_with_cuda else "no (CPU only)"
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return [
        f"fused_rnn {fused_rnn.__version__} at {os.path.dirname(fused_rnn.__file__)}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), Python {platform.python_version()}, "
        f"{platform.machine()}",
        f"built with CUDA kernels: {cuda}",
        f"CPU vector math: {_C.cpu_vector_math}; OpenMP: {'yes' if _C.built_with_openmp else 'no'}, "
        f"{torch.get_num_threads()} threads",
        "overrides: " + ", ".join(f"{k}={v}" for k, v in fused_rnn.overrides().items()),
        f"devices visible: {', '.join(devices)}",
    ]


# (label, cell, dtype, batch, input size, hidden size): shapes whose plans differ on some CPU.
PLAN_SHAPES = [("LSTM float32 B1 H256", "LSTM", torch.float32, 1, 256, 256),
               ("LSTM float32 B64 H512", "LSTM", torch.float32, 64, 512, 512),
               ("GRU float32 B8 H128", "GRU", torch.float32, 8, 128, 128),
               ("LSTM float64 B64 H512", "LSTM", torch.float64, 64, 512, 512)]


def plan_report():
    """The CPU kernel plan (csrc/cpu/kernel_plan.h) for a few shapes, forward and backward, and the
    int8 layers' kernel."""
    lines = ["CPU kernel plan (fused_rnn.cpu_plan; overrides: docs/kernels.md):"]
    for label, cell, dtype, batch, inputs, hidden in PLAN_SHAPES:
        for pass_ in ("forward", "backward"):
            plan = fused_rnn.cpu_plan(cell, dtype, batch, inputs, hidden, pass_=pass_)
            lines.append(f"  {label:22} {pass_:8} " + "; ".join(f"{k}: {v}" for k, v in plan.items()))
    plan = fused_rnn.cpu_plan("LSTM", torch.float32, 8, 128, 128, pass_="int8")
    lines.append(f"  {'LSTM int8 B8 H128':22} {'forward':8} " + "; ".join(f"{k}: {v}" for k, v in plan.items()))
    for device in range(torch.cuda.device_count() if _C.built_with_cuda else 0):
        lines.append(f"CUDA kernel plan on cuda:{device} (fused_rnn.cuda_plan):")
        for label, cell, dtype, batch, inputs, hidden in PLAN_SHAPES:
            for backward in (False, True):
                plan = fused_rnn.cuda_plan(cell, dtype, batch, inputs, hidden, steps=50, backward=backward,
                                           device=device)
                lines.append(f"  {label:22} {'backward' if backward else 'forward':8} "
                             + "; ".join(f"{k}: {v}" for k, v in plan.items()))
    return lines


def check(kind, kwargs, device):
    """Largest difference from torch.nn over outputs and input/parameter gradients."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 4, dtype=torch.float64, device=device, **kwargs)
    fused = getattr(fused_rnn, kind)(3, 4, dtype=torch.float64, device=device, **kwargs)
    fused.load_state_dict(ref.state_dict())
    cell = kind.endswith("Cell")
    x = torch.randn(*((2, 3) if cell else (5, 2, 3)), dtype=torch.float64, device=device)
    worst = 0.0
    results = []
    for module in (fused, ref):
        xi = x.clone().requires_grad_()
        outs = torch.utils._pytree.tree_leaves(module(xi))
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=device).view_as(o)).sum()
            for o in outs).backward()
        results.append([o.detach() for o in outs] + [xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        worst = max(worst, (a - b).abs().max().item())
    return worst


def main(argv=None) -> int:
    for line in build_report() + plan_report():
        print(line)
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if _C.built_with_cuda else [])
    failed = 0
    print(f"check against torch.nn (float64, forward and backward, largest difference; pass below {TOLERANCE:g}):")
    for device in devices:
        for kind, kwargs in MODULES:
            worst = check(kind, kwargs, device)
            ok = worst <= TOLERANCE
            failed += not ok
            print(f"  {device:7} {kind:9} {worst:9.2e}  {'ok' if ok else 'FAILED'}")
    print("all checks passed" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
