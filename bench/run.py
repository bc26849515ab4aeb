"""Times fused_rnn's layers against torch.nn (cuDNN on a GPU, oneDNN/native on the CPU) in one run.

    python -m bench                 # quick grid on whatever device is present
    python -m bench --cells LSTM --shapes 100x64x512 --modes inference
    python -m bench --update-reference   # also rewrite the committed bench/results/<device>.json/.png

Contenders, in one run and with the same weights: fused_rnn and torch.nn (the reference), and where
they apply: a plain PyTorch loop of the same cell (bench/loop.py, --loop), ONNX Runtime running
torch.nn's exported layer and torch's dynamic int8 LSTM/GRU (inference only; optional peers,
skipped with a note when absent), and for packed input (lengths uniform in [T/4, T]) torch.nn on
the same PackedSequence and torch.nn on the padded batch. The cells' rows (LSTMCell, GRUCell,
RNNCell) time what a decoder does: a loop of 20 calls from Python, then backward through the chain
in training; the grid also holds short layer calls (T = 1 and 4).

Timing: warm-up first; on a GPU CUDA events around each call, on the CPU perf_counter. The
contenders run interleaved, round after round (the order alternating or shuffled), so that a drift of the machine
hits all alike; each row reports every contender's median and quartiles, and each speedup is the
median (and quartiles) of the per-round ratios. Rows whose spread is wide (`~`) or that ran while
the load average exceeded the cores (`!`) are marked. Inputs rotate among a few tensors so that
caches do not flatter. glibc's malloc keeps freed memory during the run, as in a long-running
program (--cold-malloc: its start-up settings, where torch.nn's CPU layers page-fault their
workspace in at every call).

Records and plot go to bench/out/ (ignored by git), one file pair per run; --update-reference
also replaces the committed reference results in bench/results/.
"""
import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
from bench.loop import LoopRNN

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(BENCH_DIR, "out")  # ignored by git: routine runs leave the tree clean
REFERENCE_DIR = os.path.join(BENCH_DIR, "results")  # committed; written only by --update-reference

# Cases (T, B, I, H, layers, bidirectional). The quick grid fits the README's main job on a 2-core CPU.
QUICK_CASES = [(100, 64, 512, 512, 1, False), (100, 8, 256, 256, 1, False), (100, 1, 256, 256, 1, False)]
# Packed input: torch.nn leaves oneDNN/its fast path for a per-step loop there.
QUICK_PACKED_CASES = [(100, 64, 256, 256, 1, False)]
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
# The int8 inference rows (dtype "int8", CPU, LSTM and GRU): fused_rnn's int8 layers (quantize_dynamic
# of the fused model) against torch's (quantize_dynamic of torch.nn's), torch.nn float32 the reference.
# #23 asks for B = 1-8, H = 512-1024.
LOW_PRECISION_CASES = [(100, b, h, h, 1, False) for b in (1, 2, 4, 8) for h in (512, 1024)]
QUICK_LOW_PRECISION_CASES = [(100, 1, 1024, 1024, 1, False)]
# Cell loops (#40): a decoder's loop of `T` calls of LSTMCell / GRUCell / RNNCell from Python, then (in
# training) backward through the chain; cases (T, B, I, H, 1, False). And short layer calls, T = 1-4.
CELL_LOOP_STEPS = 20
FULL_CELL_LOOP_CASES = [(CELL_LOOP_STEPS, b, h, h, 1, False) for b in (1, 8, 64) for h in (64, 256, 512)]
QUICK_CELL_LOOP_CASES = [(CELL_LOOP_STEPS, 1, 64, 64, 1, False), (CELL_LOOP_STEPS, 1, 256, 256, 1, False),
                         (CELL_LOOP_STEPS, 8, 256, 256, 1, False), (CELL_LOOP_STEPS, 64, 512, 512, 1, False)]
SHORT_CASES = [(1, 1, 256, 256, 1, False), (4, 8, 256, 256, 1, False)]
# Variants beyond torch.nn (#41): fused_rnn's layer with the variant's arguments beside its plain layer (the
# variant's cost), torch.nn's plain layer and the variant's equations as a loop whose step is compiled
# by torch.compile (what a user would otherwise write). The targets are for B >= 8, H >= 256.
VARIANTS = {("LSTM", "peephole"): {"peephole": True}, ("LSTM", "zoneout=0.1"): {"zoneout": 0.1},
            ("GRU", "zoneout=0.1"): {"zoneout": 0.1},
            ("LSTM", "recurrent_dropout=0.25"): {"recurrent_dropout": 0.25},
            ("GRU", "recurrent_dropout=0.25"): {"recurrent_dropout": 0.25},
            ("LSTM", "layer_norm"): {"layer_norm": True}, ("GRU", "layer_norm"): {"layer_norm": True}}
