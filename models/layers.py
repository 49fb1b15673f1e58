"""Building blocks the model families share: fused projections that checkpoints store apart.

`FusedLinear` holds one weight for projections that a checkpoint keeps as separate linears
(BERT's query/key/value, BART's q_proj/k_proj/v_proj): one GEMM instead of three. The model's
`state_dict()` / `load_state_dict()` translate with `split_fused` / `merge_fused`, so the keys a
user sees and saves stay the checkpoint's, and transformers loads what fastlayers saves.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import fastlayers as fl


class FusedLinear(nn.Module):
    """y = act(x @ W^T + b) + residual with W = cat(parts' weights) along the output dim.

    parts: ordered {checkpoint name: out_features}; the checkpoint stores `<parent>.<name>.weight`
    (out, in) and `<parent>.<name>.bias` (out,), where <parent> is the module holding this one.
    weight: (sum(out), in_features); bias: (sum(out),) or None.
    """

    def __init__(self, in_features: int, parts: dict, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.parts = tuple(parts.items())
        out = sum(n for _, n in self.parts)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: Tensor, activation=None, residual=None) -> Tensor:
        return fl.linear(x, self.weight, self.bias, activation=activation, residual=residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, parts={dict(self.parts)}, bias={self.bias is not None}"


def _fused(model: nn.Module):
    for path, m in model.named_modules():
        if isinstance(m, FusedLinear):
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            yield path + ".", parent, m


def split_fused(model: nn.Module, sd: dict, prefix: str = "") -> dict:
    """Internal names -> checkpoint names: each FusedLinear's weight/bias become its parts' (views)."""
    for own, parent, m in _fused(model):
        for pname in ("weight", "bias"):
            key = prefix + own + pname
            if key not in sd:
                continue
            chunks = sd.pop(key).split([n for _, n in m.parts], dim=0)
            for (name, _), t in zip(m.parts, chunks):
                sd[prefix + parent + name + "." + pname] = t
    return sd


def merge_fused(model: nn.Module, sd: dict) -> dict:
    """Checkpoint names -> internal names (a new dict; inputs untouched). A fused tensor is built only
    when every part is present; otherwise the parts stay and are reported as unexpected/missing."""
    sd = dict(sd)
    for own, parent, m in _fused(model):
        for pname in ("weight", "bias"):
            keys = [parent + name + "." + pname for name, _ in m.parts]
            if all(k in sd for k in keys):
                sd[own + pname] = torch.cat([sd.pop(k) for k in keys], dim=0)
    return sd


def fused_key_names(model: nn.Module) -> dict:
    """{internal key: [checkpoint keys]} for the model's fused tensors."""
    out = {}
    for own, parent, m in _fused(model):
        for pname in ("weight", "bias"):
            if getattr(m, pname) is not None:
                out[own + pname] = [parent + name + "." + pname for name, _ in m.parts]
    return out
