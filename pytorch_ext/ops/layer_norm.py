"""fl.layer_norm: LayerNorm / RMSNorm over the last dimension, with a fused residual add.

    y = norm(s) * weight + bias,  s = x + residual (rounded to x's dtype) or x
    returns y, or (y, s) when `residual` is given (a pre-norm block needs the sum).

Pieces, in the order every op module follows: the reference (fp32 math, fp64 for fp64: the tests'
oracle and the custom op's torch launcher), the native "torch" backend, validation, the eager path
(launcher called directly; one autograd.Function when a gradient is needed), and the torch.library
custom ops fastlayers::layer_norm_fwd / layer_norm_bwd that torch.compile sees for kernel backends.
Backend launchers share one interface (the "layer norm" launcher interface: layer_norm_fwd /
layer_norm_bwd in fastlayers.kernels.layer_norm and fastlayers.cuda_ops.layer_norm).

Dtypes, as PyTorch defines them (F.layer_norm / F.rms_norm): y and the sum s have x's dtype; the
residual has x's dtype. LayerNorm takes weight/bias of x's dtype, or float32 ones with float16 /
bfloat16 x (every parameter float32, as F.layer_norm's mixed-dtype rule). RMSNorm takes parameters
of any floating dtype, as F.rms_norm does. Gradients of the parameters come back in their dtypes.
Kernel backends see parameters of x's dtype or float32 only (_kernel_params); statistics are fp32.

Autocast: F.layer_norm and F.rms_norm run in float32 under CUDA autocast and are not cast under CPU
autocast; fl.layer_norm does what the torch composition `s = x + residual; norm(s)` does under the
same autocast state (_autocast), then runs its backend with autocast off.

Tensor policy (ops/_common.py): weight and bias go through vector_arg (kernels index them as
contiguous); x, residual and dy keep their outer strides (0 included) with a contiguous last dim.
Outputs handed to the caller are the launcher's own tensors (reshaped outside any autograd.Function),
so in-place edits (nn.ReLU(inplace=True), h += 1) behave as after torch.nn layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import OpBackends
from ._common import (as_rows, autocast_cast, autocast_dtype, autocast_off, check_like, check_tensor, dtype_name,
                      device_guard, empty_placeholder, last_dim_contiguous, needs_grad, request_for_trace,
                      no_autocast, resolve_in_op, torch_at_trace, vector_arg)

OP = "layer_norm"
MAX_COLS_KERNELS = 65536  # the Triton and CUDA kernels' limit; the torch backend takes any size
_HALF = (torch.float16, torch.bfloat16)
# Device types whose autocast runs layer_norm and rms_norm in float32 (torch's autocast "fp32"
# list: both ops are registered for AutocastCUDA, neither for AutocastCPU -- tests check this
# against torch's dispatcher and, on a GPU, against torch's own autocast results).
_AUTOCAST_FP32 = ("cuda",)


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
                       dresidual_out: Optional[Tensor], has_bias: bool, rms: bool, *,
                       param_dtype: Optional[torch.dtype] = None):
    """Reference backward on (rows, cols): returns (ds, dweight | None, dbias | None); dweight and
    dbias in weight's dtype, else param_dtype, else s's."""
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
    pdtype = weight.dtype if weight is not None else (param_dtype or s.dtype)
    dweight = (dyf * xhat).sum(0).to(pdtype) if weight is not None else None
    dbias = dyf.sum(0).to(pdtype) if has_bias else None
    return ds.to(s.dtype), dweight, dbias


class _TorchBackend:
    """The custom op's torch launcher (auto-fallback on CUDA tensors, opcheck): the reference. The
    eager and traced "torch" backend is _native."""

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


# ----------------------------------------------------------------------------- the torch backend
def _native(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
            eps: float, rms: bool):
    """The "torch" backend: torch's own fused kernels under torch's autograd (eager), and what
    torch.compile traces when the backend is "torch" (inductor then sees F.layer_norm / F.rms_norm).
    x: (..., N), any layout."""
    s = x if residual is None else x + residual  # x's dtype (validated: residual has x's dtype)
    n = (x.shape[-1],)
    if rms:
        y = F.rms_norm(s, n, weight, eps)  # any parameter dtype; y in s's dtype
        if bias is not None:
            y = y + bias
            if y.dtype != x.dtype:  # a wider bias promotes the sum
                y = y.to(x.dtype)
    elif s.dtype in _HALF and s.device.type == "cpu":
        # CPU F.layer_norm keeps its statistics (saved for the backward) in the parameters' dtype:
        # float32 parameters (exact casts) select its float32-statistics kernel, as fast (a half rstd
        # rounds, and overflows fp16 on near-constant rows with a tiny eps, e.g. BERT's 1e-12). A unit
        # weight when there is none: that kernel's backward fails with a float32 bias alone (torch 2.13).
        weight = torch.ones(n, device=s.device) if weight is None else weight.float()
        y = F.layer_norm(s, n, weight, None if bias is None else bias.float(), eps)
    elif _mixed(x, weight, bias) and s.device.type != "cpu":
        # F.layer_norm takes float16/bfloat16 x with float32 parameters on CPU; elsewhere normalise
        # the float32 copy (the same math: fp32 statistics, one rounding of y).
        y = F.layer_norm(s.float(), n, weight, bias, eps).to(x.dtype)
    else:
        y = F.layer_norm(s, n, weight, bias, eps)
    return y if residual is None else (y, s)


def _mixed(x, weight, bias) -> bool:
    return (weight is not None and weight.dtype != x.dtype) or (bias is not None and bias.dtype != x.dtype)


def _kernel_params(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    """Parameters as the kernel backends take them: all of x's dtype, or all float32 (the CUDA
    kernels are instantiated for (T, T) and (T, float) only). Other dtypes -- RMSNorm only, which
    takes any -- are cast to float32, differentiably: exact for float16/bfloat16, float64 rounds."""
    if not _mixed(x, weight, bias):
        return weight, bias
    f32 = torch.float32
    return (weight if weight is None or weight.dtype == f32 else weight.to(f32),
            bias if bias is None or bias.dtype == f32 else bias.to(f32))


# ----------------------------------------------------------------------------- validation
def _validate(x, weight, bias, eps, residual, rms):
    check_tensor(x, "x", min_dim=1)
    cols = x.shape[-1]
    if cols < 1:
        raise ValueError(f"x: the normalised (last) dimension must be >= 1, got shape {tuple(x.shape)}")
    for t, arg in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            check_tensor(t, arg)
            check_like(t, arg, x, "x", shape=(cols,), same_dtype=False)
    if not rms and _mixed(x, weight, bias):
        # F.layer_norm's rule: parameters of x's dtype, or all float32 with float16/bfloat16 x.
        for t, arg in ((weight, "weight"), (bias, "bias")):
            if t is None:
                continue
            if x.dtype not in _HALF:
                if t.dtype != x.dtype:
                    raise TypeError(f"{arg}: expected x's dtype {dtype_name(x.dtype)}, got {dtype_name(t.dtype)} (LayerNorm mixes "
                                    f"dtypes only as float16/bfloat16 x with float32 parameters)")
            elif t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"{arg}: expected x's dtype {dtype_name(x.dtype)} or float32, got {dtype_name(t.dtype)}")
            elif t is bias and weight is not None and bias.dtype != weight.dtype:
                raise TypeError(f"bias: expected x's dtype {dtype_name(x.dtype)} or float32, like weight "
                                f"({dtype_name(weight.dtype)}), got {dtype_name(bias.dtype)} (LayerNorm with float16/bfloat16 "
                                f"x takes parameters all of x's dtype or all float32)")
    if residual is not None:
        check_like(residual, "residual", x, "x", shape=x.shape)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    if not isinstance(rms, bool):
        raise TypeError(f"rms: expected a bool, got {type(rms).__name__}")


# ----------------------------------------------------------------------------- autocast
def _autocast(x, weight, bias, residual):
    """Under torch.autocast for x's device type: the inputs as the torch composition
    `s = x + residual; norm(s)` would run them, and the sum to return (or None). The sum of x and a
    residual of another dtype (e.g. a bf16 x on an fp32 residual stream) is torch's promoted add; on
    CUDA, where autocast runs the norm in float32, a half sum is formed at its dtype first and its
    float32 copy normalised. Outside autocast: None (the inputs as given)."""
    if not isinstance(x, Tensor) or autocast_dtype(x) is None:
        return None
    fp32 = x.device.type in _AUTOCAST_FP32
    s = None
    if isinstance(residual, Tensor) and (residual.dtype != x.dtype or (fp32 and x.dtype in _HALF)):
        check_like(residual, "residual", x, "x", shape=x.shape, same_dtype=False)
        s = x + residual
        x, residual = s, None
    if fp32:
        x, weight, bias, residual = (autocast_cast(t, torch.float32) if isinstance(t, Tensor) else t
                                     for t in (x, weight, bias, residual))
    return x, weight, bias, residual, s


# ----------------------------------------------------------------------------- eager path
class _LayerNormFn(torch.autograd.Function):
    """Kernel backends with a gradient to record; x, residual: (rows, cols). Returns the launcher's
    own outputs (never views made here), so the caller may edit them in place. The gradient of the
    residual sum alone (y unused) needs nothing saved: a caller's in-place edit of the sum then
    fails the backward only where torch's own composition would (its norm saves the sum too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, name):
        y, res_out, mean, rstd = _launchers(name).layer_norm_fwd(x, residual, weight, bias, float(eps), rms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(res_out if residual is not None else x, weight, mean, rstd)
        ctx.meta = (name, rms, None if bias is None else bias.dtype, residual is not None)
        return y if residual is None else (y, res_out)

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        name, rms, bias_dtype, has_res = ctx.meta
        if dy is None:  # only the sum's gradient: it flows to x and residual unchanged
            return dres_out, None, None, dres_out, None, None, None
        s, weight, mean, rstd = ctx.saved_tensors
        dr2 = last_dim_contiguous(dres_out) if dres_out is not None else None      # (rows, cols)
        ds, dw, db = _launchers(name).layer_norm_bwd(
            last_dim_contiguous(dy), s, weight, mean, rstd, dr2, bias_dtype is not None, rms,
            param_dtype=weight.dtype if weight is not None else bias_dtype)
        return ds, dw, db, (ds if has_res else None), None, None, None


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None, rms: bool = False, backend: Optional[str] = None):
    """LayerNorm (or RMSNorm when rms=True) over the last dimension of x, fused with `+ residual`.

    x: (..., N); weight, bias: (N,) or None; residual: x's shape and dtype, or None. Returns y, or
    (y, x + residual) when residual is given; both have x's dtype. Parameters: x's dtype, or float32
    with float16/bfloat16 x (RMSNorm: any floating dtype), as F.layer_norm / F.rms_norm take them.
    fp32 statistics; gradients for x, weight, bias, residual. Under torch.autocast it computes what
    `s = x + residual; F.layer_norm(s, ...)` computes there (float32 on CUDA, uncast on CPU).
    backend: None (automatic), "torch", "triton" or "cuda" (raises if it cannot run).
    """
    ac = _autocast(x, weight, bias, residual)
    s_out = None
    if ac is not None:
        x, weight, bias, residual, s_out = ac
    if torch.compiler.is_compiling():
        run = _compiled
    else:
        run = _eager
    if ac is None:
        return run(x, weight, bias, eps, residual, rms, backend)
    with autocast_off(x):
        out = run(x, weight, bias, eps, residual, rms, backend)
    return out if s_out is None else (out, s_out)


