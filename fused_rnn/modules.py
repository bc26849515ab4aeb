"""Drop-in modules for torch.nn.LSTM / GRU / RNN and their cells.

The layers subclass nn.RNNBase and the cells nn.RNNCellBase, so parameter names, shapes, order,
initialisation, repr, state_dict and the constructor checks are torch.nn's own. What differs is the
forward: it puts the input in packed layout and runs functional.stacked_rnn over our compiled ops.
"""
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional

_HiddenState = Union[Tensor, Tuple[Tensor, Tensor]]


def _autocast_casts(input: Tensor) -> bool:
    """Under autocast, functional.layer casts input, states and weights itself, so their dtypes may
    differ (a bfloat16 activation into float32 weights), as torch.nn's layers allow there."""
    return (input.is_floating_point() and input.dtype != torch.float64
            and torch.amp.is_autocast_available(input.device.type)
            and torch.is_autocast_enabled(input.device.type))


def _check_state(name: str, state, input: Tensor) -> None:
    # RuntimeError for dtype and device, as torch.nn raises for the same hx
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if state.dtype != input.dtype and not _autocast_casts(input):
        raise RuntimeError(f"{name} has dtype {state.dtype} but the input has dtype {input.dtype}; "
                           f"expected the input's dtype")
    if state.device != input.device:
        raise RuntimeError(f"{name} is on {state.device} but the input is on {input.device}; "
                           f"expected the input's device")


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


def _check_weights(name: str, weight_names: Sequence[str], weights: Sequence[Optional[Tensor]],
                   input: Tensor) -> None:
    """Every parameter a Tensor on the input's device with the input's dtype, named when it is not."""
    for weight_name, weight in zip(weight_names, weights):
        if not isinstance(weight, Tensor):
            raise TypeError(f"{name}: parameter {weight_name} must be a Tensor, got {type(weight).__name__}")
        if weight.device != input.device:
            raise RuntimeError(f"{name}: the input is on {input.device} but parameter {weight_name} is on "
                               f"{weight.device}; expected them on one device (move the input or the module "
                               f"with .to(device))")
        if weight.dtype != input.dtype and not _autocast_casts(input):
            raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype "
                             f"({weight.dtype}) of parameter {weight_name}; expected one dtype for the "
                             f"input and every parameter")


def _check_packed(name: str, data, batch_sizes, sorted_indices, unsorted_indices) -> List[int]:
    """A PackedSequence's parts, checked (batch_sizes is on the CPU); returns batch_sizes as a list."""
    if not isinstance(data, Tensor):
        raise TypeError(f"{name}: PackedSequence data must be a Tensor, got {type(data).__name__}")
    if data.dim() != 2:
        raise ValueError(f"{name}: PackedSequence data must be 2-D (sum(batch_sizes), input_size), "
                         f"got a {data.dim()}-D tensor of shape {tuple(data.shape)}")
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