QUICK_VARIANT_CASES = [(100, 8, 256, 256, 1, False)]
FULL_VARIANT_CASES = [(100, 8, 256, 256, 1, False), (100, 8, 512, 512, 1, False), (100, 64, 512, 512, 1, False)]
FULL_PACKED_CASES = [(100, 64, 256, 256, 1, False), (100, 64, 512, 512, 1, False), (100, 8, 256, 256, 1, False),
                     (100, 64, 512, 512, 1, True)]
RECORD_FIELDS = ["device", "torch", "threads", "cores", "date", "tf32", "load_average", "cell", "T", "B", "I",
                 "H", "layers", "bidirectional", "dtype", "mode", "lengths", "reference", "rounds", "ms", "spread",
                 "speedup", "wide_spread", "loaded", "ms_fused", "ms_reference", "mb", "error", "malloc", "variant"]
ROTATION = 3  # distinct inputs cycled through
WIDE_SPREAD = 0.10  # a row is marked `~` when a timing's interquartile range exceeds this share of its median
ROUND_BUDGET_S = {"cpu": 1.5, "cuda": 0.5}  # time per case for the timed rounds, when --repeats is not given
MIN_ROUNDS, MAX_ROUNDS = 5, 25
CELLS = {"LSTM": (fused_rnn.LSTM, torch.nn.LSTM), "GRU": (fused_rnn.GRU, torch.nn.GRU),
         "RNN": (fused_rnn.RNN, torch.nn.RNN), "LSTMCell": (fused_rnn.LSTMCell, torch.nn.LSTMCell),
         "GRUCell": (fused_rnn.GRUCell, torch.nn.GRUCell), "RNNCell": (fused_rnn.RNNCell, torch.nn.RNNCell)}
LAYER_KINDS, CELL_KINDS = ("LSTM", "GRU", "RNN"), ("LSTMCell", "GRUCell", "RNNCell")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": "int8"}
INT8 = "int8"  # the dtype of the int8 rows: the inputs are float32, the weights int8
REFERENCE = "torch.nn"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def tf32_flags(device):
    """The TF32 switches that change what a float32 product costs on a GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def keep_freed_memory():
    """glibc's malloc as a long-running program has it: blocks up to 32 MB served from the heap and
    freed memory kept there, instead of a fresh mmap per block and the heap trimmed at each free.

    With glibc's start-up settings, every call of torch.nn's CPU layers maps its workspace anew and
    pays a page fault per 4 KB of it (LSTM T35 B20 H200, 2 layers, training: 13.7 ms against 8.5 on
    the Zen 5 VM, bench/NOTES.md); in a real training script glibc has raised its thresholds after
    the first large free (word_language_model's profile shows torch.nn's layers at the lower time),
    and fused_rnn's own block cache (csrc/cpu/block_cache.cpp) keeps its blocks either way. Timing
    torch.nn cold would flatter us. Returns what the records say, or None where the C library has no
    mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)):
        return None
    return "glibc: mmap threshold 32 MB, trim threshold 1 GB"


def load_average():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_is_loaded(load):
    """More runnable threads than cores (the benchmark's own threads fill the cores at most)."""
    return load is not None and load > (os.cpu_count() or 1) + 0.5


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


def quartiles(values):
    """(q1, median, q3) of a list, interpolating (a single value is its own spread)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


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
            (out.data if isinstance(out, PackedSequence) else out).sum().backward()
    return step


def make_cell_loop(cell, inputs, mode):
    """A decoder's loop: the cell called once per step of the next input [T, B, I] from Python,
    the state carried; in training, backward from the sum of every step's h through the chain."""
    state = {"k": 0}

    def step():
        xs = inputs[state["k"] % len(inputs)]
        state["k"] += 1
        with torch.set_grad_enabled(mode == "training"):
            hx, total = None, 0
            for x in xs:
                hx = cell(x, hx)
                total = total + (hx[0] if isinstance(hx, tuple) else hx).sum()
            if mode == "training":
                total.backward()
    return step