def _eager(x, weight, bias, eps, residual, rms, backend):
    _validate(x, weight, bias, eps, residual, rms)
    weight, bias = vector_arg(weight), vector_arg(bias)
    name = _select(backend, x)
    BACKENDS.record(name)
    if name == "torch":
        return _native(x, weight, bias, residual, eps, rms)
    weight, bias = _kernel_params(x, weight, bias)
    shape, cols = x.shape, x.shape[-1]
    x2 = as_rows(x, cols)                                                      # (rows, cols)
    r2 = as_rows(residual, cols) if residual is not None else None             # (rows, cols)
    with device_guard(x):
        if needs_grad(x, weight, bias, residual):
            out = _LayerNormFn.apply(x2, weight, bias, r2, eps, rms, name)
            y, s = out if residual is not None else (out, None)
        else:
            y, s, _, _ = _launchers(name).layer_norm_fwd(x2, r2, weight, bias, float(eps), rms)
    if x.dim() != 2:  # a view made here, outside the Function: in-place edits stay legal
        y = y.view(shape)
        s = s.view(shape) if s is not None else None
    return y if residual is None else (y, s)


# ----------------------------------------------------------------------------- torch.compile path
def _compiled(x, weight, bias, eps, residual, rms, backend):
    _validate(x, weight, bias, eps, residual, rms)
    weight, bias = vector_arg(weight), vector_arg(bias)
    name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
    if torch_at_trace(name, x.device):
        return _native(x, weight, bias, residual, eps, rms)  # inductor sees F.layer_norm itself
    weight, bias = _kernel_params(x, weight, bias)
    cols = x.shape[-1]
    x2 = as_rows(x, cols)
    r2 = as_rows(residual, cols) if residual is not None else None
    y, res_out, _, _ = torch.ops.fastlayers.layer_norm_fwd(x2, weight, bias, r2, float(eps), rms, name)
    if x.dim() != 2:
        y = y.view(x.shape)
        res_out = res_out.view(x.shape) if residual is not None else res_out
    return y if residual is None else (y, res_out)


