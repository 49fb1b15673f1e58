"""fl.layer_norm: LayerNorm / RMSNorm over the last dimension, with a fused residual add.

    y = norm(s) * weight + bias,  s = x + residual (rounded to x's dtype) or x
    returns y, or (y, s) when `residual` is given (a pre-norm block needs the sum).

Pieces, in the order every op module follows: the reference (fp32 math; the "torch" backend and
the oracle of the tests), validation, the eager path (launcher called directly; one
autograd.Function when a gradient is needed), and the torch.library custom ops
fastlayers::layer_norm_fwd / layer_norm_bwd that torch.compile sees.
Backend launchers share one interface (BRIEF of the launchers: layer_norm_fwd / layer_norm_bwd in
fastlayers.kernels.layer_norm and fastlayers.cuda_ops.layer_norm).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import OpBackends
from ._common import (as_rows, check_like, check_tensor, device_guard, empty_placeholder, needs_grad,
                      request_for_trace, resolve_in_op)

OP = "layer_norm"
MAX_COLS_KERNELS = 65536  # the Triton and CUDA kernels' limit; the torch backend takes any size


# ----------------------------------------------------------------------------- reference
def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def layer_norm_ref(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, rms: bool):
    """Reference forward on (rows, cols): returns (y, residual_out | None, mean | None, rstd)."""
    acc = _acc_dtype(x)
    residual_out = None
    if residual is not None:
        residual_out = (x.to(acc) + residual.to(acc)).to(x.dtype)
        s = residual_out.to(acc)
    else:
        s = x.to(acc)
    if rms:
        mean = None
        rstd = torch.rsqrt(s.square().mean(-1) + eps)                  # (rows,)
        xhat = s * rstd[:, None]
    else:
        mean = s.mean(-1)                                              # (rows,)
        xc = s - mean[:, None]
        rstd = torch.rsqrt(xc.square().mean(-1) + eps)
        xhat = xc * rstd[:, None]
    y = xhat
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    stat = torch.float32 if acc == torch.float32 else acc
    return (y.to(x.dtype), residual_out, None if mean is None else mean.to(stat), rstd.to(stat))


def layer_norm_ref_bwd(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor,
                       dresidual_out: Optional[Tensor], has_bias: bool, rms: bool):
    """Reference backward on (rows, cols): returns (ds, dweight | None, dbias | None)."""
    acc = _acc_dtype(s)
    sf, dyf, rstd_ = s.to(acc), dy.to(acc), rstd.to(acc)[:, None]
    xhat = sf * rstd_ if rms else (sf - mean.to(acc)[:, None]) * rstd_
    wdy = dyf * weight.to(acc) if weight is not None else dyf
    ds = wdy - xhat * (wdy * xhat).mean(-1, keepdim=True)
    if not rms:
        ds = ds - wdy.mean(-1, keepdim=True)
    ds = ds * rstd_
    if dresidual_out is not None:
        ds = ds + dresidual_out.to(acc)
    dweight = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dyf.sum(0).to(s.dtype) if has_bias else None
    return ds.to(s.dtype), dweight, dbias


class _TorchBackend:
    """The "torch" backend: the reference, behind the launcher interface."""

    @staticmethod
    def unsupported_reason(x: Tensor) -> Optional[str]:
        return None

    layer_norm_fwd = staticmethod(layer_norm_ref)
    layer_norm_bwd = staticmethod(layer_norm_ref_bwd)


BACKENDS = OpBackends(
    OP,
    {"torch": lambda: _TorchBackend, "triton": "fastlayers.kernels.layer_norm",
     "cuda": "fastlayers.cuda_ops.layer_norm"},
    # Automatic choice for CUDA tensors. Until GPU measurements rank them (benchmarks/results), the
    # Triton kernels -- exercised in CI through the interpreter -- come first.
    auto_order=("triton", "cuda"),
)


def _select(backend: Optional[str], x: Tensor) -> str:
    def case_reason(name, mod):
        if name != "torch":
            if x.dtype == torch.float64:
                return "float64 runs on the torch backend only"
            if x.shape[-1] > MAX_COLS_KERNELS:
                return f"hidden size {x.shape[-1]} > {MAX_COLS_KERNELS} (the kernels' limit)"
        return mod.unsupported_reason(x)
    return BACKENDS.select(backend, x.device, case_reason)


def _launchers(name: str):
    return BACKENDS.module(name)


# ----------------------------------------------------------------------------- validation
def _validate(x, weight, bias, eps, residual, rms):
    check_tensor(x, "x", min_dim=1)
    cols = x.shape[-1]
    if cols < 1:
        raise ValueError(f"x: the normalised (last) dimension must be >= 1, got shape {tuple(x.shape)}")
    if weight is not None:
        check_like(weight, "weight", x, "x", shape=(cols,))
    if bias is not None:
        check_like(bias, "bias", x, "x", shape=(cols,))
    if residual is not None:
        check_like(residual, "residual", x, "x", shape=x.shape)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    if not isinstance(rms, bool):
        raise TypeError(f"rms: expected a bool, got {type(rms).__name__}")


# ----------------------------------------------------------------------------- eager path
class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, name):
        shape, cols = x.shape, x.shape[-1]
        mod = _launchers(name)
        x2 = as_rows(x, cols)
        r2 = as_rows(residual, cols) if residual is not None else None
        y, res_out, mean, rstd = mod.layer_norm_fwd(x2, r2, weight, bias, float(eps), rms)
        s = res_out if residual is not None else x2
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.meta = (name, rms, bias is not None, residual is not None, shape)
        if residual is None:
            return y.view(shape)
        return y.view(shape), res_out.view(shape)

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        s, weight, mean, rstd = ctx.saved_tensors
        name, rms, has_bias, has_res, shape = ctx.meta
        cols = shape[-1]
        dy2 = as_rows(dy, cols)
        dr2 = as_rows(dres_out, cols) if (has_res and dres_out is not None) else None
        ds, dw, db = _launchers(name).layer_norm_bwd(dy2, s, weight, mean, rstd, dr2, has_bias, rms)
        ds = ds.view(shape)
        return ds, dw, db, (ds if has_res else None), None, None, None


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None, rms: bool = False, backend: Optional[str] = None):
    """LayerNorm (or RMSNorm when rms=True) over the last dimension of x, fused with `+ residual`.

    x: (..., N); weight, bias: (N,) or None; residual: x's shape or None. Returns y, or
    (y, x + residual) when residual is given. fp32 statistics; gradients for x, weight, bias,
    residual. backend: None (automatic), "torch", "triton" or "cuda" (raises if it cannot run).
    """
    if torch.compiler.is_compiling():
        return _compiled(x, weight, bias, eps, residual, rms, backend)
    _validate(x, weight, bias, eps, residual, rms)
    name = _select(backend, x)
    BACKENDS.record(name)
    with device_guard(x):
        if needs_grad(x, weight, bias, residual):
            return _LayerNormFn.apply(x, weight, bias, residual, eps, rms, name)
        cols = x.shape[-1]
        y, res_out, _, _ = _launchers(name).layer_norm_fwd(
            as_rows(x, cols), as_rows(residual, cols) if residual is not None else None,
            weight, bias, float(eps), rms)
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), res_out.view(x.shape)


# ----------------------------------------------------------------------------- torch.compile path
def _compiled(x, weight, bias, eps, residual, rms, backend):
    _validate(x, weight, bias, eps, residual, rms)
    name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
    y, res_out, _, _ = torch.ops.fastlayers.layer_norm_fwd(x, weight, bias, residual, float(eps), rms, name)
    return y if residual is None else (y, res_out)


@torch.library.custom_op("fastlayers::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                       eps: float, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, residual_out, mean, rstd); absent ones are 0-element tensors.
    backend: a backend name, or "" for the automatic choice."""
    cols = x.shape[-1]
    backend = resolve_in_op(backend, lambda b: _select(b, x))
    x2 = as_rows(x, cols)
    r2 = as_rows(residual, cols) if residual is not None else None
    with device_guard(x):
        y, res_out, mean, rstd = _launchers(backend).layer_norm_fwd(x2, r2, weight, bias, eps, rms)
    res_out = res_out.view(x.shape) if res_out is not None else empty_placeholder(x)
    mean = mean if mean is not None else empty_placeholder(rstd)
    return y.view(x.shape), res_out, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, rms, backend):
    rows = x.numel() // x.shape[-1]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    res_out = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if rms else (rows,), dtype=stat_dtype)
    return x.new_empty(x.shape), res_out, mean, x.new_empty((rows,), dtype=stat_dtype)