# ------------------------------------------------------------------------------------------------
# Optional peers (inference only): each returns a step function, or None with the reason it is absent.
# ------------------------------------------------------------------------------------------------

def onnxruntime_step(ref, xs, device):
    """torch.nn's layer exported to ONNX and run by ONNX Runtime on the CPU."""
    if device.type != "cpu":
        return None, "ONNX Runtime: CPU runs only"
    try:
        import onnxruntime
    except ImportError:
        return None, "ONNX Runtime not installed (pip install onnxruntime onnx)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ref, (xs[0].detach(),), path, input_names=["x"], dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Without this its thread pool spins after each run and starves the other contenders.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    arrays = [x.detach().numpy() for x in xs]
    state = {"k": 0}

    def step():
        session.run(None, {"x": arrays[state["k"] % len(arrays)]})
        state["k"] += 1
    return step, None


def int8_step(ref, xs, device, cell):
    """torch's dynamic int8 quantization of the torch.nn layer (weights int8, activations float)."""
    if device.type != "cpu" or cell not in ("LSTM", "GRU"):
        return None, None  # torch has dynamic int8 for CPU LSTM and GRU only: nothing to note per row
    try:
        layer = quantized(ref)
    except Exception as error:  # noqa: BLE001 - an unavailable peer is a note, not a failure
        return None, f"torch int8: {type(error).__name__}: {error}"
    return make_step(layer, xs, "inference"), None


PEER_LABELS = {"onnxruntime": "ONNX Runtime", "int8": "torch int8 (dynamic)"}
PLAIN, COMPILED_LOOP = "fused plain", "compiled-step loop"  # a variant row's other contenders


# ------------------------------------------------------------------------------------------------
# One case: build the contenders, time them interleaved, summarise.
# ------------------------------------------------------------------------------------------------

def packed_lengths(steps, batch):
    """Lengths uniform in [T/4, T], from a fixed seed (so every run sees the same batch)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(max(1, steps // 4), steps + 1, (batch,), generator=g)


def quantized(layer):
    """torch's dynamic int8 quantization of a layer (ours for a fused one, torch's for torch.nn's).
    quantize_dynamic swaps a model's children, never the model itself: the layer goes in a Sequential
    (a bare layer would come back in float32, as this harness's int8 peer did before 2026-12-01)."""
    from torch.ao.quantization import quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice
        model = quantize_dynamic(torch.nn.Sequential(layer), {type(layer)}, dtype=torch.qint8)
    if model[0] is layer or not hasattr(model[0], "_all_weight_values"):
        raise RuntimeError(f"quantize_dynamic left {type(layer).__name__} unquantized")
    return model[0]


def int8_contenders(cell, case, device, errors):
    """The int8 row: fused_rnn's int8 layer, torch.nn float32 (the reference) and torch's int8 layer,
    same weights; `errors` gets each int8 layer's largest deviation from float32 on the first input."""
    steps, batch, inputs, hidden, layers, bidirectional = case
    fused_cls, ref_cls = CELLS[cell]
    torch.manual_seed(0)
    ref = ref_cls(inputs, hidden, num_layers=layers, bidirectional=bidirectional)
    fused = fused_cls(inputs, hidden, num_layers=layers, bidirectional=bidirectional)
    fused.load_state_dict(ref.state_dict())
    ours, theirs = quantized(fused), quantized(ref)
    xs = [torch.randn(steps, batch, inputs) for _ in range(ROTATION)]
    with torch.no_grad():
        want = ref(xs[0])[0]
        errors.update({"fused": (ours(xs[0])[0] - want).abs().max().item(),
                       "int8": (theirs(xs[0])[0] - want).abs().max().item()})
    return {"fused": make_step(ours, xs, "inference"), REFERENCE: make_step(ref, xs, "inference"),
            "int8": make_step(theirs, xs, "inference")}


def variant_contenders(cell, variant, case, dtype, mode, device):
    """A variant row: the variant, fused_rnn's plain layer, torch.nn's, and the variant's loop with its
    step compiled (compiling the whole loop unrolls it: 48 s for T = 100 inference on a 2-core Zen 5,
    too long for the main job; bench/NOTES.md has its timings)."""
    arguments = VARIANTS[(cell, variant)]
    steps, batch, inputs, hidden, layers, bidirectional = case
    fused_cls, ref_cls = CELLS[cell]
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    ref = ref_cls(inputs, hidden, **kwargs)
    plain = fused_cls(inputs, hidden, **kwargs)
    ours = fused_cls(inputs, hidden, **kwargs, **arguments)
    plain.load_state_dict(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=False)  # and the variant's own parameters, as initialised
    xs = [torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=(mode == "training"))
          for _ in range(ROTATION)]
    # A fresh compilation cache per row: Dynamo recompiles the step for each shape and grad mode, and
    # past its recompile_limit (8) runs it uncompiled; a full grid's later rows then timed an eager loop.
    torch._dynamo.reset()
    loop = LoopRNN(ours, compile_step=True).train(mode == "training")
    for module in (ref, plain, ours):
        module.train(mode == "training")  # zoneout and recurrent dropout draw their masks in training
    return {"fused": make_step(ours, xs, mode), PLAIN: make_step(plain, xs, mode), REFERENCE: make_step(ref, xs, mode),
            COMPILED_LOOP: make_step(loop, xs, mode)}


