"""The plain PyTorch reference: the same cells as a Python loop of torch ops over time, layers and
directions, reading the parameters of a torch.nn module or of fused_rnn's (so all contenders share
weights), fused_rnn's variants included; optionally with the step compiled by torch.compile, as
a user who writes the loop would."""
import torch
from torch import nn

from fused_rnn.functional import _uniform_below


def _cell_step(mode, x_proj, h, c, w_hh, b_hh, peephole=None, keep_h=None, keep_c=None, drop=None, norm=None):
    """One step from the input projection x_proj (with b_ih) and the previous state; an LSTM's
    peephole weights (p_i, p_f, p_o) where given; zoneout where keep_h (and LSTM's keep_c) is given,
    the share of the previous state each unit keeps (a 0/1 mask, or z); recurrent dropout where drop
    (the mask scaled by 1/(1 - p)) is given, for the recurrent product only; layer norm where norm
    (ln_hh weight, LSTM's ln_c weight and bias) is given (x_proj is then LN(x·W_ihᵀ) ⊙ ln_ih + b_ih)."""
    h_own, c_own = _own_step(mode, x_proj, h, c, w_hh, b_hh, peephole, drop, norm)
    if keep_h is None:
        return h_own, c_own
    return keep_h * h + (1 - keep_h) * h_own, (None if c is None else keep_c * c + (1 - keep_c) * c_own)


def _own_step(mode, x_proj, h, c, w_hh, b_hh, peephole, drop, norm):
    gh = (h if drop is None else h * drop) @ w_hh.t()
    if norm is not None:
        gh = torch.nn.functional.layer_norm(gh, gh.shape[-1:], norm[0], None, 1e-5)
    if b_hh is not None:
        gh = gh + b_hh
    if mode == "LSTM":
        i, f, g, o = (x_proj + gh).chunk(4, dim=1)
        p_i, p_f, p_o = peephole.chunk(3) if peephole is not None else (0, 0, 0)
        c = torch.sigmoid(f + p_f * c) * c + torch.sigmoid(i + p_i * c) * torch.tanh(g)
        y = c if norm is None else torch.nn.functional.layer_norm(c, c.shape[-1:], norm[1], norm[2], 1e-5)
        return torch.sigmoid(o + p_o * c) * torch.tanh(y), c
    if mode == "GRU":
        xr, xz, xn = x_proj.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, c
    pre = x_proj + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), c


class LoopRNN(nn.Module):
    """Runs `ref`'s parameters (an nn.LSTM/GRU/RNN without projection, or fused_rnn's, peephole,
    zoneout and recurrent dropout included: in training zoneout's masks drawn at each step, recurrent
    dropout's once per layer and direction) in a plain loop; with compile_step, each step through
    torch.compile."""

    def __init__(self, ref: nn.RNNBase, compile_step: bool = False):
        super().__init__()
        if ref.proj_size:
            raise ValueError("LoopRNN: proj_size is not supported")
        self.ref = ref
        self.step = torch.compile(_cell_step, dynamic=False) if compile_step else _cell_step

    def forward(self, x):
        ref = self.ref
        if ref.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[:2]
        directions = 2 if ref.bidirectional else 1
        zeros = x.new_zeros(batch, ref.hidden_size)
        layer_input, finals = x, []
        for layer in range(ref.num_layers):
            outputs = []
            for d in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(ref, "weight_ih" + sfx), getattr(ref, "weight_hh" + sfx)
                b_ih = getattr(ref, "bias_ih" + sfx) if ref.bias else None
                b_hh = getattr(ref, "bias_hh" + sfx) if ref.bias else None
                x_proj = layer_input @ w_ih.t()
                norm = None
                if getattr(ref, "layer_norm", False):
                    ln_ih = getattr(ref, "ln_ih_weight" + sfx)
                    x_proj = torch.nn.functional.layer_norm(x_proj, x_proj.shape[-1:], ln_ih, None, 1e-5)
                    norm = tuple(getattr(ref, name + sfx, None)
                                 for name in ("ln_hh_weight", "ln_c_weight", "ln_c_bias"))
                if b_ih is not None:
                    x_proj = x_proj + b_ih
                peephole = getattr(ref, "weight_peephole" + sfx, None)
                zoneout = getattr(ref, "zoneout", 0.0)
                keep_h = keep_c = zoneout if zoneout else None
                p = getattr(ref, "recurrent_dropout", 0.0)
                # drawn by fused_rnn's own rule (functional.stacked_rnn's): the same seed, the same masks
                drop = _uniform_below(zeros.shape, 1 - p, zeros).mul_(1 / (1 - p)) if p and self.training else None
                h, c, ys = zeros, zeros if ref.mode == "LSTM" else None, [None] * steps
                for t in (range(steps - 1, -1, -1) if d else range(steps)):
                    if zoneout and self.training:
                        keep_h = torch.bernoulli(torch.full_like(zeros, zoneout))
                        keep_c = torch.bernoulli(torch.full_like(zeros, zoneout)) if c is not None else None
                    h, c = self.step(ref.mode, x_proj[t], h, c, w_hh, b_hh, peephole, keep_h, keep_c, drop, norm)
                    ys[t] = h
                outputs.append(torch.stack(ys))
                finals.append(h)
            layer_input = torch.cat(outputs, dim=2) if directions == 2 else outputs[0]
        out = layer_input.transpose(0, 1) if ref.batch_first else layer_input
        return out, torch.stack(finals)
