"""Drop-in modules for torch.nn.LSTM / GRU / RNN and their cells.

The layers subclass nn.RNNBase and the cells nn.RNNCellBase, so parameter names, shapes, order,
initialisation, repr, state_dict and the constructor checks are torch.nn's own. What differs is the
forward: it puts the input in packed layout and runs functional.stacked_rnn over our compiled ops.
"""
import math
import numbers
import operator
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional, onnx_export

_HiddenState = Union[Tensor, Tuple[Tensor, Tensor]]


def _autocast_casts(input: Tensor) -> bool:
    """Under autocast, functional.layer casts input, states and weights itself, so their dtypes may
    differ (a bfloat16 activation into float32 weights), as torch.nn's layers allow there."""
    return (input.is_floating_point() and input.dtype != torch.float64
            and torch.amp.is_autocast_available(input.device.type)
            and torch.is_autocast_enabled(input.device.type))


def _check_state_type(name: str, state) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")


def _check_state_device(name: str, state: Tensor, input: Tensor) -> None:
    if state.device != input.device:
        raise RuntimeError(f"{name} is on {state.device} but the input is on {input.device}; "
                           f"expected the input's device")


def _check_state_dtype(name: str, state: Tensor, input: Tensor) -> None:
    if state.dtype != input.dtype and not _autocast_casts(input):
        raise RuntimeError(f"{name} has dtype {state.dtype} but the input has dtype {input.dtype}; "
                           f"expected the input's dtype")


# The exceptions a caller of torch.nn's recurrent modules catches for bad input.
_ORDINARY_ERRORS = (TypeError, ValueError, RuntimeError)


def _as_torch_nn_would(ours: Exception, torch_nn_call, device: torch.device) -> Exception:
    """The exception to raise for input we reject, so that code written against torch.nn's errors
    keeps working: when torch.nn rejects the same input with a TypeError, ValueError or
    RuntimeError, its type, with its message first and ours after it; where torch.nn fails
    unhelpfully (AttributeError, IndexError) or accepts the input, ours as it is.

    torch.nn runs only here, on input already known to be bad: it fails at its checks, or, where it
    accepts the input, computes it once (gradients off, the random state restored for dropout)."""
    if torch.compiler.is_compiling():
        return ours
    try:
        with torch.no_grad(), warnings.catch_warnings(), \
                torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            warnings.simplefilter("ignore")
            torch_nn_call()
    except _ORDINARY_ERRORS as theirs:
        if type(theirs) is type(ours) and str(theirs) in str(ours):
            return ours
        try:
            return type(theirs)(f"{theirs}\n{ours}")
        except Exception:  # noqa: BLE001 - an exception class that takes more than a message
            return ours
    except Exception:  # noqa: BLE001 - torch.nn's own failure (AttributeError, IndexError) helps no one
        pass
    return ours


_ELMAN_MODES = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}


def _elman_mode(nonlinearity, owner: str = "") -> str:
    """The mode (cell id name) of an Elman nonlinearity; torch.nn's error for an unknown one."""
    if not isinstance(nonlinearity, str) or nonlinearity not in _ELMAN_MODES:
        raise ValueError(f"{owner}Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _ELMAN_MODES[nonlinearity]


def _split_hx(name: str, hx, is_pair: bool, pair: str, pair_owner: str) -> tuple:
    """hx as its states, of the kind the module takes: a pair `pair` of two tensors (LSTM, LSTMCell)
    or one Tensor, else a TypeError that says which (`pair_owner` is the module that takes pairs)."""
    if is_pair:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            got = f"{type(hx).__name__} of length {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
            raise TypeError(f"{name}: hx must be a tuple {pair} of two tensors, got {got}")
        return tuple(hx)
    if not isinstance(hx, Tensor):
        hint = f" (only {pair_owner} takes a tuple {pair})" if isinstance(hx, (tuple, list)) else ""
        raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}{hint}")
    return (hx,)


def _check_int_arg(owner: str, arg: str, value, minimum: Optional[int]) -> int:
    """A constructor size argument: an integer (anything with __index__) of at least `minimum`."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {arg} should be of type int, got: {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        bound = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{owner}: {arg} must be {bound}, got {value}")
    return value


def _check_dtype_arg(owner: str, dtype) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype)
                              or not (dtype.is_floating_point or dtype.is_complex)):
        raise TypeError(f"{owner}: dtype must be a floating point or complex torch.dtype, got {dtype!r}")


def _check_input_dtype(name: str, input: Tensor) -> None:
    # ValueError, as torch.nn's layers raise for an integer or bool input
    if not (input.is_floating_point() or input.is_complex()):
        raise ValueError(f"{name}: input must be a floating point or complex tensor, got {input.dtype} "
                         f"(convert it, e.g. input.float())")


def _checked_constructor(torch_nn_class, checks, *args, **kwargs) -> None:
    """Runs our constructor checks; a rejection is raised as torch.nn's constructor raises it for the
    same arguments (see _as_torch_nn_would), asked on the meta device so that it allocates nothing."""
    try:
        checks()
    except _ORDINARY_ERRORS as ours:
        raise _as_torch_nn_would(ours, lambda: torch_nn_class(*args, **{**kwargs, "device": "meta"}),
                                 torch.device("cpu")) from None


def _refuse_extra_arguments(owner: str, kwargs) -> None:
    """GRU and RNN take no proj_size (torch.nn refuses it with a ValueError) or peephole, nor anything else."""
    if "proj_size" in kwargs:
        raise ValueError(f"{owner}: proj_size (a projection of the hidden state) is an argument of LSTM only")
    if "peephole" in kwargs:
        raise ValueError(f"{owner}: peephole connections (from the cell state to the gates) are an LSTM's; "
                         f"{owner} has no cell state")
    if kwargs:
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument '{next(iter(kwargs))}'")


def _check_flag(owner: str, arg: str, value) -> bool:
    """A keyword flag of fused_rnn's own (not torch.nn's): True or False, nothing that merely converts."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {arg} should be of type bool, got: {type(value).__name__}")
    return value


