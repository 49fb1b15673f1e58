"""Drop-in modules on fastlayers ops. Each subclasses its torch.nn counterpart, so constructor
arguments, parameters, state_dict keys and isinstance checks are unchanged; only forward differs.
`backend` (keyword, default None = automatic) pins the backend of one module."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.attention import attention
from .ops.layer_norm import layer_norm
from .ops.linear import ACTIVATIONS, linear


def _flat_norm(module, x: Tensor, rms: bool, eps: float, residual=None):
    shape = tuple(module.normalized_shape)
    k = len(shape)
    if tuple(x.shape[-k:]) != shape:
        raise ValueError(f"x: expected trailing shape {shape} (normalized_shape), got {tuple(x.shape)}")
    n = math.prod(shape)
    w, b = module.weight, getattr(module, "bias", None)
    if k > 1:  # 1-D parameters go as they are (no view per call)
        w = w.reshape(n) if w is not None else None
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
    """torch.nn.RMSNorm on fl.layer_norm(rms=True); eps=None means what torch's kernel uses:
    torch.finfo of the compute dtype (float32 for fp16/bf16 inputs, else x's dtype)."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if self.eps is not None:
            eps = self.eps
        else:  # as torch.nn.RMSNorm's kernel: the eps of the compute (opmath) dtype, fp32 for fp16/bf16
            eps = torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).eps
        return _flat_norm(self, x, True, eps, residual)


class Linear(torch.nn.Linear):
    """torch.nn.Linear with a fused epilogue: forward(x, residual=None) = act(x W^T + b) + residual.
    activation in {None, "gelu", "gelu_tanh", "relu"}; same parameters and state_dict keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return linear(x, self.weight, self.bias, activation=self.activation, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class MLP(torch.nn.Module):
    """Transformer MLP: fc2(act(fc1(x))) + residual, two fused linears (fc1 carries bias + activation,
    fc2 carries bias + the residual add)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu", bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size, bias, activation, device, dtype, backend=backend)
        self.fc2 = Linear(intermediate_size, hidden_size, bias, None, device, dtype, backend=backend)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.fc2(self.fc1(x), residual)


class MultiheadSelfAttention(torch.nn.Module):
    """Self-attention on fused ops: one QKV projection (qkv_proj, (3E, E)), fl.attention, and an output
    projection (out_proj) with the residual add fused. x: (B, L, E). Dropout on the attention
    probabilities applies in training mode only (dropout_p is passed as 0 in eval)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False, device=None, dtype=None, *, backend: str | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: must be divisible by num_heads={num_heads}, got {embed_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.causal, self.backend = dropout, causal, backend
        self.qkv_proj = Linear(embed_dim, 3 * embed_dim, bias, None, device, dtype, backend=backend)
        self.out_proj = Linear(embed_dim, embed_dim, bias, None, device, dtype, backend=backend)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """x: (B, L, E) -> out_proj(attention) + residual, (B, L, E).
        key_padding_mask: (B, L) bool, True = attend, False = padding -- the opposite of
        nn.MultiheadAttention's key_padding_mask (True = ignore): pass `~mask` from there."""
        B, L, E = x.shape
        qkv = self.qkv_proj(x).view(B, L, 3, self.num_heads, self.head_dim)        # (B, L, 3, H, D)
        q, k, v = qkv.unbind(2)                                                      # (B, L, H, D) views
        o = attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask,
                      dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(o.reshape(B, L, E), residual)
