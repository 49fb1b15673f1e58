"""Building blocks the model families share: linears whose fast layout differs from the checkpoint's.

fl.linear takes a weight (out, in). Two checkpoint layouts differ from that:
  - `FusedLinear`: one weight for projections a checkpoint stores apart (BERT's query/key/value,
    BART's q_proj/k_proj/v_proj): one GEMM instead of three.
  - `Conv1DLinear`: GPT-2's `Conv1D`, stored (in, out); kept here as (out, in).
The model's `state_dict()` / `load_state_dict()` translate with `split_fused` / `merge_fused`
(every module with a `checkpoint_tensors` / `internal_tensor` pair), so the keys and shapes a
user sees and saves stay the checkpoint's, and transformers loads what fastlayers saves.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import fastlayers as fl
from fastlayers.ops._common import host_readable


def padding_mask(attention_mask, B: int, L: int, name: str = "attention_mask", device=None):
    """A transformers attention_mask (B, L), 1 = token, 0 = padding -> fl.attention's key_padding_mask
    (B, L) bool on `device` (default: the mask's), or None when there is no mask or every position is
    a token (a tokenizer's mask of an unpadded batch): an unmasked attention takes the faster kernels
    (the sm_90a wgmma kernel declines masks). That check reads the mask on the host, as transformers'
    sdpa mask preparation does (`_prepare_4d_attention_mask_for_sdpa`); under torch.compile and
    while a CUDA graph is captured it is skipped and the mask passed as it is.
    Raises ValueError (naming `name`) for any shape but (B, L)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"{name}: expected a (B, L) = {(B, L)} padding mask (1 = token, 0 = padding), got shape "
                         f"{tuple(attention_mask.shape)}"
                         + (" (3-D/4-D masks are not supported)" if attention_mask.dim() != 2 else ""))
    mask = attention_mask.to(device).bool() if device is not None else attention_mask.bool()
    if host_readable(mask) and bool(mask.all()):
        return None
    return mask


class CheckpointLinear(nn.Module):
    """A linear whose parameters are stored under other names/shapes in checkpoints."""
    keys_on_parent = False    # checkpoint keys relative to the parent module (True) or to this one

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor, activation=None, residual=None) -> Tensor:
        return fl.linear(x, self.weight, self.bias, activation=activation, residual=residual)

    def checkpoint_tensors(self, pname: str, t: Tensor) -> dict:   # pragma: no cover - abstract
        raise NotImplementedError

    def internal_tensor(self, pname: str, parts: dict):            # pragma: no cover - abstract
        raise NotImplementedError


class FusedLinear(CheckpointLinear):
    """y = act(x @ W^T + b) + residual with W = cat(parts' weights) along the output dim.

    parts: ordered {checkpoint name: out_features}; the checkpoint stores `<parent>.<name>.weight`
    (out, in) and `<parent>.<name>.bias` (out,), where <parent> is the module holding this one.
    weight: (sum(out), in_features); bias: (sum(out),) or None.
    """
    keys_on_parent = True

    def __init__(self, in_features: int, parts: dict, bias: bool = True):
        self.parts = tuple(parts.items())
        super().__init__(in_features, sum(n for _, n in self.parts), bias)

    def checkpoint_tensors(self, pname, t):
        chunks = t.split([n for _, n in self.parts], dim=0)
        return {f"{name}.{pname}": c for (name, _), c in zip(self.parts, chunks)}

    def internal_tensor(self, pname, parts):
        keys = [f"{name}.{pname}" for name, _ in self.parts]
        return torch.cat([parts[k] for k in keys], dim=0) if all(k in parts for k in keys) else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, parts={dict(self.parts)}, bias={self.bias is not None}"


class Conv1DLinear(CheckpointLinear):
    """transformers' Conv1D (GPT-2): y = x @ W_ckpt + b with W_ckpt (in, out) in the checkpoint;
    held here as W = W_ckpt^T (out, in) for fl.linear. Constructor order as Conv1D: (nf=out, nx=in)."""

    def __init__(self, nf: int, nx: int, bias: bool = True):
        super().__init__(nx, nf, bias)

    def checkpoint_tensors(self, pname, t):
        return {pname: t.t() if pname == "weight" else t}

    def internal_tensor(self, pname, parts):
        t = parts.get(pname)
        return None if t is None else (t.t() if pname == "weight" else t)

    def extra_repr(self) -> str:
        return f"nx={self.in_features}, nf={self.out_features}, bias={self.bias is not None}"


def _layouts(model: nn.Module):
    for path, m in model.named_modules():
        if isinstance(m, CheckpointLinear):
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            yield path + ".", (parent if m.keys_on_parent else path + "."), m


def split_fused(model: nn.Module, sd: dict, prefix: str = "") -> dict:
    """Internal names/shapes -> the checkpoint's (views, no copies)."""
    for own, base, m in _layouts(model):
        for pname in ("weight", "bias"):
            key = prefix + own + pname
            if key in sd:
                for rel, t in m.checkpoint_tensors(pname, sd.pop(key)).items():
                    sd[prefix + base + rel] = t
    return sd


def merge_fused(model: nn.Module, sd: dict, skip: tuple = ()) -> dict:
    """Checkpoint names/shapes -> internal (a new dict; inputs untouched). A tensor is built only when
    every part is present; otherwise the parts stay and are reported as unexpected/missing.
    skip: module path prefixes ("bert.") whose layers are left alone (translated by their own model)."""
    sd = dict(sd)
    for own, base, m in _layouts(model):
        if own.startswith(skip):
            continue
        for pname in ("weight", "bias"):
            rel_keys = list(m.checkpoint_tensors(pname, torch.empty(m.out_features, 0)).keys())
            parts = {rel: sd[base + rel] for rel in rel_keys if base + rel in sd}
            t = m.internal_tensor(pname, parts)
            if t is not None:
                for rel in rel_keys:
                    del sd[base + rel]
                sd[own + pname] = t
    return sd


def fused_key_names(model: nn.Module) -> dict:
    """{internal key: [checkpoint keys]} for the model's re-laid-out tensors."""
    out = {}
    for own, base, m in _layouts(model):
        for pname in ("weight", "bias"):
            if getattr(m, pname) is not None:
                out[own + pname] = [base + rel for rel in m.checkpoint_tensors(pname, torch.empty(m.out_features, 0))]
    return out