def contenders_for(cell, case, dtype, mode, device, lengths, with_loop, notes, variant=None):
    if variant is not None:
        return variant_contenders(cell, variant, case, dtype, mode, device)
    steps, batch, inputs, hidden, layers, bidirectional = case
    fused_cls, ref_cls = CELLS[cell]
    torch.manual_seed(0)
    if cell in CELL_KINDS:  # a loop of cell calls: fused_rnn's cell and torch.nn's, nothing else
        ref = ref_cls(inputs, hidden, device=device, dtype=dtype)
        fused = fused_cls(inputs, hidden, device=device, dtype=dtype)
        fused.load_state_dict(ref.state_dict())
        xs = [torch.randn(steps, batch, inputs, device=device, dtype=dtype) for _ in range(ROTATION)]
        return {"fused": make_cell_loop(fused, xs, mode), REFERENCE: make_cell_loop(ref, xs, mode)}
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    ref = ref_cls(inputs, hidden, **kwargs)
    fused = fused_cls(inputs, hidden, **kwargs)
    fused.load_state_dict(ref.state_dict())
    xs = [torch.randn(steps, batch, inputs, device=device, dtype=dtype, requires_grad=(mode == "training"))
          for _ in range(ROTATION)]
    if lengths == "packed":
        lens = packed_lengths(steps, batch)
        # Packed from detached input, with the packed data as the leaf: each call's backward is its own.
        packed = [pack_padded_sequence(x.detach(), lens, enforce_sorted=False) for x in xs]
        packed = [PackedSequence(p.data.requires_grad_(mode == "training"), p.batch_sizes, p.sorted_indices,
                                 p.unsorted_indices) for p in packed]
        return {"fused": make_step(fused, packed, mode), REFERENCE: make_step(ref, packed, mode),
                "torch.nn padded": make_step(ref, xs, mode)}
    contenders = {"fused": make_step(fused, xs, mode), REFERENCE: make_step(ref, xs, mode)}
    if with_loop:
        contenders["loop"] = make_step(LoopRNN(ref), xs, mode)
    if mode == "inference" and dtype == torch.float32:
        for name, (step, note) in (("onnxruntime", onnxruntime_step(ref, xs, device)),
                                   ("int8", int8_step(ref, xs, device, cell))):
            if step is not None:
                contenders[name] = step
            elif note:
                notes.add(note)
    return contenders


def time_interleaved(contenders, device, repeats):
    """Per-contender lists of milliseconds, one per round; rounds fill the budget when repeats is None."""
    for fn in contenders.values():  # warm-up: first-call allocations, cuDNN plans, page faults
        fn()
    _sync(device)
    names = list(contenders)
    samples = {name: [] for name in names}
    budget_ms = ROUND_BUDGET_S["cuda" if device.type == "cuda" else "cpu"] * 1e3
    round_ = 0
    while True:
        # No contender may always run right after the same other one (after the slow loop, say, whose
        # allocations leave the allocator and the caches in another state): two alternate, more are
        # shuffled, seeded by the round. (Rotating three or more keeps each one's predecessor: the
        # variant rows' fused layer ran after the compiled loop in 3 rounds of 4, and lost 5% to its
        # twin, the plain layer, on identical work.)
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        if len(order) > 2:
            random.Random(round_).shuffle(order)
        for name in order:
            samples[name].append(time_call(contenders[name], device))
        round_ += 1
        if repeats is not None:
            if round_ >= repeats:
                break
        elif round_ >= MAX_ROUNDS or (round_ >= MIN_ROUNDS and
                                      sum(map(sum, samples.values())) >= budget_ms):
            break
    return samples