def has_variants(module) -> bool:
    """Whether a module uses an option beyond torch.nn (peephole connections, zoneout, recurrent
    dropout, layer norm), so that no torch.nn or quantized twin can stand for it (convert,
    quantize_dynamic, tracing refuse it)."""
    return bool(getattr(module, "peephole", False) or getattr(module, "zoneout", 0)
                or getattr(module, "recurrent_dropout", 0) or getattr(module, "layer_norm", False))


def _variants_in_eval_are_torch_nns(module) -> bool:
    """Whether the module computes as its torch.nn twin now: recurrent dropout is the only option it
    uses beyond torch.nn, and it is in eval mode, where that is the identity."""
    return (not module.training and not getattr(module, "peephole", False)
            and not getattr(module, "zoneout", 0) and not getattr(module, "layer_norm", False))


_PROBABILITY_MEANINGS = {"zoneout": "a unit keeping its previous state",
                         "recurrent_dropout": "a unit of h_{t-1} being dropped from the recurrent product"}


def _check_probability(owner: str, arg: str, value) -> float:
    """A probability of fused_rnn's own keyword arguments, in [0, 1) (1 would freeze the state, or drop
    the whole recurrence)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Number) or isinstance(value, complex):
        raise TypeError(f"{owner}: {arg} should be a number in range [0, 1), got: {type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{owner}: {arg} should be a number in range [0, 1) representing the probability of "
                         f"{_PROBABILITY_MEANINGS[arg]}, got {value}")
    return float(value)


def _peephole_parameters(module, suffixes: Sequence[str], hidden_size: int, device, dtype) -> List[str]:
    """Registers a peephole weight [3 * hidden_size] (p_i, p_f, p_o) per name suffix, after torch.nn's
    parameters, initialised as torch.nn initialises every recurrent parameter: U(-1/√H, 1/√H)."""
    names = []
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for suffix in suffixes:
        weight = nn.Parameter(torch.empty(3 * hidden_size, device=device, dtype=dtype))
        nn.init.uniform_(weight, -bound, bound)
        module.register_parameter("weight_peephole" + suffix, weight)
        names.append("weight_peephole" + suffix)
    return names


def _layer_norm_parameters(module, suffixes: Sequence[str], gates: int, hidden_size: int, lstm: bool, device,
                           dtype) -> List[List[str]]:
    """Registers a layer-normalized cell's weights per name suffix, after torch.nn's parameters (and
    the peepholes): ln_ih_weight and ln_hh_weight of gates * hidden_size, initialised to 1; an
    LSTM's ln_c_weight (1) and ln_c_bias (0) of hidden_size. Returns their names per suffix, in the
    order the op packs them (functional.layer's layer_norm)."""
    names = []
    for suffix in suffixes:
        shapes = [("ln_ih_weight", gates, 1.0), ("ln_hh_weight", gates, 1.0)]
        if lstm:
            shapes += [("ln_c_weight", 1, 1.0), ("ln_c_bias", 1, 0.0)]
        for name, size, value in shapes:
            module.register_parameter(name + suffix, nn.Parameter(
                torch.full((size * hidden_size,), value, device=device, dtype=dtype)))
        names.append([name + suffix for name, _, _ in shapes])
    return names


def _refuse_variant_trace(module) -> None:
    """torch.jit.trace records torch.nn's forward, which has no peephole connections, zoneout,
    recurrent dropout or layer norm."""
    what = ("peephole connections" if module.peephole else "zoneout" if module.zoneout
            else "layer norm" if module.layer_norm else "recurrent dropout in training mode")
    raise NotImplementedError(
        f"fused_rnn: torch.jit.trace cannot record a {type(module).__name__} with {what} (a trace records "
        f"torch.nn's {type(module).__name__}, which has none). torch.export, torch.compile and torch.onnx.export "
        f"take it.")


def _check_nonlinearity_dtype(name: str, mode: str, input: Tensor) -> None:
    if mode == "RNN_RELU" and input.is_complex():
        raise RuntimeError(f"{name}: nonlinearity 'relu' is not defined for complex inputs (use 'tanh')")


def _check_weight_types(name: str, weight_names: Sequence[str], weights: Sequence[Optional[Tensor]]) -> None:
    for weight_name, weight in zip(weight_names, weights):
        if not isinstance(weight, Tensor):
            raise TypeError(f"{name}: parameter {weight_name} must be a Tensor, got {type(weight).__name__}")


def _check_weight_devices(name: str, weight_names: Sequence[str], weights: Sequence[Tensor], input: Tensor) -> None:
    for weight_name, weight in zip(weight_names, weights):
        if weight.device != input.device:
            raise RuntimeError(f"{name}: the input is on {input.device} but parameter {weight_name} is on "
                               f"{weight.device}; expected them on one device (move the input or the module "
                               f"with .to(device))")


def _check_weight_dtypes(name: str, weight_names: Sequence[str], weights: Sequence[Tensor], input: Tensor) -> None:
    for weight_name, weight in zip(weight_names, weights):
        if weight.dtype != input.dtype and not _autocast_casts(input):
            raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype "
                             f"({weight.dtype}) of parameter {weight_name}; expected one dtype for the "
                             f"input and every parameter")


