"""int8 inference: fused_rnn's layers under torch's dynamic quantization.

`torch.ao.quantization.quantize_dynamic(model)` turns each fused_rnn.LSTM / GRU (or torch.nn's, see
below) into fused_rnn.quantized.LSTM / GRU: a subclass of torch's own dynamically quantized module
(torch.ao.nn.quantized.dynamic.LSTM / GRU) that keeps torch's weight storage (packed int8 weights and
float biases, so state_dict, pickling and .to() are torch's, and state_dicts move between the two
classes) and runs fused_rnn's int8 kernel instead of torch.quantized_lstm / quantized_gru:
weights int8 with a scale per output row, x and h_{t-1} quantized row by row at every step, int32
sums, the gate math in float32 (csrc/cpu/quantized_cpu.cpp).

How quantize_dynamic reaches them: the fused classes are registered in torch's default dynamic
mapping (so a qconfig_spec that names them works), and quantize_dynamic itself is wrapped so that a
spec naming torch.nn.LSTM / GRU (or the default spec) also covers their fused twins, which it
would otherwise leave in float32 without a word.
"""
import functools
import sys
import warnings

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter
from torch.ao.quantization import quantization_mappings
from torch.nn.utils.rnn import PackedSequence

from . import functional, modules
from ._ops import CELL_IDS, GATES

# What a weight row is scaled to: symmetric int8, the full range but -128 (so that -w quantizes
# to -q).
_WEIGHT_MAX = 127


