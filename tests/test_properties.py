"""Property-based differential tests against torch.nn (hypothesis), on the CPU in float64.

Random configurations of every layer and cell (layers, directions, bias, batch_first, proj_size,
dropout in training, T, B, I, H, packed or padded or unbatched, hx given or not) must give torch.nn's
outputs and gradients; random malformed hidden states and batch_sizes must raise, never run.
The budget is fixed and the examples derandomized, so CI is reproducible and quick.
"""
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from helpers import check_parity, leaves, make_pair, run

D = torch.float64
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
                database=None)
ERRORS = (ValueError, TypeError, RuntimeError)


@st.composite
def layer_configs(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    hidden = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 3))
    cfg = dict(
        kind=kind, input_size=draw(st.integers(1, 5)), hidden=hidden, layers=layers,
        bidirectional=draw(st.booleans()), bias=draw(st.booleans()), batch_first=draw(st.booleans()),
        proj=draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0,
        dropout=draw(st.sampled_from([0.0, 0.0, 0.5])) if layers > 1 else 0.0,
        steps=draw(st.integers(1, 6)), batch=draw(st.integers(1, 4)),
        layout=draw(st.sampled_from(["padded", "packed", "unbatched"])), with_hx=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    if cfg["layout"] == "packed":
        lengths = draw(st.lists(st.integers(1, cfg["steps"]), min_size=cfg["batch"], max_size=cfg["batch"]))
        cfg["lengths"] = lengths
        cfg["enforce_sorted"] = draw(st.booleans())
        if cfg["enforce_sorted"]:
            cfg["lengths"] = sorted(lengths, reverse=True)
    return cfg


def _build(cfg):
    torch.manual_seed(cfg["seed"])
    kind = cfg["kind"]
    extra = {}
    if kind.startswith("RNN"):
        extra["nonlinearity"] = "tanh" if kind == "RNN_TANH" else "relu"
        kind = "RNN"
    if cfg["proj"]:
        extra["proj_size"] = cfg["proj"]
    fused, ref = make_pair(kind, cfg["input_size"], cfg["hidden"], num_layers=cfg["layers"],
                           bias=cfg["bias"], batch_first=cfg["batch_first"], dropout=cfg["dropout"],
                           bidirectional=cfg["bidirectional"], **extra)
    return kind, fused, ref


def _inputs(cfg, kind):
    T, B, I = cfg["steps"], cfg["batch"], cfg["input_size"]
    x = torch.randn((B, T, I) if cfg["batch_first"] else (T, B, I), dtype=D)
    batched = True
    if cfg["layout"] == "unbatched":
        x, batched = x[0] if cfg["batch_first"] else x[:, 0], False
    elif cfg["layout"] == "packed":
        x = pack_padded_sequence(x, torch.tensor(cfg["lengths"]), batch_first=cfg["batch_first"],
                                 enforce_sorted=cfg["enforce_sorted"])
    hx = None
    if cfg["with_hx"]:
        lead = (cfg["layers"] * (2 if cfg["bidirectional"] else 1),) + ((B,) if batched else ())
        h = torch.randn(lead + (cfg["proj"] or cfg["hidden"],), dtype=D)
        hx = (h, torch.randn(lead + (cfg["hidden"],), dtype=D)) if kind == "LSTM" else h
    return x, hx


@settings(max_examples=150, **SETTINGS)
@given(layer_configs())
def test_layers_match_torch(cfg):
    kind, fused, ref = _build(cfg)
    x, hx = _inputs(cfg, kind)
    event(f"{cfg['kind']} {cfg['layout']}{' dropout' if cfg['dropout'] else ''}{' proj' if cfg['proj'] else ''}")
    if cfg["dropout"]:
        # training mode with dropout: torch.nn and ours draw the same masks from the same seed
        for m in (fused, ref):
            m.train()
        torch.manual_seed(cfg["seed"] + 1)
        out_f, grad_f = run(fused, x, hx)
        torch.manual_seed(cfg["seed"] + 1)
        out_r, grad_r = run(ref, x, hx)
        for a, e in zip(out_f + grad_f, out_r + grad_r):
            if e is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    else:
        fused.eval()
        ref.eval()
        check_parity(fused, ref, x, hx)


@settings(max_examples=60, **SETTINGS)
@given(kind=st.sampled_from(["LSTMCell", "GRUCell", "RNNCell-tanh", "RNNCell-relu"]),
       input_size=st.integers(1, 6), hidden=st.integers(1, 6), batch=st.integers(0, 4),
       batched=st.booleans(), bias=st.booleans(), with_hx=st.booleans(), seed=st.integers(0, 2**16))
def test_cells_match_torch(kind, input_size, hidden, batch, batched, bias, with_hx, seed):
    torch.manual_seed(seed)
    extra = {}
    if kind.startswith("RNNCell"):
        kind, extra["nonlinearity"] = kind.split("-")
    fused, ref = make_pair(kind, input_size, hidden, bias=bias, **extra)
    lead = (batch,) if batched else ()
    x = torch.randn(lead + (input_size,), dtype=D)
    hx = None
    if with_hx:
        hx = torch.randn(lead + (hidden,), dtype=D)
        if kind == "LSTMCell":
            hx = (hx, torch.randn(lead + (hidden,), dtype=D))
    check_parity(fused, ref, x, hx)


@settings(max_examples=60, **SETTINGS)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batched=st.booleans(),
       shape=st.lists(st.integers(0, 4), min_size=1, max_size=4), which=st.integers(0, 1))