class _FusedRNNBase(nn.RNNBase):
    """The forward shared by LSTM, GRU and RNN: torch.nn's argument handling, our kernels."""

    def flatten_parameters(self) -> None:
        """A no-op, kept for torch.nn's interface: our kernels read each weight where it lies, so
        there is no cuDNN weight buffer to pack (nn.RNNBase would pack one on every .to(cuda))."""

    def _state_names(self):
        return ("h_0", "c_0") if self.mode == "LSTM" else ("hx",)

    def _normalize_hx(self, hx, input: Tensor, is_batched: bool, sorted_indices, batch: Optional[int] = None):
        """hx as given -> a tuple of [L*D, B, *] tensors in sorted order, checked (shapes too when
        `batch` is given)."""
        name = type(self).__name__
        names = self._state_names()
        states = _split_hx(name, hx, self.mode == "LSTM", "(h_0, c_0)", "LSTM")
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        layers = self.num_layers * (2 if self.bidirectional else 1)
        for state_name, state in zip(names, states):
            _check_state(f"{name}: {state_name}", state, input)
            want = 3 if is_batched else 2
            if state.dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"{name}: for {kind} input, {state_name} should be {want}-D "
                                   f"but got a {state.dim()}-D tensor")
            if batch is not None:
                width, width_name = ((self.hidden_size, "hidden_size") if state_name == "c_0" else
                                     (out_size, "proj_size" if self.proj_size > 0 else "hidden_size"))
                expected = (layers, batch, width) if is_batched else (layers, width)
                if tuple(state.shape) != expected:
                    layout = ("num_layers * num_directions, " + ("batch, " if is_batched else "")
                              + width_name)
                    raise RuntimeError(f"{name}: Expected {state_name} of size {expected} ({layout}), "
                                       f"got {tuple(state.shape)}")
        if not is_batched:
            states = tuple(s.unsqueeze(1) for s in states)
        if sorted_indices is not None:
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        return states

    def forward(self, input, hx: Optional[_HiddenState] = None):
        self._update_flat_weights()
        name = type(self).__name__
        is_lstm = self.mode == "LSTM"
        num_directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size

        if isinstance(input, PackedSequence):
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            is_batched, is_packed = True, True
            batch_sizes = _check_packed(name, data, batch_sizes_t, sorted_indices, unsorted_indices)
            batch = batch_sizes[0]
        elif isinstance(input, Tensor):
            is_packed = False
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes_t = sorted_indices = unsorted_indices = None
            batch = data.size(batch_dim)
            if data.size(1 - batch_dim) == 0:
                raise RuntimeError(f"{name}: Expected sequence length to be larger than 0 in RNN, got an "
                                   f"input of shape {tuple(input.shape)} with no time steps")
        else:
            raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        _check_input_dtype(name, data)
        _check_weights(name, self._flat_weights_names, self._flat_weights, data)

        if hx is None:
            shape = (self.num_layers * num_directions, batch)
            states = (torch.zeros(*shape, out_size, dtype=data.dtype, device=data.device),)
            if is_lstm:
                states += (torch.zeros(*shape, self.hidden_size, dtype=data.dtype, device=data.device),)
        else:
            states = self._normalize_hx(hx, data, is_batched, sorted_indices, batch)
        self.check_forward_args(data, states if is_lstm else states[0], batch_sizes_t)

        if is_packed:
            x = data
        else:
            time_major = data.transpose(0, 1) if self.batch_first else data
            steps = time_major.size(0)
            x = time_major.reshape(steps * batch, self.input_size)
            batch_sizes = [batch] * steps

        y, h_n, c_n = functional.stacked_rnn(
            self.mode, x, batch_sizes, states[0], states[1] if is_lstm else None, self._flat_weights,
            self.bias, self.num_layers, self.bidirectional, self.dropout, self.training,
            self.proj_size > 0)

        if is_packed:
            output = PackedSequence(y, batch_sizes_t, sorted_indices, unsorted_indices)
        else:
            output = y.view(steps, batch, num_directions * out_size)
            if self.batch_first:
                output = output.transpose(0, 1)
            if not is_batched:
                output = output.squeeze(batch_dim)
        hidden = (h_n, c_n) if is_lstm else h_n
        if not is_batched:
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


def _check_batch_sizes(name: str, batch_sizes, rows: int) -> None:
    if any(b <= 0 for b in batch_sizes) or any(a < b for a, b in zip(batch_sizes, batch_sizes[1:])):
        raise ValueError(f"{name}: PackedSequence batch_sizes must be positive and non-increasing, "
                         f"got {batch_sizes}")
    if sum(batch_sizes) != rows:
        raise ValueError(f"{name}: PackedSequence batch_sizes sum to {sum(batch_sizes)} but its data "
                         f"has {rows} rows")