def _int8_per_row(weight: Tensor) -> Tensor:
    """weight [rows, K] (float) as a per-row symmetric qint8 tensor (torch.quantize_per_channel)."""
    w = weight.detach().float()
    scale = torch.ones(w.size(0))
    if w.numel():
        scale = (w.abs().amax(dim=1) / _WEIGHT_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.quantize_per_channel(w, scale.double(), torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)


def _kernel_weights(qweight: Tensor, gates: int):
    """A quantized weight as the kernel takes it: (int8 values in the kernel's panels, float32 scale
    per row, int32 row sums). Weights with zero points (another quantizer's) are quantized again,
    per row."""
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero = qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
    else:
        scale = torch.full((qweight.size(0),), qweight.q_scale(), dtype=torch.double)
        zero = torch.full((qweight.size(0),), qweight.q_zero_point(), dtype=torch.long)
    if bool((zero != 0).any()):
        return _kernel_weights(_int8_per_row(qweight.dequantize()), gates)
    values = qweight.int_repr().contiguous()
    return (torch.ops.fused_rnn.quantized_pack_weight(values, gates), scale.float().contiguous(),
            values.sum(dim=1, dtype=torch.int32))


class _FusedQuantizedRNN:
    """The forward of fused_rnn's int8 layers; the rest (construction, weights, state_dict) is
    torch's dynamically quantized RNNBase, which the concrete classes also subclass."""

    _torch_class = None  # torch's dynamically quantized twin
    _float_classes = ()  # the float layers from_float takes

    def _get_name(self):
        return "FusedDynamicQuantized" + self.mode

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kernel_cache", None)  # rebuilt from the packed weights on the first call
        return state

    def _layer_weights(self):
        """Per layer and direction: (w_ih panels, scale, row sums, w_hh panels, scale, row sums, b_ih,
        b_hh), from torch's packed weights, kept until they are replaced (load_state_dict,
        set_weight_bias)."""
        params = tuple(m.param for m in self._all_weight_values)
        cache = getattr(self, "_kernel_cache", None)
        if cache is not None and len(cache[0]) == len(params) and all(a is b for a, b in zip(cache[0], params)):
            return cache[1]
        stored = self._weight_bias()
        weights, biases = stored["weight"], stored["bias"]
        layers, gates = [], GATES[CELL_IDS[self.mode]]
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                w_ih = _kernel_weights(weights[f"weight_ih_l{layer}{suffix}"], gates)
                w_hh = _kernel_weights(weights[f"weight_hh_l{layer}{suffix}"], gates)
                b_ih, b_hh = biases[f"bias_ih_l{layer}{suffix}"], biases[f"bias_hh_l{layer}{suffix}"]
                layers.append((*w_ih, *w_hh, None if b_ih is None else b_ih.detach().float().contiguous(),
                               None if b_hh is None else b_hh.detach().float().contiguous()))
        self._kernel_cache = (params, layers)
        return layers

    def _checked_input(self, input, hx, packed_sizes):
        """Our checks, in torch.nn's order. Unlike torch's quantized layers, a 2-D input is one
        sequence (as torch.nn's float layers take it). Returns (data, batch, is_batched, states)."""
        name = self._get_name()
        data, is_batched, batch = modules._sequence_input(
            name, input, packed_sizes, self.batch_first,
            lambda input: RuntimeError(f"{name}: input must have 3 dimensions (or 2 for one sequence), "
                                       f"got {input.dim()}"))
        if data.dtype != torch.float32:
            raise RuntimeError(f"{name}: expected scalar type Float but found {data.dtype}: the int8 layers take "
                               f"float32 input (torch's dynamically quantized layers do too)")
        if data.device.type != "cpu":
            raise RuntimeError(f"{name}: the int8 layers run on the CPU, got an input on {data.device} "
                               f"(quantize a CPU model; on CUDA use the float layers with float16 or bfloat16)")
        if data.size(-1) != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {data.size(-1)}")
        states = None
        if hx is not None:
            names = ("hx[0]", "hx[1]") if self.mode == "LSTM" else ("hx",)
            states = modules._split_hx(name, hx, self.mode == "LSTM", "(h_0, c_0)", "LSTM")
            layers = self.num_layers * (2 if self.bidirectional else 1)
            expected = (layers, batch, self.hidden_size) if is_batched else (layers, self.hidden_size)
            for state_name, state in zip(names, states):
                modules._check_state_type(f"{name}: {state_name}", state)
                if tuple(state.shape) != expected:
                    raise RuntimeError(f"{name}: Expected {state_name} size {expected}, got {list(state.shape)}")
                if state.dtype != torch.float32 or state.device != data.device:
                    raise RuntimeError(f"{name}: {state_name} must be a float32 tensor on {data.device}, got "
                                       f"{state.dtype} on {state.device}")
            if not is_batched:
                states = tuple(s.unsqueeze(1) for s in states)
        return data, batch, is_batched, states

    def forward(self, input, hx=None):
        if modules._exports_through_torch_nn():
            return self._torch_class.forward(self, input, hx)  # records torch's quantized ops
        name = self._get_name()
        batch_sizes = modules._check_packed(name, *input) if isinstance(input, PackedSequence) else None
        try:
            data, batch, is_batched, states = self._checked_input(input, hx, batch_sizes)
        except modules._ORDINARY_ERRORS as ours:
            device = input.data.device if isinstance(input, (Tensor, PackedSequence)) else torch.device("cpu")
            raise modules._as_torch_nn_would(ours, lambda: self._torch_class.forward(self, input, hx),
                                             device) from None
        weights = self._layer_weights()
        cell = CELL_IDS[self.mode]

        def run_stack(x, batch_sizes, h0, c0):
            def run_layer(k, layer_input, reverse, h, c):
                return torch.ops.fused_rnn.quantized_layer_forward(cell, layer_input, batch_sizes, reverse, h, c,
                                                                   *weights[k])
            # Inference only: no gradient flows through the int8 path (nor through torch's).
            with torch.no_grad():
                return functional.stack_layers(run_layer, x.detach(), h0.detach(),
                                               None if c0 is None else c0.detach(), self.num_layers,
                                               self.bidirectional, 0.0)

        return modules._sequence_forward(self, input, data, batch, is_batched, states, batch_sizes,
                                         self.hidden_size, run_stack)

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant=False):
        """The int8 layer of a float LSTM / GRU (fused_rnn's or torch.nn's), as quantize_dynamic
        makes it: weights quantized per output row (whatever weight observer the qconfig names; its
        dtype is honoured: qint8 here, float16 gives torch's float16 module)."""
        if type(mod) not in cls._float_classes:
            raise TypeError(f"{cls.__name__}.from_float takes one of "
                            f"{[c.__module__ + '.' + c.__name__ for c in cls._float_classes]}, "
                            f"got {type(mod).__name__}")
        _refuse_variants(mod)
        qconfig = getattr(mod, "qconfig", None)
        dtype = qconfig.weight().dtype if qconfig is not None and qconfig.weight is not None else torch.qint8
        if dtype == torch.float16:
            return cls._torch_class.from_float(_as_torch_twin(mod))
        if dtype != torch.qint8:
            raise RuntimeError(f"Unsupported dtype for dynamic RNN quantization: {dtype} "
                               f"(fused_rnn's int8 layers take torch.qint8, or torch.float16 for torch's own)")
        if getattr(mod, "proj_size", 0) > 0:
            raise NotImplementedError(
                "fused_rnn: an LSTM with proj_size cannot be dynamically quantized: torch's quantized LSTM has "
                "no projection (it would drop weight_hr), and neither has fused_rnn's int8 LSTM; leave this layer "
                "in float32 (leave its type out of quantize_dynamic's qconfig_spec)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's constructor warns of its placeholder weights
            qmod = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first, mod.dropout,
                       mod.bidirectional, dtype=torch.qint8)
        weight_bias = {}
        for name, param in mod.named_parameters():
            if name.startswith("weight_"):
                weight_bias[name] = _int8_per_row(param)
            elif name.startswith("bias_"):
                weight_bias[name] = param.detach().float().clone()
        if not mod.bias:  # torch's storage always has biases: zeros, which add nothing
            for name in list(weight_bias):
                weight_bias[name.replace("weight_", "bias_")] = torch.zeros(weight_bias[name].size(0))
        qmod.set_weight_bias(weight_bias)
        return qmod