def test_malformed_hidden_state_always_raises(kind, layers, bidirectional, batched, shape, which):
    """Any hx shape but the expected one raises (torch.nn raises too); never a result."""
    fused, ref = make_pair(kind, 3, 4, num_layers=layers, bidirectional=bidirectional)
    lead = layers * (2 if bidirectional else 1)
    expected = (lead, 2, 4) if batched else (lead, 4)
    assume(tuple(shape) != expected)
    x = torch.randn((5, 2, 3) if batched else (5, 3), dtype=D)
    bad = torch.zeros(shape, dtype=D)
    good = torch.zeros(expected, dtype=D)
    if kind == "LSTM":
        hx = (bad, good) if which == 0 else (good, bad)
    else:
        hx = bad
    with pytest.raises(ERRORS):
        ref(x, hx)
    name = ("h_0", "c_0")[which] if kind == "LSTM" else "hx"  # the malformed state, as our message names it
    if len(shape) != len(expected):
        words = (f"{kind}: for {'batched 3' if batched else 'unbatched 2'}-D input, {name} should be "
                 f"{len(expected)}-D but got a {len(shape)}-D tensor")
    else:
        words = f"{kind}: Expected {name} of size {expected} "
    with pytest.raises(RuntimeError, match=re.escape(words)):
        fused(x, hx)


@st.composite
def packed_batch_sizes(draw):
    """Half well-formed (positive, non-increasing, summing to the rows), half anything."""
    if draw(st.booleans()):
        sizes = sorted(draw(st.lists(st.integers(1, 4), min_size=1, max_size=5)), reverse=True)
        return sizes, sum(sizes)
    sizes = draw(st.lists(st.integers(-1, 4), min_size=0, max_size=5))
    return sizes, max(0, sum(max(b, 0) for b in sizes) + draw(st.integers(-2, 2)))


@settings(max_examples=80, **SETTINGS)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), sizes_rows=packed_batch_sizes())
def test_packed_batch_sizes_are_validated(kind, sizes_rows):
    """Random batch_sizes: valid ones give torch.nn's result; any other raises a named error."""
    batch_sizes, rows = sizes_rows
    fused, ref = make_pair(kind, 3, 2)
    seq = PackedSequence(torch.randn(rows, 3, dtype=D), torch.tensor(batch_sizes, dtype=torch.int64))
    valid = (len(batch_sizes) > 0 and all(b > 0 for b in batch_sizes)
             and all(a >= b for a, b in zip(batch_sizes, batch_sizes[1:])) and sum(batch_sizes) == rows)
    event("valid batch_sizes" if valid else "invalid batch_sizes")
    if valid:
        check_parity(fused, ref, seq)
    else:
        with pytest.raises(ERRORS, match="batch_sizes"):
            fused(seq)


@st.composite
def sorted_indices(draw):
    """A permutation of range(batch), or one corrupted: a duplicate, out of range, too short or long."""
    batch = draw(st.integers(1, 4))
    perm = list(draw(st.permutations(range(batch))))
    how = draw(st.sampled_from(["none", "none", "duplicate", "negative", "too_large", "drop", "extra"]))
    if how == "duplicate" and batch > 1:
        perm[draw(st.integers(1, batch - 1))] = perm[0]
    elif how == "negative":
        perm[0] = -1
    elif how == "too_large":
        perm[-1] = batch
    elif how == "drop":
        perm = perm[:-1]
    elif how == "extra":
        perm.append(batch)
    return batch, perm


@settings(max_examples=60, **SETTINGS)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), batch_perm=sorted_indices(), give_unsorted=st.booleans())
def test_packed_sorted_indices_are_validated(kind, batch_perm, give_unsorted):
    """sorted_indices that is not a permutation of range(batch) raises; a permutation matches torch.nn."""
    batch, perm = batch_perm
    fused, ref = make_pair(kind, 3, 2)
    steps = [batch, max(1, batch - 1)]
    data = torch.randn(sum(steps), 3, dtype=D)
    index = torch.tensor(perm, dtype=torch.int64)
    is_perm = sorted(perm) == list(range(batch))
    event("a permutation" if is_perm else "not a permutation")
    if is_perm:
        unsorted = torch.empty_like(index).scatter_(0, index, torch.arange(batch)) if give_unsorted else None
        seq = PackedSequence(data, torch.tensor(steps), index, unsorted)
        check_parity(fused, ref, seq)
        assert leaves(fused(seq))[1].shape[1] == batch
    else:
        with pytest.raises(ERRORS, match="sorted_indices"):
            fused(PackedSequence(data, torch.tensor(steps), index, index.clone()))