def _check_packed(name: str, data, batch_sizes, sorted_indices, unsorted_indices) -> List[int]:
    """A PackedSequence's sizes and indices, checked (batch_sizes is on the CPU); returns batch_sizes
    as a list. torch.nn checks none of this: it fails inside its kernels or runs silently, and is
    not asked what it would say (see _as_torch_nn_would) about a PackedSequence that may not
    describe its data."""
    if not isinstance(data, Tensor) or data.dim() == 0:
        got = "a 0-D tensor" if isinstance(data, Tensor) else type(data).__name__
        raise TypeError(f"{name}: PackedSequence data must be a Tensor (sum(batch_sizes), input_size), got {got}")
    if (not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.is_floating_point()
            or batch_sizes.is_complex() or batch_sizes.dtype == torch.bool):
        got = (f"a {batch_sizes.dim()}-D {batch_sizes.dtype} tensor" if isinstance(batch_sizes, Tensor)
               else type(batch_sizes).__name__)
        raise TypeError(f"{name}: PackedSequence batch_sizes must be a 1-D integer tensor, got {got}")
    if batch_sizes.numel() == 0:
        raise ValueError(f"{name}: PackedSequence batch_sizes is empty; expected at least one time step")
    sizes = batch_sizes.tolist()
    _check_batch_sizes(name, sizes, data.size(0))
    batch = sizes[0]
    values = {}
    for index_name, index in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if index is None:
            continue
        if (not isinstance(index, Tensor) or index.dim() != 1
                or index.dtype not in (torch.int64, torch.int32) or index.numel() != batch):
            got = (f"a {index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, Tensor)
                   else type(index).__name__)
            raise ValueError(f"{name}: PackedSequence {index_name} must be a 1-D integer tensor of length "
                             f"batch_sizes[0] = {batch}, got {got}")
        # Values are checked where that is free of device syncs and of tracing (CPU, eager): on CUDA
        # a bad index fails inside index_select, as in torch.nn.
        if index.device.type == "cpu" and not torch.compiler.is_compiling():
            values[index_name] = index.tolist()
            if sorted(values[index_name]) != list(range(batch)):
                raise ValueError(f"{name}: PackedSequence {index_name} must be a permutation of "
                                 f"range({batch}), got {values[index_name]}")
    if len(values) == 2:
        order, inverse = values["sorted_indices"], values["unsorted_indices"]
        if any(order[inverse[i]] != i for i in range(batch)):
            raise ValueError(f"{name}: PackedSequence unsorted_indices must be the inverse permutation of "
                             f"sorted_indices, got sorted_indices={order} and unsorted_indices={inverse}")
    return sizes


def _exports_through_torch_nn() -> bool:
    """ONNX export (either exporter) and TorchScript tracing record torch.nn's forward for our
    modules, with the same parameters: ONNX's LSTM, GRU and RNN operators are what torch's
    exporters already make of torch.nn's layers (gates reordered, biases split), and a trace of
    torch.nn's ops runs without fused_rnn and on any shape (ours would record a Python
    autograd.Function and the shapes of the traced call)."""
    return functional.onnx_exporting() or torch.jit.is_tracing()


def _refuse_scripting(module):
    """torch.jit.script (its __prepare_scriptable__ hook): TorchScript cannot compile our forward
    (Python checks, an autograd.Function), and torch 2.14 scripts torch.nn's recurrent layers
    without a callable forward; one clear error, with the ways that work."""
    raise RuntimeError(
        f"fused_rnn: torch.jit.script cannot compile fused_rnn.{type(module).__name__} (its forward is Python "
        f"over custom ops). Use torch.jit.trace (it records torch.nn's ops), torch.export or torch.onnx.export, "
        f"which are supported, or fused_rnn.convert(model, to='torch') to turn the model's fused layers back "
        f"into torch.nn's first.")


