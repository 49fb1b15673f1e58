"""Drop-in modules on fastlayers ops. Each subclasses its torch.nn counterpart, so constructor
arguments, parameters, state_dict keys and isinstance checks are unchanged; only forward differs.
`backend` (keyword, default None = automatic) pins the backend of one module."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.layer_norm import layer_norm


def _flat_norm(module, x: Tensor, rms: bool, eps: float, residual=None):
    shape = tuple(module.normalized_shape)
    k = len(shape)
    if tuple(x.shape[-k:]) != shape:
        raise ValueError(f"x: expected trailing shape {shape} (normalized_shape), got {tuple(x.shape)}")
    n = math.prod(shape)
    w = module.weight.reshape(n) if module.weight is not None else None
    b = getattr(module, "bias", None)
    b = b.reshape(n) if b is not None else None
    xf = x.reshape(*x.shape[: x.dim() - k], n) if k > 1 else x
    rf = residual.reshape(xf.shape) if (residual is not None and k > 1) else residual
    out = layer_norm(xf, w, b, eps, residual=rf, rms=rms, backend=module.backend)
    if k == 1:
        return out
    if residual is None:
        return out.reshape(x.shape)
    return out[0].reshape(x.shape), out[1].reshape(x.shape)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fl.layer_norm. forward(x, residual=None) -> y, or (y, x + residual)."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return _flat_norm(self, x, False, self.eps, residual)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on fl.layer_norm(rms=True); eps=None means torch.finfo(x.dtype).eps, as torch."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _flat_norm(self, x, True, eps, residual)