@torch.library.custom_op("fastlayers::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                       dresidual_out: Optional[Tensor], has_bias: bool, rms: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (ds, dweight, dbias); absent ones are 0-element tensors."""
    cols = s.shape[-1]
    backend = resolve_in_op(backend, lambda b: _select(b, s))
    with device_guard(s):
        ds, dw, db = _launchers(backend).layer_norm_bwd(
            as_rows(dy, cols), as_rows(s, cols), weight, None if rms else mean, rstd,
            as_rows(dresidual_out, cols) if dresidual_out is not None else None, has_bias, rms)
    return (ds.view(s.shape), dw if dw is not None else empty_placeholder(s),
            db if db is not None else empty_placeholder(s))


@_layer_norm_bwd_op.register_fake
def _(dy, s, weight, mean, rstd, dresidual_out, has_bias, rms, backend):
    cols = s.shape[-1]
    dw = s.new_empty((cols,), dtype=weight.dtype) if weight is not None else s.new_empty((0,))
    db = s.new_empty((cols,)) if has_bias else s.new_empty((0,))
    return s.new_empty(s.shape), dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms, backend = inputs
    y, res_out, mean, rstd = output
    s = res_out if residual is not None else x
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.meta = (rms, bias is not None, residual is not None, backend)


def _fwd_backward(ctx, dy, dres_out, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    rms, has_bias, has_res, backend = ctx.meta
    ds, dw, db = torch.ops.fastlayers.layer_norm_bwd(
        dy, s, weight, mean, rstd, dres_out if has_res else None, has_bias, rms, backend)
    return (ds, dw if weight is not None else None, db if has_bias else None,
            ds if has_res else None, None, None, None)


_layer_norm_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