class _FusedRNNBase(nn.RNNBase):
    """The forward shared by LSTM, GRU and RNN: torch.nn's argument handling, our kernels."""

    def flatten_parameters(self) -> None:
        """A no-op, kept for torch.nn's interface: our kernels read each weight where it lies, so
        there is no cuDNN weight buffer to pack (nn.RNNBase would pack one on every .to(cuda))."""

    __prepare_scriptable__ = _refuse_scripting

    def _refresh_flat_weights(self) -> None:
        """nn.RNNBase._update_flat_weights (weights swapped by torch.func.functional_call or a
        parametrization are followed), for a dict read per weight where each is still the parameter
        that _flat_weights holds: torch's check reads each through getattr and hasattr, 8 µs a call
        for one layer, more than a short call's kernels."""
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = parameters.get(name)  # absent where a parametrization or functional_call holds it
            if weight is None or ref is None or ref() is not weight:
                self._update_flat_weights()
                return

    def _state_names(self):
        return ("h_0", "c_0") if self.mode == "LSTM" else ("hx",)

    def _checked_states(self, hx, is_batched: bool):
        """hx as given -> a tuple of [L*D, B, *] tensors (unsorted order), checked in torch.nn's order:
        kind, rank, then (after the input's dtype and width) shape, device and dtype."""
        name = type(self).__name__
        names = self._state_names()
        states = _split_hx(name, hx, self.mode == "LSTM", "(h_0, c_0)", "LSTM")
        for state_name, state in zip(names, states):
            _check_state_type(f"{name}: {state_name}", state)
        want = 3 if is_batched else 2
        for state_name, state in zip(names, states):
            if state.dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"{name}: for {kind} input, {state_name} should be {want}-D "
                                   f"but got a {state.dim()}-D tensor")
        return states

    def _check_state_shapes(self, states, names, is_batched: bool, batch: int) -> None:
        name = type(self).__name__
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        layers = self.num_layers * (2 if self.bidirectional else 1)
        for state_name, state in zip(names, states):
            width, width_name = ((self.hidden_size, "hidden_size") if state_name == "c_0" else
                                 (out_size, "proj_size" if self.proj_size > 0 else "hidden_size"))
            expected = (layers, batch, width) if is_batched else (layers, width)
            if tuple(state.shape) != expected:
                layout = "num_layers * num_directions, " + ("batch, " if is_batched else "") + width_name
                raise RuntimeError(f"{name}: Expected {state_name} of size {expected} ({layout}), "
                                   f"got {tuple(state.shape)}")

    def _checked_input(self, input, hx, packed_sizes: Optional[List[int]]):
        """Every check of a call, in torch.nn's order (so that an input with two faults gets the
        exception torch.nn gives it): input kind and rank, the states' kind and rank, the input's
        dtype and width, the states' shapes, devices, the other dtypes.

        Returns (data [T, B, I] or packed rows, batch, is_batched, states as [L*D, B, *])."""
        name = type(self).__name__

        def rank_error(input):
            layout = "(batch, seq_len, input_size)" if self.batch_first else "(seq_len, batch, input_size)"
            return ValueError(f"{name}: input must be 3-D {layout} or 2-D (seq_len, input_size) for one "
                              f"sequence, got a {input.dim()}-D tensor of shape {tuple(input.shape)}")

        data, is_batched, batch = _sequence_input(name, input, packed_sizes, self.batch_first, rank_error)
        weight_names, weights = self._flat_weights_names, self._flat_weights
        _check_weight_types(name, weight_names, weights)
        states = None if hx is None else self._checked_states(hx, is_batched)
        _check_input_dtype(name, data)
        _check_weight_dtypes(name, weight_names[:1], weights[:1], data)  # torch.nn's check_input
        _check_nonlinearity_dtype(name, self.mode, data)
        self.check_input(data, None if isinstance(input, Tensor) else input.batch_sizes)  # its width check
        names = self._state_names()
        if states is not None:
            self._check_state_shapes(states, names, is_batched, batch)
            for state_name, state in zip(names, states):
                _check_state_device(f"{name}: {state_name}", state, data)
        _check_weight_devices(name, weight_names, weights, data)
        _check_weight_dtypes(name, weight_names, weights, data)
        if states is not None:
            for state_name, state in zip(names, states):
                _check_state_dtype(f"{name}: {state_name}", state, data)
        if not is_batched and states is not None:
            states = tuple(s.unsqueeze(1) for s in states)
        return data, batch, is_batched, states

    peephole = False  # LSTM(peephole=True) sets its own; a converted torch.nn layer has none
    _peephole_names: Sequence[str] = ()
    zoneout = 0.0
    recurrent_dropout = 0.0
    layer_norm = False
    _layer_norm_names: Sequence[Sequence[str]] = ()

    def _add_variants(self, device, dtype, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                      peephole: bool = False, layer_norm: bool = False) -> None:
        """The options beyond torch.nn, checked by the constructor: their parameters come after torch.nn's
        (which are then initialised as torch.nn's from the same seed), peepholes first."""
        if zoneout:
            self.zoneout = zoneout
        if recurrent_dropout:
            self.recurrent_dropout = recurrent_dropout
        directions = [""] + (["_reverse"] if self.bidirectional else [])
        suffixes = [f"_l{layer}{direction}" for layer in range(self.num_layers) for direction in directions]
        if peephole:
            self.peephole = True
            self._peephole_names = _peephole_parameters(self, suffixes, self.hidden_size, device, dtype)
        if layer_norm:
            self.layer_norm = True
            gates = {"LSTM": 4, "GRU": 3}.get(self.mode, 1)
            self._layer_norm_names = _layer_norm_parameters(self, suffixes, gates, self.hidden_size,
                                                            self.mode == "LSTM", device, dtype)

    def _layer_norms(self) -> Optional[List[Tensor]]:
        """A layer-normalized cell's weights per layer and direction, packed as the op takes them
        (through getattr, as _peepholes), or None."""
        if not self.layer_norm:
            return None
        return [torch.cat([getattr(self, name) for name in names]) for names in self._layer_norm_names]

    def _peepholes(self) -> Optional[List[Tensor]]:
        """The peephole weights per layer and direction (through getattr: a parametrization or
        torch.func.functional_call may hold them), or None."""
        return [getattr(self, name) for name in self._peephole_names] if self.peephole else None

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", peephole=True" if self.peephole else "")
                + (f", zoneout={self.zoneout}" if self.zoneout else "")
                + (f", recurrent_dropout={self.recurrent_dropout}" if self.recurrent_dropout else "")
                + (", layer_norm=True" if self.layer_norm else ""))

    def forward(self, input, hx: Optional[_HiddenState] = None):
        if _exports_through_torch_nn():
            if has_variants(self) and not _variants_in_eval_are_torch_nns(self):  # no torch.nn twin: onnx_export.py
                if not functional.onnx_exporting():
                    _refuse_variant_trace(self)
                return onnx_export.variant_layers(self, input, hx)
            if self.proj_size > 0 and torch.onnx.is_in_onnx_export():
                # torch's TorchScript-based exporter refuses it; its torch.export-based one writes an
                # ONNX LSTM that ONNX Runtime rejects (initial_c of the projected width).
                raise NotImplementedError(
                    "fused_rnn: an LSTM with proj_size cannot be exported to ONNX: ONNX's LSTM operator has "
                    "no projection of the hidden state (torch.nn.LSTM with proj_size does not export either)")
            return self._torch_nn_class.forward(self, input, hx)
        self._refresh_flat_weights()
        plain = self._plain_forward(input, hx)
        if plain is not None:
            return plain
        name = type(self).__name__
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = _check_packed(name, *input) if isinstance(input, PackedSequence) else None
        try:
            data, batch, is_batched, states = self._checked_input(input, hx, batch_sizes)
        except _ORDINARY_ERRORS as ours:
            device = input.data.device if isinstance(input, (Tensor, PackedSequence)) else torch.device("cpu")
            raise _as_torch_nn_would(ours, lambda: self._torch_nn_class.forward(self, input, hx), device) from None
        return _sequence_forward(self, input, data, batch, is_batched, states, batch_sizes, out_size, self._run_stack)

    def _run_stack(self, x, batch_sizes, h0, c0):
        return functional.stacked_rnn(
            self.mode, x, batch_sizes, h0, c0, self._flat_weights, self.bias, self.num_layers,
            self.bidirectional, self.dropout, self.training, self.proj_size > 0, self._peepholes(), self.zoneout,
            self.recurrent_dropout, self._layer_norms())

    def _plain_forward(self, input, hx):
        """The common call for the price of a few attribute reads (a short sequence's Python costs
        more than its kernels): a 3-D tensor of the module's width with a step and a row, hx absent
        or of the right kinds and shapes, functional.plain_call. Returns None for any other call,
        which takes _checked_input's checks in torch.nn's order; so does a call the op refuses
        (dtypes and devices are its checks, csrc/layer.cpp and csrc/bindings.cpp), which then
        raises as torch.nn does."""
        if type(input) is not Tensor or input.dim() != 3 or input.size(2) != self.input_size:
            return None
        batch, steps = (input.size(0), input.size(1)) if self.batch_first else (input.size(1), input.size(0))
        if batch == 0 or steps == 0:
            return None
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        shape = (self.num_layers * (2 if self.bidirectional else 1), batch, out_size)
        if hx is None:
            states = None
        elif self.mode == "LSTM":
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h, c = hx
            if (type(h) is not Tensor or type(c) is not Tensor or h.shape != shape
                    or c.shape != shape[:2] + (self.hidden_size,)):
                return None
            states = (h, c)
        else:
            if type(hx) is not Tensor or hx.shape != shape:
                return None
            states = (hx,)
        weights = tuple(self._flat_weights) + tuple(self._peepholes() or ()) + tuple(self._layer_norms() or ())
        if any(w is None for w in weights) or not functional.plain_call((input,) + (states or ()) + weights):
            return None
        try:
            return _sequence_forward(self, input, input, batch, True, states, None, out_size, self._run_stack)
        except _ORDINARY_ERRORS:
            return None


