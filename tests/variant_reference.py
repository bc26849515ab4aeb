"""A plain PyTorch loop of the equations of fused_rnn's variants (issue #41), written out here
independently of the library, for the variants' tests: peephole connections, zoneout, recurrent
dropout and layer norm, over torch.nn's LSTM (proj_size too), GRU and RNN (tanh or relu)."""
import torch
from torch import nn


def layer_norm(v, weight, bias=None):
    """Over each row's entries: (v - mean) / sqrt(var + 1e-5) ⊙ weight (+ bias), biased variance."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    out = (v - mean) / torch.sqrt(var + 1e-5) * weight
    return out if bias is None else out + bias


def reference_step(mode, x, h, c, get, mask, keep):
    """One step of the cell; `mask` scales h where the recurrent product takes it; `keep` is zoneout's
    share (m_c, m_h) of the previous state, 0 without."""
    h_in = h * mask
    a_x, a_h = x @ get("weight_ih").T, h_in @ get("weight_hh").T
    normalized = get("ln_ih_weight") is not None
    if normalized:
        a_x, a_h = layer_norm(a_x, get("ln_ih_weight")), layer_norm(a_h, get("ln_hh_weight"))
    gx = a_x + (get("bias_ih") if get("bias_ih") is not None else 0)
    gh = a_h + (get("bias_hh") if get("bias_hh") is not None else 0)
    H = get("weight_hh").shape[0] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
    keep_c, keep_h = keep
    if mode == "LSTM":
        i, f, g, o = (gx + gh).split(H, 1)
        p_i, p_f, p_o = get("weight_peephole").split(H) if get("weight_peephole") is not None else (0, 0, 0)
        c_own = torch.sigmoid(f + p_f * c) * c + torch.sigmoid(i + p_i * c) * torch.tanh(g)
        y = layer_norm(c_own, get("ln_c_weight"), get("ln_c_bias")) if normalized else c_own
        h_own = torch.sigmoid(o + p_o * c_own) * torch.tanh(y)
        if get("weight_hr") is not None:
            h_own = h_own @ get("weight_hr").T
        c = keep_c * c + (1 - keep_c) * c_own
    elif mode == "GRU":
        r = torch.sigmoid(gx[:, :H] + gh[:, :H])
        z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        h_own = (1 - z) * n + z * h
    else:
        h_own = (torch.relu if mode == "RNN_RELU" else torch.tanh)(gx + gh)
    return keep_h * h + (1 - keep_h) * h_own, c


class Reference(nn.Module):
    """The equations over a padded batch, with the fused module's parameters (its peepholes too):
    masks(k) gives layer-direction k's recurrent dropout mask [B, P] (scaled by 1/(1 - p)) or 1,
    keeps(k, t) zoneout's (m_c, m_h) at step t ([B, H] each, or numbers; 0 without)."""

    def __init__(self, fused, masks=lambda k: 1, keeps=lambda k, t: (0, 0)):
        super().__init__()
        self.mode = fused.mode
        self.config = (fused.num_layers, fused.bidirectional, fused.batch_first, fused.hidden_size,
                       getattr(fused, "proj_size", 0) or fused.hidden_size)
        self.masks, self.keeps = masks, keeps
        for name, p in fused.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x, hx=None):
        layers, bidirectional, batch_first, H, P = self.config
        D = 2 if bidirectional else 1
        x = x.transpose(0, 1) if batch_first else x
        T, B = x.shape[:2]
        lstm = self.mode == "LSTM"
        if hx is None:
            h = x.new_zeros(layers * D, B, P)
            hx = (h, x.new_zeros(layers * D, B, H)) if lstm else h
        h0, c0 = hx if lstm else (hx, torch.zeros_like(hx))
        h_n, c_n = [], []
        for layer in range(layers):
            outputs = []
            for d in range(D):
                k = layer * D + d
                get = lambda name: getattr(self, name + f"_l{layer}" + ("_reverse" if d else ""), None)  # noqa: E731
                mask = self.masks(k)
                h, c, ys = h0[k], c0[k], [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    h, c = reference_step(self.mode, x[t], h, c, get, mask, self.keeps(k, t))
                    ys[t] = h
                outputs.append(torch.stack(ys))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, 2)
        y = x.transpose(0, 1) if batch_first else x
        return (y, (torch.stack(h_n), torch.stack(c_n))) if lstm else (y, torch.stack(h_n))
