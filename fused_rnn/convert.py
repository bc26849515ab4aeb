"""Swap torch.nn's recurrent layers in an existing model for fused_rnn's, and back (for export)."""
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from . import modules

_TO_FUSED = {
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNN: modules.RNN,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
    nn.RNNCell: modules.RNNCell,
}


def _twins(to: str):
    from . import quantized  # imported here: quantized imports this package's modules

    pairs = dict(_TO_FUSED)
    pairs.update({nnqd.LSTM: quantized.LSTM, nnqd.GRU: quantized.GRU})
    return pairs if to == "fused" else {fused: torch_cls for torch_cls, fused in pairs.items()}


def convert(model: nn.Module, to: str = "fused") -> nn.Module:
    """Turn every nn.LSTM, GRU, RNN, LSTMCell, GRUCell and RNNCell in `model` (the model itself
    included) into its fused_rnn twin, in place, and return `model`. `to="torch"` goes back.
    Dynamically quantized layers (torch.ao.nn.quantized.dynamic.LSTM and GRU, with int8 weights)
    become fused_rnn.quantized.LSTM and GRU, and back; their weights stay where they are. torch's
    quantized cells, and its float16 quantized layers, are left as they are.

    Each layer keeps its identity: only its class changes. So it keeps its parameters (the same
    Parameter objects: an optimizer made before still holds them), device, dtype, training mode,
    hooks and any attribute set on it, and its state_dict keys. This is sound because each fused
    class subclasses the same torch base (nn.RNNBase, nn.RNNCellBase) and keeps no instance state
    of its own. Only the exact torch.nn classes are converted: a user's subclass of nn.LSTM has its
    own behaviour, so it is left alone.
    """
    if to not in ("fused", "torch"):
        raise ValueError(f"convert: to must be 'fused' or 'torch', got {to!r}")
    twins = _twins(to)
    if to == "torch":  # all or nothing: refused before any layer changes
        for name, module in model.named_modules():
            if type(module) in twins and modules.has_variants(module):
                twin = twins[type(module)].__name__
                raise ValueError(f"convert: {name or 'the model'} ({type(module).__name__}) has peephole connections, "
                                 f"zoneout, recurrent dropout or layer norm, which torch.nn's {twin} does not have")
    for module in model.modules():
        twin = twins.get(type(module))
        if twin is None or (isinstance(module, (nnqd.LSTM, nnqd.GRU)) and module.dtype != torch.qint8):
            continue
        module.__class__ = twin
        module.__dict__.pop("_kernel_cache", None)
        if to == "torch" and isinstance(module, nn.RNNBase):
            module.flatten_parameters()  # cuDNN's packed weights, as torch.nn keeps them on a GPU
    return model