def _sequence_input(name: str, input, packed_sizes: Optional[List[int]], batch_first: bool, rank_error):
    """A layer's input, checked for kind and rank: (data, is_batched, batch), with a single 2-D
    sequence as a batch of one. rank_error(input) is the exception for a Tensor that is neither 2-D
    nor 3-D (torch.nn's layers and torch's quantized ones raise different types)."""
    if isinstance(input, PackedSequence):
        data = input.data
        if data.dim() != 2:
            raise RuntimeError(f"{name}: PackedSequence data must be 2-D (sum(batch_sizes), input_size), "
                               f"got a {data.dim()}-D tensor of shape {tuple(data.shape)}")
        return data, True, packed_sizes[0]
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise rank_error(input)
    is_batched = input.dim() == 3
    batch_dim = 0 if batch_first else 1
    data = input if is_batched else input.unsqueeze(batch_dim)
    if data.size(1 - batch_dim) == 0:
        raise RuntimeError(f"{name}: Expected sequence length to be larger than 0 in RNN, got an "
                           f"input of shape {tuple(input.shape)} with no time steps")
    return data, is_batched, data.size(batch_dim)


def _sequence_forward(module, input, data: Tensor, batch: int, is_batched: bool, states, batch_sizes,
                      out_size: int, run_stack):
    """The forward of a checked call, shared by the float and the int8 layers: the initial states
    (zeros when not given; a PackedSequence's in its sorted order), the input in packed layout,
    run_stack(x, batch_sizes, h0, c0) -> (y, h_n, c_n) over it, and the output and final states in
    the input's layout and order."""
    is_lstm = module.mode == "LSTM"
    num_directions = 2 if module.bidirectional else 1
    is_packed = isinstance(input, PackedSequence)
    if states is None:
        shape = (module.num_layers * num_directions, batch)
        states = (torch.zeros(*shape, out_size, dtype=data.dtype, device=data.device),)
        if is_lstm:
            states += (torch.zeros(*shape, module.hidden_size, dtype=data.dtype, device=data.device),)
    elif is_packed and input.sorted_indices is not None:
        states = tuple(s.index_select(1, input.sorted_indices) for s in states)

    if is_packed:
        x = data
    else:
        time_major = data.transpose(0, 1) if module.batch_first else data
        steps = time_major.size(0)
        x = time_major.reshape(steps * batch, module.input_size)
        batch_sizes = []  # every step has the batch's rows: no per-step list (see functional.py)

    y, h_n, c_n = run_stack(x, batch_sizes, states[0], states[1] if is_lstm else None)

    if is_packed:
        output = PackedSequence(y, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    else:
        output = y.view(steps, batch, num_directions * out_size)
        if module.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if module.batch_first else 1)
    hidden = (h_n, c_n) if is_lstm else h_n
    if not is_batched:
        hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
    return output, module.permute_hidden(hidden, input.unsorted_indices if is_packed else None)