class LSTM(_FusedRNNBase):
    """Drop-in for torch.nn.LSTM (same arguments, parameters, outputs), computed by fused kernels."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None) -> None:
        _check_int_arg("LSTM", "num_layers", num_layers, 1)
        _check_dtype_arg("LSTM", dtype)
        _check_int_arg("LSTM", "proj_size", proj_size, None)  # range: torch.nn's checks
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class GRU(_FusedRNNBase):
    """Drop-in for torch.nn.GRU, with torch.nn's equations (b_hn inside the reset gate)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None) -> None:
        _check_int_arg("GRU", "num_layers", num_layers, 1)
        _check_dtype_arg("GRU", dtype)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class RNN(_FusedRNNBase):
    """Drop-in for torch.nn.RNN (nonlinearity 'tanh' or 'relu')."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None) -> None:
        mode = _elman_mode(nonlinearity)
        _check_int_arg("RNN", "num_layers", num_layers, 1)
        _check_dtype_arg("RNN", dtype)
        self.nonlinearity = nonlinearity
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)


class _FusedCellBase(nn.RNNCellBase):
    """One step of a layer: the same compiled op over a one-step sequence."""

    mode = ""

    def _check_args(self, input_size, hidden_size, dtype) -> None:
        """torch.nn's cells accept zero sizes; negative or non-integer sizes and non-float dtypes get
        a named error here (torch.nn fails inside torch.empty or requires_grad)."""
        _check_int_arg(type(self).__name__, "input_size", input_size, 0)
        _check_int_arg(type(self).__name__, "hidden_size", hidden_size, 0)
        _check_dtype_arg(type(self).__name__, dtype)

    def _step(self, input: Tensor, hx, num_states: int):
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        _check_input_dtype(name, input)
        _check_weights(name, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                       (self.weight_ih, self.weight_hh) + ((self.bias_ih, self.bias_hh) if self.bias else ()),
                       input)
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        batch = x.size(0)
        names = ("hx[0]", "hx[1]") if num_states == 2 else ("hx",)
        if hx is None:
            states = [torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
                      for _ in range(num_states)]
        else:
            states = list(_split_hx(name, hx, num_states == 2, "(h, c)", "LSTMCell"))
            for i, (state_name, state) in enumerate(zip(names, states)):
                _check_state(f"{name}: {state_name}", state, x)
                if state.dim() != input.dim():
                    raise ValueError(f"{name}: {state_name} must be {input.dim()}-D like the input, "
                                     f"got {state.dim()}-D")
                expected = (batch, self.hidden_size) if is_batched else (self.hidden_size,)
                if tuple(state.shape) != expected:
                    layout = "batch, hidden_size" if is_batched else "hidden_size"
                    raise RuntimeError(f"{name}: {state_name} must have shape {expected} ({layout}), "
                                       f"got {tuple(state.shape)}")
                states[i] = state if is_batched else state.unsqueeze(0)
        h, _, c = functional.layer(
            functional.CELL_IDS[self.mode], x, [batch], False, states[0],
            states[1] if num_states == 2 else None, self.weight_ih, self.weight_hh,
            self.bias_ih, self.bias_hh, None)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return (h, c) if num_states == 2 else h


class LSTMCell(_FusedCellBase):
    """Drop-in for torch.nn.LSTMCell."""

    mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        self._check_args(input_size, hidden_size, dtype)
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx, 2)


class GRUCell(_FusedCellBase):
    """Drop-in for torch.nn.GRUCell."""

    mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        self._check_args(input_size, hidden_size, dtype)
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


class RNNCell(_FusedCellBase):
    """Drop-in for torch.nn.RNNCell (nonlinearity 'tanh' or 'relu')."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        _elman_mode(nonlinearity)
        self._check_args(input_size, hidden_size, dtype)
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    @property
    def mode(self) -> str:
        # Read at every call: an attribute changed after construction is honoured, or rejected.
        return _elman_mode(self.nonlinearity, "RNNCell: ")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)