def _refuse_variants(mod):
    """Neither fused_rnn's int8 layers nor torch's quantized ones have peephole connections, zoneout,
    recurrent dropout or layer norm: quantizing such a layer would drop them."""
    if modules.has_variants(mod):
        raise NotImplementedError(
            f"fused_rnn: a {type(mod).__name__} with peephole connections, zoneout, recurrent dropout or layer norm "
            f"cannot be dynamically "
            f"quantized: neither fused_rnn's int8 layers nor torch's quantized ones have them (they would be "
            f"dropped); leave this layer in float32 (leave its type out of quantize_dynamic's qconfig_spec)")


def _as_torch_twin(mod):
    """A fused layer or cell as its torch.nn twin (a shallow copy: the same parameters), for torch's
    own from_float, which takes torch.nn's exact classes only; a torch.nn module as it is."""
    _refuse_variants(mod)
    torch_class = getattr(mod, "_torch_nn_class", None)
    if torch_class is None or type(mod) is torch_class:
        return mod
    twin = torch_class.__new__(torch_class)
    twin.__dict__.update(mod.__dict__)
    return twin


class LSTM(_FusedQuantizedRNN, nnqd.LSTM):
    """torch.ao.nn.quantized.dynamic.LSTM (same constructor, weights, state_dict), computed by
    fused_rnn's int8 kernel; also takes one unbatched sequence, as torch.nn.LSTM does."""

    _torch_class = nnqd.LSTM
    _float_classes = (nn.LSTM, modules.LSTM)


class GRU(_FusedQuantizedRNN, nnqd.GRU):
    """torch.ao.nn.quantized.dynamic.GRU computed by fused_rnn's int8 kernel (see LSTM)."""

    _torch_class = nnqd.GRU
    _float_classes = (nn.GRU, modules.GRU)


# quantize_dynamic's reach (module docstring). The fused cells have no int8 kernel: they become
# torch's dynamically quantized cells, as torch.nn's do.
_QUANTIZED = {modules.LSTM: LSTM, modules.GRU: GRU}
_FUSED_TWINS = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.LSTMCell: modules.LSTMCell,
                nn.GRUCell: modules.GRUCell, nn.RNNCell: modules.RNNCell}


class _TorchCellFromFused:
    """from_float for a fused cell: torch's dynamically quantized cell of its torch.nn twin."""

    def __init__(self, torch_quantized_cell):
        self.torch_quantized_cell = torch_quantized_cell

    def from_float(self, mod, use_precomputed_fake_quant=False):
        return self.torch_quantized_cell.from_float(_as_torch_twin(mod))


_CELLS = {modules.LSTMCell: _TorchCellFromFused(nnqd.LSTMCell), modules.GRUCell: _TorchCellFromFused(nnqd.GRUCell),
          modules.RNNCell: _TorchCellFromFused(nnqd.RNNCell)}


def _register_mappings():
    mapping = quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS
    mapping.update(_QUANTIZED)
    mapping.update(_CELLS)


def _with_fused_twins(qconfig_spec, dtype):
    """qconfig_spec with each torch.nn recurrent type's fused twin given the same qconfig; None (the
    default) is spelt out as torch does for qint8 and float16, twins included."""
    if qconfig_spec is None:
        if dtype not in (torch.qint8, torch.float16):
            return None
        qconfig_spec = {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.RNNCell, nn.GRUCell}
    if isinstance(qconfig_spec, set):
        return qconfig_spec | {_FUSED_TWINS[t] for t in qconfig_spec if t in _FUSED_TWINS}
    if isinstance(qconfig_spec, dict):
        extended = dict(qconfig_spec)
        for torch_type, fused_type in _FUSED_TWINS.items():
            if torch_type in qconfig_spec and fused_type not in qconfig_spec:
                extended[fused_type] = qconfig_spec[torch_type]
        return extended
    return qconfig_spec


def _wrap_quantize_dynamic():
    """torch.ao.quantization.quantize_dynamic, with the spec extended to the fused twins and our
    classes added to a mapping the caller passes; everything else is torch's."""
    import torch.ao.quantization as ao_quantization

    ao_quantize = sys.modules["torch.ao.quantization.quantize"]  # the package's `quantize` is a function
    original = ao_quantize.quantize_dynamic
    if getattr(original, "_fused_rnn_wrapped", False):
        return

    @functools.wraps(original)
    def quantize_dynamic(model, qconfig_spec=None, dtype=torch.qint8, mapping=None, inplace=False):
        if mapping is not None:
            mapping = {**_QUANTIZED, **_CELLS, **mapping}
        return original(model, _with_fused_twins(qconfig_spec, dtype), dtype, mapping, inplace)

    quantize_dynamic._fused_rnn_wrapped = True
    for module in (ao_quantize, ao_quantization):
        module.quantize_dynamic = quantize_dynamic
    # The deprecated alias package, where it is loaded already (else it imports the wrapper).
    for legacy_name in ("torch.quantization", "torch.quantization.quantize"):
        legacy = sys.modules.get(legacy_name)
        if legacy is not None and getattr(legacy, "quantize_dynamic", None) is original:
            legacy.quantize_dynamic = quantize_dynamic


_register_mappings()
_wrap_quantize_dynamic()