def _check_batch_sizes(name: str, batch_sizes, rows: int) -> None:
    if any(b <= 0 for b in batch_sizes) or any(a < b for a, b in zip(batch_sizes, batch_sizes[1:])):
        raise ValueError(f"{name}: PackedSequence batch_sizes must be positive and non-increasing, "
                         f"got {batch_sizes}")
    if sum(batch_sizes) != rows:
        raise ValueError(f"{name}: PackedSequence batch_sizes sum to {sum(batch_sizes)} but its data "
                         f"has {rows} rows")


class LSTM(_FusedRNNBase):
    """Drop-in for torch.nn.LSTM (same arguments, parameters, outputs), computed by fused kernels.

    peephole (keyword, default False): peephole connections, i = σ(· + p_i ⊙ c_{t-1}),
    f = σ(· + p_f ⊙ c_{t-1}), o = σ(· + p_o ⊙ c_t), with weights weight_peephole_l{k} (and _reverse)
    of 3 * hidden_size (p_i, p_f, p_o) after torch.nn's parameters.
    zoneout (keyword, default 0): the probability z that a unit keeps its previous state, c_t and h_t
    (README: its equations; masks drawn in training, the expectation in eval).
    recurrent_dropout (keyword, default 0): the probability p that a unit of h_{t-1} is dropped from
    the recurrent product, in training, with a mask per sequence drawn once per call (README).
    layer_norm (keyword, default False): layer-normalized projections and cell state, with weights
    ln_ih_weight_l{k}, ln_hh_weight_l{k} (4 * hidden_size, 1), ln_c_weight_l{k} (hidden_size, 1) and
    ln_c_bias_l{k} (hidden_size, 0) (README; CPU only so far)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, peephole: bool = False,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        def checks():
            _check_int_arg("LSTM", "num_layers", num_layers, 1)
            _check_dtype_arg("LSTM", dtype)
            _check_int_arg("LSTM", "proj_size", proj_size, None)  # range: torch.nn's checks

        _checked_constructor(self._torch_nn_class, checks, input_size, hidden_size, num_layers, bias, batch_first,
                             dropout, bidirectional, proj_size, dtype=dtype)
        _check_flag("LSTM", "peephole", peephole)
        _check_flag("LSTM", "layer_norm", layer_norm)
        zoneout = _check_probability("LSTM", "zoneout", zoneout)
        recurrent_dropout = _check_probability("LSTM", "recurrent_dropout", recurrent_dropout)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self._add_variants(device, dtype, zoneout, recurrent_dropout, peephole, layer_norm)

    _torch_nn_class = nn.LSTM  # the twin: its forward is asked of input we reject, and records exports
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNBase):
    """Drop-in for torch.nn.GRU, with torch.nn's equations (b_hn inside the reset gate). zoneout
    (keyword, default 0): as fused_rnn.LSTM's, on h_t. recurrent_dropout (keyword, default 0): as
    fused_rnn.LSTM's (the reset and update gates' product; the mix with h_{t-1} keeps every unit).
    layer_norm (keyword, default False): as fused_rnn.LSTM's, on both projections (3 * hidden_size)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                 layer_norm: bool = False, **kwargs) -> None:
        def checks():
            _refuse_extra_arguments("GRU", kwargs)
            _check_int_arg("GRU", "num_layers", num_layers, 1)
            _check_dtype_arg("GRU", dtype)

        _checked_constructor(self._torch_nn_class, checks, input_size, hidden_size, num_layers, bias, batch_first,
                             dropout, bidirectional, dtype=dtype, **kwargs)
        _check_flag("GRU", "layer_norm", layer_norm)
        zoneout = _check_probability("GRU", "zoneout", zoneout)
        recurrent_dropout = _check_probability("GRU", "recurrent_dropout", recurrent_dropout)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self._add_variants(device, dtype, zoneout, recurrent_dropout, layer_norm=layer_norm)

    _torch_nn_class = nn.GRU