def bench_one(cell, case, dtype, mode, device, repeats, lengths="full", with_loop=False, notes=None, variant=None):
    notes = set() if notes is None else notes
    load_before = load_average()
    errors = {}
    if dtype == INT8:
        contenders = int8_contenders(cell, case, device, errors)
    else:
        contenders = contenders_for(cell, case, dtype, mode, device, lengths, with_loop, notes, variant)
    memory = {name: peak_megabytes(fn, device) for name, fn in contenders.items()} if device.type == "cuda" else None
    samples = time_interleaved(contenders, device, repeats)
    load_after = load_average()
    loads = [v for v in (load_before, load_after) if v is not None]

    ms, spread, speedup = {}, {}, {}
    for name, values in samples.items():
        q1, median, q3 = quartiles(values)
        ms[name] = round(median, 4)
        spread[name] = {"min": round(min(values), 4), "q1": round(q1, 4), "q3": round(q3, 4),
                        "max": round(max(values), 4)}
        if name != "fused":
            # How many times faster fused_rnn is than this contender, round by round.
            q1, median, q3 = quartiles([other / mine for other, mine in zip(values, samples["fused"])])
            speedup[name] = {"median": round(median, 3), "q1": round(q1, 3), "q3": round(q3, 3)}
    wide = any((spread[n]["q3"] - spread[n]["q1"]) > WIDE_SPREAD * ms[n] for n in ("fused", REFERENCE))
    steps, batch, inputs, hidden, layers, bidirectional = case
    return {
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cores": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tf32": tf32_flags(device), "load_average": max(loads) if loads else None,
        "cell": cell, "T": steps, "B": batch, "I": inputs, "H": hidden, "layers": layers,
        "bidirectional": bidirectional, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
        "lengths": "packed U[T/4,T]" if lengths == "packed" else "full",
        "reference": "torch.nn (cuDNN)" if device.type == "cuda" else "torch.nn (CPU)",
        "rounds": len(samples["fused"]), "ms": ms, "spread": spread, "speedup": speedup,
        "wide_spread": wide, "loaded": machine_is_loaded(max(loads)) if loads else False,
        "ms_fused": ms["fused"], "ms_reference": ms[REFERENCE], "mb": memory,
        # int8 rows: the largest |output - float32 output| of fused_rnn's and torch's int8 layers
        "error": {name: float(f"{e:.3g}") for name, e in errors.items()} or None,
        "variant": variant,  # a variant row (VARIANTS): "fused" is the variant
    }


# ------------------------------------------------------------------------------------------------
# Output: markdown tables, plot, files.
# ------------------------------------------------------------------------------------------------

def case_label(r):
    if r["cell"] in CELL_KINDS:
        return f"{r['cell']} x{r['T']} calls B{r['B']} H{r['H']} {r['dtype']}"
    return (f"{r['cell']} T{r['T']} B{r['B']} H{r['H']}" + (f" L{r['layers']}" if r["layers"] > 1 else "")
            + (" bi" if r["bidirectional"] else "") + f" {r['dtype']}"
            + (f" {r['variant']}" if r.get("variant") else ""))


def marks(r):
    return ("~" if r["wide_spread"] else "") + ("!" if r["loaded"] else "")


def fmt_ms(r, name):
    if name not in r["ms"]:
        return "–"
    s = r["spread"][name]
    return f"{r['ms'][name]:.2f} ({s['q1']:.2f}–{s['q3']:.2f})"


def fmt_speedup(r, name):
    if name not in r["speedup"]:
        return "–"
    s = r["speedup"][name]
    return f"{s['median']:.2f}x ({s['q1']:.2f}–{s['q3']:.2f})"


