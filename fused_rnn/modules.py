"""Drop-in modules for torch.nn.LSTM / GRU / RNN and their cells.

The layers subclass nn.RNNBase and the cells nn.RNNCellBase, so parameter names, shapes, order,
initialisation, repr, state_dict and the constructor checks are torch.nn's own. What differs is the
forward: it puts the input in packed layout and runs functional.stacked_rnn over our compiled ops.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional

_HiddenState = Union[Tensor, Tuple[Tensor, Tensor]]


def _check_state(name: str, state, input: Tensor) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if state.dtype != input.dtype:
        raise ValueError(f"{name} has dtype {state.dtype} but the input has dtype {input.dtype}")
    if state.device != input.device:
        raise ValueError(f"{name} is on {state.device} but the input is on {input.device}")


class _FusedRNNBase(nn.RNNBase):
    """The forward shared by LSTM, GRU and RNN: torch.nn's argument handling, our kernels."""

    def flatten_parameters(self) -> None:
        """A no-op, kept for torch.nn's interface: our kernels read each weight where it lies, so
        there is no cuDNN weight buffer to pack (nn.RNNBase would pack one on every .to(cuda))."""

    def _state_names(self):
        return ("h_0", "c_0") if self.mode == "LSTM" else ("hx",)

    def _normalize_hx(self, hx, input: Tensor, is_batched: bool, sorted_indices):
        """hx as given -> a tuple of [L*D, B, *] tensors in sorted order, checked."""
        name = type(self).__name__
        names = self._state_names()
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors, "
                                f"got {type(hx).__name__}")
            states = tuple(hx)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            states = (hx,)
        for state_name, state in zip(names, states):
            _check_state(f"{name}: {state_name}", state, input)
            want = 3 if is_batched else 2
            if state.dim() != want:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"{name}: for {kind} input, {state_name} should be {want}-D "
                                   f"but got a {state.dim()}-D tensor")
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
            batch = int(batch_sizes_t[0]) if batch_sizes_t.numel() > 0 else 0
        elif isinstance(input, Tensor):
            is_packed = False
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            batch_sizes_t = sorted_indices = unsorted_indices = None
            batch = data.size(batch_dim)
        else:
            raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")

        if hx is None:
            shape = (self.num_layers * num_directions, batch)
            states = (torch.zeros(*shape, out_size, dtype=data.dtype, device=data.device),)
            if is_lstm:
                states += (torch.zeros(*shape, self.hidden_size, dtype=data.dtype, device=data.device),)
        else:
            states = self._normalize_hx(hx, data, is_batched, sorted_indices)
        self.check_forward_args(data, states if is_lstm else states[0], batch_sizes_t)
        if not data.is_floating_point() and not data.is_complex():
            raise TypeError(f"{name}: input must be a floating point or complex tensor, got {data.dtype}")

        if is_packed:
            x, batch_sizes = data, batch_sizes_t.tolist()
            _check_batch_sizes(name, batch_sizes, x.size(0))
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
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


class RNN(_FusedRNNBase):
    """Drop-in for torch.nn.RNN (nonlinearity 'tanh' or 'relu')."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None) -> None:
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)


class _FusedCellBase(nn.RNNCellBase):
    """One step of a layer: the same compiled op over a one-step sequence."""

    mode = ""

    def _step(self, input: Tensor, hx, num_states: int):
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.dtype != self.weight_ih.dtype:
            raise ValueError(f"{name}: input dtype ({input.dtype}) does not match weight dtype "
                             f"({self.weight_ih.dtype})")
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
            if num_states == 2 and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
                raise TypeError(f"{name}: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}")
            states = list(hx) if num_states == 2 else [hx]
            for i, (state_name, state) in enumerate(zip(names, states)):
                _check_state(f"{name}: {state_name}", state, x)
                if state.dim() != input.dim():
                    raise ValueError(f"{name}: {state_name} must be {input.dim()}-D like the input, "
                                     f"got {state.dim()}-D")
                state = state if is_batched else state.unsqueeze(0)
                if tuple(state.shape) != (batch, self.hidden_size):
                    raise RuntimeError(f"{name}: {state_name} must have shape {(batch, self.hidden_size)}, "
                                       f"got {tuple(state.shape)}")
                states[i] = state
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
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        return self._step(input, hx, 2)


class GRUCell(_FusedCellBase):
    """Drop-in for torch.nn.GRUCell."""

    mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)


class RNNCell(_FusedCellBase):
    """Drop-in for torch.nn.RNNCell (nonlinearity 'tanh' or 'relu')."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    @property
    def mode(self) -> str:
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._step(input, hx, 1)