class RNN(_FusedRNNBase):
    """Drop-in for torch.nn.RNN (nonlinearity 'tanh' or 'relu'). zoneout and recurrent_dropout
    (keywords, default 0): as fused_rnn.LSTM's, on h_t; layer_norm (keyword, default False) too, on
    both projections (hidden_size)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
                 zoneout: float = 0.0, recurrent_dropout: float = 0.0, layer_norm: bool = False,
                 **kwargs) -> None:
        def checks():
            _refuse_extra_arguments("RNN", kwargs)
            _elman_mode(nonlinearity)
            _check_int_arg("RNN", "num_layers", num_layers, 1)
            _check_dtype_arg("RNN", dtype)

        _checked_constructor(self._torch_nn_class, checks, input_size, hidden_size, num_layers, nonlinearity, bias,
                             batch_first, dropout, bidirectional, dtype=dtype, **kwargs)
        _check_flag("RNN", "layer_norm", layer_norm)
        zoneout = _check_probability("RNN", "zoneout", zoneout)
        recurrent_dropout = _check_probability("RNN", "recurrent_dropout", recurrent_dropout)
        self.nonlinearity = nonlinearity
        super().__init__(_elman_mode(nonlinearity), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)
        self._add_variants(device, dtype, zoneout, recurrent_dropout, layer_norm=layer_norm)

    _torch_nn_class = nn.RNN


class _FusedCellBase(nn.RNNCellBase):
    """One step of a layer: the same compiled op over a one-step sequence."""

    mode = ""
    peephole = False  # LSTMCell(peephole=True) sets its own
    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        return super().extra_repr() + (", peephole=True" if self.peephole else "")

    def _check_args(self, input_size, hidden_size, bias, dtype, *torch_nn_args) -> None:
        """torch.nn's cells accept zero sizes; negative or non-integer sizes and non-float dtypes get
        a named error here (torch.nn fails inside torch.empty or requires_grad, whose exception
        type and message ours then carries)."""
        def checks():
            _check_int_arg(type(self).__name__, "input_size", input_size, 0)
            _check_int_arg(type(self).__name__, "hidden_size", hidden_size, 0)
            _check_dtype_arg(type(self).__name__, dtype)

        _checked_constructor(self._torch_nn_class, checks, input_size, hidden_size, bias, *torch_nn_args,
                             dtype=dtype)

    def _checked_step_input(self, input, hx, num_states: int):
        """Every check of a call, in torch.nn's order (input rank, states' kinds and ranks, the
        input's width, the states' shapes, then dtypes and devices). Returns (x [B, I], states
        as [B, H] each, or None when hx is None)."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        weight_names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if self.bias else 2]
        weights = [getattr(self, weight_name) for weight_name in weight_names]
        _check_weight_types(name, weight_names, weights)
        mode = self.mode  # RNNCell: its nonlinearity, checked at every call
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        batch = x.size(0)
        names = ("hx[0]", "hx[1]") if num_states == 2 else ("hx",)
        states = None
        if hx is not None:
            states = _split_hx(name, hx, num_states == 2, "(h, c)", "LSTMCell")
            for state_name, state in zip(names, states):
                _check_state_type(f"{name}: {state_name}", state)
            for state_name, state in zip(names, states):
                if state.dim() != input.dim():
                    raise ValueError(f"{name}: {state_name} must be {input.dim()}-D like the input, "
                                     f"got {state.dim()}-D")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")
        if states is not None:
            expected = (batch, self.hidden_size) if is_batched else (self.hidden_size,)
            for state_name, state in zip(names, states):
                if tuple(state.shape) != expected:
                    layout = "batch, hidden_size" if is_batched else "hidden_size"
                    raise RuntimeError(f"{name}: {state_name} must have shape {expected} ({layout}), "
                                       f"got {tuple(state.shape)}")
        _check_input_dtype(name, x)
        _check_nonlinearity_dtype(name, mode, x)
        _check_weight_devices(name, weight_names, weights, x)
        _check_weight_dtypes(name, weight_names, weights, x)
        if states is not None:
            for state_name, state in zip(names, states):
                _check_state_device(f"{name}: {state_name}", state, x)
                _check_state_dtype(f"{name}: {state_name}", state, x)
            states = [state if is_batched else state.unsqueeze(0) for state in states]
        return mode, x, states

    def _plain_step(self, input, hx, num_states: int):
        """The common call, for the price of a few attribute reads (a decoder calls its cell once a
        step, so per-call costs are its speed): a 2-D input of the module's width, hx absent or of
        the right kinds and shapes, functional.plain_call(). Returns None for any other call, which
        takes _step's checks in torch.nn's order. Dtypes and devices are left to the op's own checks
        (csrc/layer.cpp, and csrc/bindings.cpp's for devices): a call it rejects is run again through
        _step's, which raise as torch.nn does."""
        if type(input) is not Tensor or input.dim() != 2:
            return None
        batch, width = input.shape
        if width != self.input_size:
            return None
        shape = (batch, self.hidden_size)
        if hx is None:
            h = input.new_zeros(shape)
            c = input.new_zeros(shape) if num_states == 2 else None
        elif num_states == 2:
            if type(hx) is not tuple or len(hx) != 2:
                return None
            h, c = hx
            if type(h) is not Tensor or type(c) is not Tensor or h.shape != shape or c.shape != shape:
                return None
        else:
            h, c = hx, None
            if type(h) is not Tensor or h.shape != shape:
                return None
        weights = self._parameters  # not four nn.Module.__getattr__ calls
        try:  # a parametrized or hooked weight is no longer there (KeyError): _step's getattr finds it
            operands = (input, h, c, weights["weight_ih"], weights["weight_hh"], weights["bias_ih"],
                        weights["bias_hh"])
        except KeyError:
            return None
        if self.bias and (operands[5] is None or operands[6] is None):  # a bias set to None: torch.nn refuses it
            return None
        peephole = weights.get("weight_peephole") if self.peephole else None
        if self.peephole and peephole is None:  # parametrized or hooked: _step's getattr finds it
            return None
        if not functional.plain_call(operands + (peephole,)):
            return None
        try:
            h_1, c_1 = functional.step(functional.CELL_IDS[self.mode], *operands, peephole)
        except _ORDINARY_ERRORS:
            return None
        return (h_1, c_1) if num_states == 2 else h_1

    def _step(self, input: Tensor, hx, num_states: int):
        plain = self._plain_step(input, hx, num_states)
        if plain is not None:
            return plain
        if _exports_through_torch_nn():
            if self.peephole:
                if not functional.onnx_exporting():
                    _refuse_variant_trace(self)
                return onnx_export.peephole_lstm_cell(self, input, hx)
            return self._torch_nn_class.forward(self, input, hx)
        try:
            mode, x, states = self._checked_step_input(input, hx, num_states)
        except _ORDINARY_ERRORS as ours:
            device = input.device if isinstance(input, Tensor) else torch.device("cpu")
            raise _as_torch_nn_would(ours, lambda: self._torch_nn_class.forward(self, input, hx), device) from None
        if states is None:
            states = [torch.zeros(x.size(0), self.hidden_size, dtype=x.dtype, device=x.device)
                      for _ in range(num_states)]
        h, _, c = functional.layer(
            functional.CELL_IDS[mode], x, [], False, states[0],
            states[1] if num_states == 2 else None, self.weight_ih, self.weight_hh,
            self.bias_ih, self.bias_hh, None, self.weight_peephole if self.peephole else None)
        if input.dim() == 1:
            h, c = h.squeeze(0), c.squeeze(0)
        return (h, c) if num_states == 2 else h


