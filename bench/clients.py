"""Real clients that nobody here wrote: PyTorch's examples repository, unmodified, run as it is and
with torch.nn's recurrent classes swapped for fused_rnn's, the two runs alternated.

    python -m bench.clients --examples PATH   # PATH: a checkout of github.com/pytorch/examples

The swap happens before the example is imported (torch.nn.LSTM = fused_rnn.LSTM, and GRU, RNN and
the cells), so the example's own code builds fused_rnn's modules; nothing in it is edited. Each run
is a child process in a scratch folder with the example's files copied in.

- time_sequence_prediction: LSTMCell in float64 driven step by step, LBFGS (--tsp-steps of them).
  Timed: the whole run's wall time. Checked: the printed losses agree (1e-6 relative).
- word_language_model: one epoch of main.py (emsize = nhid = 200, 2 layers, bptt 35, batch 20,
  dropout 0.2, its defaults) for LSTM, GRU, RNN_TANH and the tied LSTM. Timed: main.py's own
  "ms/batch" reports (their median, the first interval left out as warm-up). Its training text is
  wikitext-2's valid.txt (--wlm-train valid, the default: a tenth of train.txt's length; a checkout
  without Git LFS has no train.txt). Checked: the validation loss agrees to 2% (a sanity bound, not
  a precision claim: at the example's learning rate of 20 two float32 summation orders drift apart
  over an epoch, 6.32 against 6.35 for the LSTM on 2026-12-07; a wrong gradient lands far outside
  it; the precision is tests/'s, 1e-5 in float32 against torch.nn).

Records go to bench/out/clients-<date>.json (ignored by git). The ratio is torch.nn's time over
fused_rnn's (> 1: fused_rnn faster), of the medians over the rounds.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(BENCH_DIR, "out")

SWAP = ("import torch, fused_rnn\n"
        "for _name in ('LSTM', 'GRU', 'RNN', 'LSTMCell', 'GRUCell', 'RNNCell'):\n"
        "    setattr(torch.nn, _name, getattr(fused_rnn, _name))\n")
RUN = ("import runpy, sys\n"
       "sys.argv = {argv!r}\n"
       "sys.path.insert(0, '.')\n"
       "runpy.run_path({script!r}, run_name='__main__')\n")


def run_example(workdir, script, argv, fused, timeout):
    """(wall seconds, stdout) of one run of `script` in workdir, with fused_rnn's classes or torch.nn's."""
    code = (SWAP if fused else "") + RUN.format(argv=[script] + argv, script=script)
    # time_sequence_prediction loads its numpy data with torch.load, refused since torch 2.6 by the
    # weights_only default: torch's own switch back, not an edit of the example.
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                         env=env)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{script} {' '.join(argv)} ({'fused_rnn' if fused else 'torch.nn'}) failed:\n"
                           f"{out.stderr[-3000:]}")
    return seconds, out.stdout


def floats_after(label, text):
    return [float(m) for m in re.findall(rf"{label}\s*([-+0-9.eE]+)", text)]


def time_sequence_prediction(examples, rounds, steps, timeout):
    source = os.path.join(examples, "time_sequence_prediction")
    work = tempfile.mkdtemp(prefix="tsp-")
    for name in ("train.py", "generate_sine_wave.py"):
        shutil.copy(os.path.join(source, name), work)
    subprocess.run([sys.executable, "generate_sine_wave.py"], cwd=work, check=True, capture_output=True,
                   timeout=timeout)
    times, losses = {False: [], True: []}, {}
    for _ in range(rounds):
        for fused in (False, True):
            seconds, stdout = run_example(work, "train.py", ["--steps", str(steps)], fused, timeout)
            times[fused].append(seconds)
            losses[fused] = floats_after("loss:", stdout)
    shutil.rmtree(work, ignore_errors=True)
    agree = (len(losses[False]) == len(losses[True]) and len(losses[False]) > 0 and all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12) for a, b in zip(losses[False], losses[True])))
    return {"client": "time_sequence_prediction", "what": f"train.py --steps {steps} (LSTMCell, float64, LBFGS)",
            "unit": "s per run", "torch.nn": times[False], "fused": times[True], "losses_agree": agree,
            "final_loss": {"torch.nn": losses[False][-1], "fused": losses[True][-1]}}


def word_language_model(examples, rounds, model, tied, train_text, timeout):
    source = os.path.join(examples, "word_language_model")
    work = tempfile.mkdtemp(prefix="wlm-")
    for name in ("main.py", "data.py", "model.py"):
        shutil.copy(os.path.join(source, name), work)
    data = os.path.join(work, "data")
    os.makedirs(data)
    corpus = os.path.join(source, "data", "wikitext-2")
    for split in ("valid", "test"):
        shutil.copy(os.path.join(corpus, f"{split}.txt"), data)
    shutil.copy(os.path.join(corpus, f"{train_text}.txt"), os.path.join(data, "train.txt"))
    argv = ["--data", data, "--epochs", "1", "--model", model, "--log-interval", "50", "--save",
            os.path.join(work, "model.pt")] + (["--tied"] if tied else [])
    per_batch, valid = {False: [], True: []}, {}
    for _ in range(rounds):
        for fused in (False, True):
            _, stdout = run_example(work, "main.py", argv, fused, timeout)
            reports = floats_after(r"ms/batch", stdout)
            per_batch[fused].append(statistics.median(reports[1:] or reports))
            valid[fused] = floats_after(r"valid loss", stdout)[-1]
    shutil.rmtree(work, ignore_errors=True)
    return {"client": "word_language_model", "what": f"main.py --model {model}{' --tied' if tied else ''}, "
            f"one epoch of {train_text}.txt", "unit": "ms per batch", "torch.nn": per_batch[False],
            "fused": per_batch[True], "losses_agree": abs(valid[False] - valid[True]) <= 2e-2 * abs(valid[False]),
            "final_loss": {"torch.nn": valid[False], "fused": valid[True]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", required=True, help="a checkout of github.com/pytorch/examples")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, alternated torch.nn / fused_rnn")
    p.add_argument("--clients", default="tsp,LSTM,GRU,RNN_TANH,LSTM-tied")
    p.add_argument("--tsp-steps", type=int, default=2)
    p.add_argument("--wlm-train", default="valid", choices=["valid", "train"])
    p.add_argument("--timeout", type=int, default=1800, help="seconds a run may take")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    records = []
    for client in args.clients.split(","):
        print(f"# {client} ...", file=sys.stderr, flush=True)
        if client == "tsp":
            record = time_sequence_prediction(args.examples, args.rounds, args.tsp_steps, args.timeout)
        else:
            model, _, tied = client.partition("-")
            record = word_language_model(args.examples, args.rounds, model, tied == "tied", args.wlm_train,
                                         args.timeout)
        ratio = statistics.median(record["torch.nn"]) / statistics.median(record["fused"])
        record.update(ratio=round(ratio, 3), threads=torch.get_num_threads(), torch=torch.__version__,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        records.append(record)
        print(f"| {record['client']} | {record['what']} | torch.nn {statistics.median(record['torch.nn']):.2f} | "
              f"fused {statistics.median(record['fused']):.2f} {record['unit']} | {ratio:.2f}x | "
              f"final loss {record['final_loss']['torch.nn']:.6g} / {record['final_loss']['fused']:.6g}, "
              f"agree: {record['losses_agree']} |", flush=True)
    if not args.no_save:
        os.makedirs(OUT_DIR, exist_ok=True)
        path = os.path.join(OUT_DIR, f"clients-{records[0]['date'][:19].replace(':', '')}.json")
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        print(f"records in {path}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