def print_tables(records, out=None):
    """One table for full-length input, one for packed; ms as median (quartiles)."""
    out = out or sys.stdout
    variants = [r for r in records if r.get("variant")]
    records = [r for r in records if not r.get("variant")]
    full = [r for r in records if r["lengths"] == "full"]
    packed = [r for r in records if r["lengths"] != "full"]
    if full:
        peers = [n for n in ("loop", "onnxruntime", "int8") if any(n in r["ms"] for r in full)]
        head = ["case", "mode", "fused ms", "torch.nn ms", "fused vs torch.nn"]
        for n in peers:
            head += [f"{PEER_LABELS.get(n, n)} ms", f"fused vs {PEER_LABELS.get(n, n)}"]
        print("| " + " | ".join(head + ["flag"]) + " |", file=out)
        print("|" + "---|" * (len(head) + 1), file=out)
        for r in full:
            cells = [case_label(r), r["mode"], fmt_ms(r, "fused"), fmt_ms(r, REFERENCE), fmt_speedup(r, REFERENCE)]
            for n in peers:
                cells += [fmt_ms(r, n), fmt_speedup(r, n)]
            print("| " + " | ".join(cells + [marks(r)]) + " |", file=out)
    if packed:
        print(f"\nPacked input, lengths uniform in [T/4, T] (PackedSequence, enforce_sorted=False):\n", file=out)
        print("| case | mode | fused packed ms | torch.nn packed ms | torch.nn padded ms | fused vs torch.nn packed "
              "| fused vs torch.nn padded | flag |", file=out)
        print("|" + "---|" * 8, file=out)
        for r in packed:
            print(f"| {case_label(r)} | {r['mode']} | {fmt_ms(r, 'fused')} | {fmt_ms(r, REFERENCE)} | "
                  f"{fmt_ms(r, 'torch.nn padded')} | {fmt_speedup(r, REFERENCE)} | "
                  f"{fmt_speedup(r, 'torch.nn padded')} | {marks(r)} |", file=out)
    if variants:
        print("\nVariants beyond torch.nn (fused ms is the variant's; its cost is its time over fused_rnn's plain "
              "layer's, the inverse of \"vs fused plain\"):\n", file=out)
        print(f"| case | mode | fused ms | fused plain ms | fused vs fused plain | torch.nn ms | {COMPILED_LOOP} ms "
              f"| fused vs {COMPILED_LOOP} | flag |", file=out)
        print("|" + "---|" * 9, file=out)
        for r in variants:
            print(f"| {case_label(r)} | {r['mode']} | {fmt_ms(r, 'fused')} | {fmt_ms(r, PLAIN)} | "
                  f"{fmt_speedup(r, PLAIN)} | {fmt_ms(r, REFERENCE)} | {fmt_ms(r, COMPILED_LOOP)} | "
                  f"{fmt_speedup(r, COMPILED_LOOP)} | {marks(r)} |", file=out)
    int8_rows = [r for r in full if r.get("error")]
    if int8_rows:
        print("\nint8 rows: largest |output - float32 output|, fused_rnn's int8 / torch's int8: " + ", ".join(
            f"{case_label(r)} {r['error']['fused']:.2g} / {r['error']['int8']:.2g}" for r in int8_rows), file=out)
    if records or variants:
        speedups = [r["speedup"][REFERENCE]["median"] for r in full if not r.get("error")]
        if speedups:
            print(f"\nfull-length input: geometric-mean speedup over torch.nn {statistics.geometric_mean(speedups):.2f}x "
                  f"over {len(speedups)} rows (min {min(speedups):.2f}x, max {max(speedups):.2f}x)", file=out)
        print("ms: median (first–third quartile) of the rounds; speedups: median (quartiles) of the per-round "
              "ratios.", file=out)


def warnings_for(records, notes):
    """Lines that say how far to trust this run."""
    lines = sorted(notes)
    if any(r["wide_spread"] for r in records):
        lines.append(f"rows marked ~ have a wide spread (an interquartile range over {WIDE_SPREAD:.0%} of the "
                     "median): rerun them, or on a quieter machine, before quoting them")
    loaded = [r["load_average"] for r in records if r["loaded"]]
    if loaded:
        lines.append(f"the machine was loaded: load average up to {max(loaded):.1f} on {os.cpu_count()} cores "
                     "(rows marked !); other jobs shared the cores, so these timings and ratios are not "
                     "the machine's")
    return lines