class LSTMCell(_FusedCellBase):
    """Drop-in for torch.nn.LSTMCell. peephole (keyword, default False): as fused_rnn.LSTM's, with
    one weight_peephole of 3 * hidden_size."""

    mode = "LSTM"
    _torch_nn_class = nn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 peephole: bool = False) -> None:
        self._check_args(input_size, hidden_size, bias, dtype)
        _check_flag("LSTMCell", "peephole", peephole)
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        if peephole:  # after torch.nn's parameters, as LSTM's
            self.peephole = True
            _peephole_parameters(self, [""], hidden_size, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx, 2)


class GRUCell(_FusedCellBase):
    """Drop-in for torch.nn.GRUCell."""

    mode = "GRU"
    _torch_nn_class = nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        self._check_args(input_size, hidden_size, bias, dtype)
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


class RNNCell(_FusedCellBase):
    """Drop-in for torch.nn.RNNCell (nonlinearity 'tanh' or 'relu')."""

    _torch_nn_class = nn.RNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        _elman_mode(nonlinearity)  # torch.nn accepts any string here and fails at the first call
        self._check_args(input_size, hidden_size, bias, dtype, nonlinearity)
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    @property
    def mode(self) -> str:
        # Read at every call: an attribute changed after construction is honoured, or rejected.
        return _elman_mode(self.nonlinearity, "RNNCell: ")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


_WHAT_DIFFERS = """
    What differs from torch.nn (fused_rnn):
        Computed by fused_rnn's kernels, with torch.nn's parameters, initialisation, inputs,
        outputs and exceptions (torch.nn's message first, then ours). Devices and dtypes: on the
        CPU float32, float64, complex64 and complex128, and float16/bfloat16 with their state and
        gate math in float32; on CUDA float32, float64, float16 and bfloat16 (tensor cores for the
        half types). Deterministic: no atomics, the same inputs give bitwise the same outputs and
        gradients, on the CPU and on CUDA. torch.func (jacrev, jacfwd, jvp, grad, hessian, vmap),
        forward-mode AD and double backward work (the derivatives beyond a plain backward are
        computed step by step with torch's own cell formulas; not inside torch.compile).
        torch.compile(fullgraph=True) holds the compiled ops. On the CPU, large buffers come from
        a cache of freed blocks (fused_rnn.empty_cache, FUSED_RNN_CPU_CACHE_MB). Export:
        torch.export holds our ops (with dynamic batch and sequence length; loading the .pt2 needs
        `import fused_rnn`); torch.onnx.export and torch.jit.trace record torch.nn's ops with the
        same parameters (ONNX's LSTM, GRU and RNN operators); torch.jit.script is refused
        (fused_rnn.convert(model, to="torch") turns the layers back into torch.nn's).
        flatten_parameters() is a no-op (no cuDNN weight buffer).
"""


def _torch_nn_docstring(cls) -> str:
    """torch.nn's docstring for cls's twin (arguments, inputs, outputs, equations), its examples
    on fused_rnn's class, then what differs."""
    doc = cls._torch_nn_class.__doc__ or ""
    name = cls._torch_nn_class.__name__
    return (cls.__doc__.strip() + "\n\n    " + doc.strip().replace(f"nn.{name}(", f"fused_rnn.{name}(")
            + "\n" + _WHAT_DIFFERS)


for _cls in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell):
    _cls.__doc__ = _torch_nn_docstring(_cls)
