"""Fingerprints of fused_rnn's CPU outputs and gradients on a fixed set of calls, for every kernel
the CPU plan can pick and both thread counts: run before and after a change that must not change a
bit (a restructuring), and compare the two files.

    python bench/bitwise_fingerprint.py > before.txt   # ... change ...
    python bench/bitwise_fingerprint.py > after.txt && diff before.txt after.txt

Each kernel choice runs in a child with its FUSED_RNN_* variable set (the variables are the
kernel plan's overrides, docs/kernels.md), so that the script works on any version of the code.
"""
import hashlib
import itertools
import os
import subprocess
import sys

# The overrides a CPU run can take (the defaults first). A choice this CPU or build cannot run is
# refused at import (docs/kernels.md) and reported as such.
CHOICES = [
    {},
    {"FUSED_RNN_FLOAT_KERNEL": "amx"},
    {"FUSED_RNN_FLOAT_KERNEL": "avx512"},
    {"FUSED_RNN_FLOAT_KERNEL": "avx2"},
    {"FUSED_RNN_CHUNK_GEMM": "blas"},
    {"FUSED_RNN_CHUNK_GEMM": "tiles"},
    {"FUSED_RNN_AMX_STEP_ROWS": "1"},
    {"FUSED_RNN_INT8_KERNEL": "avx2"},
    {"FUSED_RNN_INT8_KERNEL": "scalar"},
]


def digest(tensors):
    import torch
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous()
        h.update((torch.view_as_real(t) if t.is_complex() else t).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def calls():
    """(name, fn) pairs; fn() returns the tensors to fingerprint."""
    import torch
    import fused_rnn
    from torch.nn.utils.rnn import pack_padded_sequence

    def layer_call(cls, dtype, T, B, I, H, extra, packed=False, train=True):
        def run():
            torch.manual_seed(0)
            ref = getattr(torch.nn, cls)(I, H, **extra)
            mod = getattr(fused_rnn, cls)(I, H, **extra).to(dtype)
            mod.load_state_dict(ref.state_dict())
            mod.to(dtype)
            x = torch.randn(T, B, I, dtype=dtype, requires_grad=train)
            inp = x
            if packed:
                lengths = torch.linspace(T, 1, B).round().long()
                inp = pack_padded_sequence(x, lengths)
            out, state = mod(inp)
            if packed:
                out = out.data
            outs = [out] + (list(state) if isinstance(state, tuple) else [state])
            if not train:
                return outs
            loss = sum((o.real if o.is_complex() else o).sum() * (i + 1) for i, o in enumerate(outs))
            grads = torch.autograd.grad(loss, [x] + list(mod.parameters()))
            return outs + list(grads)
        return run

    def cell_chain(cls, B, I, H, steps=5):  # a decoder's loop of cell calls, then backward through it
        def run():
            torch.manual_seed(0)
            ref = getattr(torch.nn, cls)(I, H)
            mod = getattr(fused_rnn, cls)(I, H)
            mod.load_state_dict(ref.state_dict())
            xs = torch.randn(steps, B, I, requires_grad=True)
            hx, outs = None, []
            for x in xs:
                hx = mod(x, hx)
                outs.append(hx[0] if isinstance(hx, tuple) else hx)
            loss = sum(o.sum() * (i + 1) for i, o in enumerate(outs))
            return outs + list(torch.autograd.grad(loss, [xs] + list(mod.parameters())))
        return run

    for cls, (B, I, H) in itertools.product(["LSTMCell", "GRUCell", "RNNCell"], [(1, 64, 64), (3, 20, 128)]):
        yield f"{cls} x5 B{B} I{I} H{H}", cell_chain(cls, B, I, H)
    shapes = [(7, 1, 12, 40), (6, 5, 20, 48), (5, 24, 33, 100), (4, 64, 64, 256), (5, 1, 64, 128), (3, 20, 200, 200)]
    for cls, dtype, (T, B, I, H) in itertools.product(["RNN", "LSTM", "GRU"], [torch.float32, torch.float64], shapes):
        yield f"{cls} {dtype} T{T} B{B} I{I} H{H}", layer_call(cls, dtype, T, B, I, H, {})
    yield "RNN relu", layer_call("RNN", torch.float32, 6, 5, 20, 48, {"nonlinearity": "relu"})
    for cls in ["LSTM", "GRU"]:
        yield f"{cls} 2 layers bidir packed", layer_call(cls, torch.float32, 9, 6, 20, 48,
                                                         {"num_layers": 2, "bidirectional": True}, packed=True)
        yield f"{cls} inference", layer_call(cls, torch.float32, 8, 3, 30, 70, {}, train=False)
    yield "LSTM proj", layer_call("LSTM", torch.float32, 6, 20, 20, 64, {"proj_size": 24, "num_layers": 2})
    yield "LSTM proj f64", layer_call("LSTM", torch.float64, 6, 5, 20, 64, {"proj_size": 24})
    yield "GRU complex64", layer_call("GRU", torch.complex64, 5, 3, 10, 20, {})
    for cls in ["LSTM", "GRU"]:
        def int8(cls=cls):
            torch.manual_seed(0)
            ref = getattr(torch.nn, cls)(32, 64, num_layers=2)
            q = torch.ao.quantization.quantize_dynamic(fused_rnn.convert(ref), {getattr(fused_rnn, cls)}, torch.qint8)
            out, state = q(torch.randn(10, 7, 32))
            return [out] + (list(state) if isinstance(state, tuple) else [state])
        yield f"{cls} int8", int8


def child():
    import torch
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in calls():
            print(f"threads={threads} {name}: {digest(fn())}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        sys.exit(0)
    for choice in CHOICES:
        label = " ".join(f"{k}={v}" for k, v in choice.items()) or "defaults"
        env = dict(os.environ, **choice)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        if out.returncode and "asks for a kernel this CPU" in out.stderr:
            print(f"[{label}] not runnable here")
            continue
        if out.returncode:
            sys.exit(f"{label}: {out.stderr}")
        for line in out.stdout.splitlines():
            print(f"[{label}] {line}")