def _same_shape(t: Tensor, shape) -> Tensor:
    # A 2-D input gets the launcher's own tensors back (no view: autograd-safe in-place edits).
    return t if t.shape == shape else t.view(shape)


@torch.library.custom_op("fastlayers::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                       eps: float, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, residual_out, mean, rstd); absent ones are 0-element tensors. weight and bias:
    x's dtype or float32 (_kernel_params). backend: a backend name, or "" for the automatic choice."""
    cols = x.shape[-1]
    weight, bias = vector_arg(weight), vector_arg(bias)
    backend = resolve_in_op(backend, lambda b: _select(b, x))
    x2 = as_rows(x, cols)
    r2 = as_rows(residual, cols) if residual is not None else None
    with device_guard(x), no_autocast(x):
        y, res_out, mean, rstd = _launchers(backend).layer_norm_fwd(x2, r2, weight, bias, eps, rms)
    res_out = _same_shape(res_out, x.shape) if res_out is not None else empty_placeholder(x)
    mean = mean if mean is not None else empty_placeholder(rstd)
    return _same_shape(y, x.shape), res_out, mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, rms, backend):
    rows = x.numel() // x.shape[-1]
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    res_out = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if rms else (rows,), dtype=stat_dtype)
    return x.new_empty(x.shape), res_out, mean, x.new_empty((rows,), dtype=stat_dtype)