def plot(records, path):
    """Speedup over torch.nn of every contender, log scale with interquartile error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [r for r in records if not r.get("variant")]  # their table says what matters there
    if not records:
        return
    panels = sorted({(r["lengths"], r["mode"]) for r in records})
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(7, 0.7 * max(sum(1 for r in records if (r["lengths"], r["mode"]) == p)
                                                        for p in panels) + 3), 4 * len(panels)))
    first = records[0]
    for ax, (lengths, mode) in zip(axes[:, 0], panels):
        rows = [r for r in records if (r["lengths"], r["mode"]) == (lengths, mode)]
        # Everyone's speedup over torch.nn: fused's is its per-round ratio; another contender's is
        # fused's over torch.nn divided by fused's over it.
        names = ["fused"] + sorted({n for r in rows for n in r["speedup"]} - {REFERENCE})
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            pos, mid, low, high = [], [], [], []
            for p, r in enumerate(rows):
                ref = r["speedup"][REFERENCE]
                if name == "fused":
                    m, lo, hi = ref["median"], ref["q1"], ref["q3"]
                elif name in r["speedup"]:
                    own = r["speedup"][name]
                    m, lo, hi = ref["median"] / own["median"], ref["q1"] / own["q3"], ref["q3"] / own["q1"]
                else:
                    continue
                pos.append(p - 0.4 + width * (k + 0.5))
                mid.append(m)
                low.append(max(m - lo, 0))
                high.append(max(hi - m, 0))
            label = "fused_rnn" if name == "fused" else PEER_LABELS.get(name, name)
            ax.bar(pos, mid, width, yerr=[low, high], capsize=2, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(ticks)
        ax.yaxis.set_minor_formatter(ticks)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(list(range(len(rows))))
        ax.set_xticklabels([case_label(r) + (" " + marks(r) if marks(r) else "") for r in rows],
                           rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speedup over torch.nn" + (" packed" if lengths != "full" else ""))
        ax.set_title(f"{mode}, {'packed, lengths U[T/4, T]' if lengths != 'full' else 'full-length input'}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{first['device']}, torch {first['torch']}, {first['threads']} threads, {first['date'][:10]}\n"
                 "bars: median of the rounds, whiskers: quartiles; ~ wide spread, ! loaded machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(records, directory, stem):
    """Writes stem.json and stem.png in directory (records replace what was there)."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, stem)
    with open(base + ".json", "w") as f:
        json.dump(records, f, indent=1)
    plot(records, base + ".png")
    return base


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
    p.add_argument("--cells", default=None,
                   help=f"layers and cells, default {','.join(LAYER_KINDS + CELL_KINDS)} (with --shapes: the "
                        f"layers); a cell's rows time a loop of T calls from Python (CELL_LOOP_* cases)")
    p.add_argument("--shapes", type=parse_case, nargs="+", help="TxBxH or TxBxIxH (replaces the grid)")
    p.add_argument("--packed-shapes", type=parse_case, nargs="*", default=None,
                   help="shapes for packed input (default: the grid's; none with --shapes)")
    p.add_argument("--layers", type=int, default=1, help="with --shapes")
    p.add_argument("--bidirectional", action="store_true", help="with --shapes")
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--dtypes", default=None, help="default: float32 (plus bfloat16,float16 on a GPU); int8 "
                                                  "(CPU, LSTM and GRU inference) times the int8 layers")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds (default: {MIN_ROUNDS} to {MAX_ROUNDS}, as many as fit "
                        f"{ROUND_BUDGET_S['cpu']} s per row on the CPU, {ROUND_BUDGET_S['cuda']} s on a GPU)")
    p.add_argument("--loop", action="store_true", help="also time the plain PyTorch loop (bench/loop.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results-dir", default=OUT_DIR, help="where records and plot go (default bench/out/, ignored)")
    p.add_argument("--update-reference", action="store_true",
                   help="also replace the committed reference results, bench/results/<device>.json and .png")
    p.add_argument("--no-save", action="store_true", help="neither records nor plot")
    p.add_argument("--cold-malloc", action="store_true",
                   help="leave glibc's malloc at its start-up settings, where torch.nn's CPU layers map their "
                        "workspace anew at every call (default: as a long-running program has it)")
    args = p.parse_args(argv)
    malloc = "glibc start-up settings" if args.cold_malloc else keep_freed_memory()

    device = torch.device(args.device)
    kinds = (args.cells or ",".join(LAYER_KINDS if args.shapes else LAYER_KINDS + CELL_KINDS)).split(",")
    unknown = [k for k in kinds if k not in CELLS]
    if unknown:
        p.error(f"--cells: unknown {', '.join(unknown)} (choose from {', '.join(CELLS)})")
    if args.shapes:
        cases = [s + (args.layers, args.bidirectional) for s in args.shapes]
        cell_loop_cases, packed_cases = cases, []
    else:
        cases = (FULL_CASES if args.full else quick_cases(device)) + SHORT_CASES
        cell_loop_cases = FULL_CELL_LOOP_CASES if args.full else QUICK_CELL_LOOP_CASES
        packed_cases = FULL_PACKED_CASES if args.full else QUICK_PACKED_CASES
    layer_kinds = [k for k in kinds if k in LAYER_KINDS]
    if args.packed_shapes is not None:
        packed_cases = [s + (args.layers, args.bidirectional) for s in args.packed_shapes]
    dtypes = (args.dtypes or ("float32,bfloat16,float16" if device.type == "cuda" else "float32")).split(",")
    grid = [(c, s, d, m, "full") for c in layer_kinds for s in cases for d in dtypes
            for m in args.modes.split(",")]
    if not args.shapes and "float32" in dtypes:  # the variants' rows (float32), for the layers they extend
        variant_cases = FULL_VARIANT_CASES if args.full else QUICK_VARIANT_CASES
        grid += [(c, s, "float32", m, "full", v) for (c, v) in VARIANTS if c in layer_kinds
                 for s in variant_cases for m in args.modes.split(",")]
    grid += [(c, s, d, m, "full") for c in kinds if c in CELL_KINDS for s in cell_loop_cases for d in dtypes
             if d != INT8 for m in args.modes.split(",")]
    if "float32" in dtypes:  # packed input: float32 rows
        grid += [(c, s, "float32", m, "packed") for c in layer_kinds for s in packed_cases
                 for m in args.modes.split(",")]
    # The int8 rows (CPU inference, LSTM and GRU): their own cases in the grids, or the --shapes when
    # --dtypes names int8; not with --dtypes that does not.
    grid = [row for row in grid if row[2] != INT8]
    int8_cases = cases if args.shapes else (LOW_PRECISION_CASES if args.full else QUICK_LOW_PRECISION_CASES)
    if (INT8 in dtypes if args.dtypes else not args.shapes) and device.type == "cpu" and \
            "inference" in args.modes.split(","):
        grid += [(c, s, INT8, "inference", "full") for c in layer_kinds if c in ("LSTM", "GRU")
                 for s in int8_cases]

    records, notes = [], set()
    load = load_average()
    print(f"# fused_rnn benchmark on {device_name(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load} on {os.cpu_count()} cores, "
          f"malloc: {malloc or 'as the C library has it'}", file=sys.stderr)
    if machine_is_loaded(load):
        print(f"# the machine is loaded before the start (load average {load} > {os.cpu_count()} cores): "
              "expect noisy, pessimistic ratios", file=sys.stderr)
    t0 = time.perf_counter()
    for k, (cell, case, dtype, mode, lengths, *variant) in enumerate(grid, 1):
        variant = variant[0] if variant else None
        print(f"[{k}/{len(grid)} {time.perf_counter() - t0:4.0f}s] {cell} T,B,I,H,layers,bi={case} "
              f"{dtype} {mode}" + (" packed" if lengths == "packed" else "") + (f" {variant}" if variant else ""),
              file=sys.stderr, flush=True)
        record = bench_one(cell, case, DTYPES[dtype], mode, device, args.repeats, lengths=lengths,
                           with_loop=args.loop, notes=notes, variant=variant)
        records.append(dict(record, malloc=malloc))
    print_tables(records)
    for line in warnings_for(records, notes):
        print(f"note: {line}")

    if not args.no_save and records:
        stem = device_name(device).replace(" ", "_")
        date = records[0]["date"][:19].replace(":", "").replace("-", "")
        name, n = f"{stem}-{date}", 1
        while os.path.exists(os.path.join(args.results_dir, name + ".json")):  # two runs in one second
            n += 1
            name = f"{stem}-{date}-{n}"
        base = save(records, args.results_dir, name)
        print(f"records in {base}.json, plot in {base}.png", file=sys.stderr)
        if args.update_reference:
            base = save(records, REFERENCE_DIR, stem)
            print(f"reference results replaced: {base}.json, {base}.png (commit them)", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
