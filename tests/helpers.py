"""Shared test helpers: the tolerance rule of DESIGN.md and NaN poisoning.

Rule: a kernel's error against the high-precision reference is at most 2x PyTorch's own error at
the same dtype against that reference, plus a small absolute floor; NaN never passes.
"""
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