@torch.library.custom_op("fastlayers::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: Tensor, s: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                       dresidual_out: Optional[Tensor], has_bias: bool, rms: bool, backend: str,
                       param_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (ds, dweight, dbias); absent ones are 0-element tensors. dweight/dbias in weight's
    dtype, else param_dtype, else s's."""
    cols = s.shape[-1]
    weight = vector_arg(weight)
    backend = resolve_in_op(backend, lambda b: _select(b, s))
    with device_guard(s), no_autocast(s):
        ds, dw, db = _launchers(backend).layer_norm_bwd(
            as_rows(dy, cols), as_rows(s, cols), weight, None if rms else mean, rstd,
            as_rows(dresidual_out, cols) if dresidual_out is not None else None, has_bias, rms,
            param_dtype=param_dtype)
    return (_same_shape(ds, s.shape), dw if dw is not None else empty_placeholder(s),
            db if db is not None else empty_placeholder(s))


@_layer_norm_bwd_op.register_fake
def _(dy, s, weight, mean, rstd, dresidual_out, has_bias, rms, backend, param_dtype=None):
    cols = s.shape[-1]
    pdtype = weight.dtype if weight is not None else (param_dtype or s.dtype)
    dw = s.new_empty((cols,), dtype=pdtype) if weight is not None else s.new_empty((0,))
    db = s.new_empty((cols,), dtype=pdtype) if has_bias else s.new_empty((0,))
    return s.new_empty(s.shape), dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms, backend = inputs
    y, res_out, mean, rstd = output
    s = res_out if residual is not None else x
    ctx.set_materialize_grads(False)  # y unused: no dy, and s (which the caller may edit) is not read
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.meta = (rms, None if bias is None else bias.dtype, residual is not None, backend)


def _fwd_backward(ctx, dy, dres_out, dmean, drstd):
    rms, bias_dtype, has_res, backend = ctx.meta
    if dy is None:  # y unused: only the sum's gradient (s is not read: the caller may have edited it)
        return dres_out, None, None, (dres_out if has_res else None), None, None, None
    s, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = torch.ops.fastlayers.layer_norm_bwd(
        dy, s, weight, mean, rstd, dres_out if has_res else None, bias_dtype is not None, rms, backend,
        weight.dtype if weight is not None else bias_dtype)
    return (ds, dw if weight is not None else None, db if bias_dtype is not None else None,
            ds if has_res else None, None, None, None)


_layer_norm_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
