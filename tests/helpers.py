"""Shared test helpers: the tolerance rule of DESIGN.md and NaN poisoning.

Rule: a kernel's error against the high-precision reference is at most 2x PyTorch's own error at
the same dtype against that reference, plus a small absolute floor; NaN never passes.
"""
import math

import torch

# Absolute floors per dtype (what rounding one output element costs near 1.0).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_rule(out: torch.Tensor, ref: torch.Tensor, torch_same_dtype: torch.Tensor | None = None,
                      *, factor: float = 2.0, floor: float | None = None, what: str = "output"):
    """out vs ref (high precision); torch_same_dtype = PyTorch's own result at out's dtype."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten element or bad math)"
    err = max_err(out, ref)
    base = max_err(torch_same_dtype, ref) if torch_same_dtype is not None else 0.0
    tol = factor * base + (FLOOR[out.dtype] if floor is None else floor) * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} (torch's own error {base:.3e})"


def attention_f64(q, k, v, causal=False, mask=None, scale=None, keep=None, p=0.0):
    """The tests' float64 attention: softmax(q k^T * scale) v in (B, L, H, D), bottom-right causal,
    key padding (True = attend), empty rows -> 0 with zero gradients; keep/p apply a dropout mask."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))                     # (B, H, L, D)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= torch.arange(Lk, device=q.device)[None, :] <= torch.arange(Lq, device=q.device)[:, None] + Lk - Lq
    if mask is not None:
        allowed &= mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).detach() if Lk else s.new_zeros(B, H, Lq, 1)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    den = e.sum(-1, keepdim=True)
    pr = e / torch.where(den == 0, 1.0, den)
    if keep is not None:
        pr = pr * keep / (1 - p)
    return (pr @ v).transpose(1, 2)
