"""fl.linear: y = act(x @ weight.T + bias) + residual, with the epilogue fused into the GEMM.

    x: (..., K); weight: (N, K) as nn.Linear stores it; bias: (N,); residual: (..., N);
    activation in {None, "gelu" (erf), "gelu_tanh" (GPT-2's gelu_new), "relu"}.

The forward saves the pre-activation z = x @ W.T + b (in x's dtype) when an activation needs its
derivative: re-computing z in the backward would cost a full GEMM (2MNK FLOPs) to save one (M, N)
write + read; at transformer sizes (K >= 768) that GEMM costs far more than the bytes.
The backward forms dz = dy * act'(z) inside the gradient GEMMs' operand loads, and d(residual) = dy.

Same structure as ops/layer_norm.py: reference (fp32 math: the tests' oracle and the custom op's
torch launcher), the native "torch" backend, validation, eager path, custom ops for torch.compile.

Tensor policy (ops/_common.py): bias goes through vector_arg (kernels index it as contiguous);
x / residual / dy keep their outer strides (0 included) with a contiguous last dim; weight gets a
contiguous last dim. Under torch.autocast every floating input is cast to the autocast dtype, as
torch casts F.linear / addmm, and the backends run with autocast off. The eager "torch" backend is
torch's own composition (_torch_linear) under torch's autograd, and torch.compile traces that same
composition whenever the backend is "torch" whatever the shapes (torch_at_trace).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import OpBackends
from ._common import (as_rows, autocast_cast, autocast_dtype, autocast_off, check_like, check_tensor,
                      device_guard, empty_placeholder, needs_grad, request_for_trace, resolve_in_op,
                      no_autocast, torch_at_trace, vector_arg)

OP = "linear"
ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------- reference
def _act(z: Tensor, activation):
    if activation is None:
        return z
    if activation == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if activation == "relu":
        return torch.clamp_min(z, 0.0)
    raise AssertionError(activation)


def _act_grad(z: Tensor, activation):
    """d act / d z."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if activation == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    raise AssertionError(activation)


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear_ref(x, weight, bias, activation, residual, save_preact):
    """Reference forward on x (M, K): (y (M, N), preact (M, N) | None), fp32 math (fp64 for fp64):
    the tests' oracle and the custom op's torch launcher (the eager torch backend is _torch_linear)."""
    acc = _acc(x)
    z = x.to(acc) @ weight.to(acc).T                                                # (M, N)
    if bias is not None:
        z = z + bias.to(acc)
    y = _act(z, activation)
    if residual is not None:
        y = y + residual.to(acc)
    preact = z.to(x.dtype) if (save_preact and activation is not None) else None
    return y.to(x.dtype), preact


def linear_ref_bwd(dy, x, weight, preact, activation, has_bias, needs_dx, needs_dw):
    """Reference backward: (dx (M, K) | None, dweight (N, K) | None, dbias (N,) | None)."""
    acc = _acc(dy)
    dz = dy.to(acc)
    if activation is not None:
        dz = dz * _act_grad(preact.to(acc), activation)
    dx = (dz @ weight.to(acc)).to(x.dtype) if needs_dx else None
    dw = (dz.T @ x.to(acc)).to(weight.dtype) if needs_dw else None
    db = dz.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db


def _torch_linear(x, weight, bias, activation, residual):
    """The "torch" backend: torch's own calls (F.linear, F.gelu / relu, + residual) on x (..., K),
    differentiable by torch's autograd. Without a gradient to record, relu and the residual add run
    in place on F.linear's fresh output (no extra (M, N) buffer). With one they run out of place:
    relu's backward reads its output, which an in-place residual add would overwrite."""
    y = F.linear(x, weight, bias)                                                   # (..., N)
    grad = needs_grad(x, weight, bias, residual)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "relu":
        y = F.relu(y, inplace=not grad)
    if residual is not None:
        y = y + residual if grad else y.add_(residual)
    return y


class _TorchBackend:
    """The custom op's torch launcher (auto-fallback on CUDA tensors, opcheck): the reference."""
    linear_fwd = staticmethod(linear_ref)
    linear_bwd = staticmethod(linear_ref_bwd)

    @staticmethod
    def unsupported_reason(x, weight):
        return None


BACKENDS = OpBackends(
    OP,
    {"torch": lambda: _TorchBackend, "triton": "fastlayers.kernels.linear", "cuda": "fastlayers.cuda_ops.linear"},
    # Until GPU measurements rank them, the Triton kernels -- exercised in CI through the
    # interpreter -- come first.
    auto_order=("triton", "cuda"),
)


def _select(backend, x, weight):
    """x: (..., K); the kernel backends are asked about the (M, K) rows they would get (as_rows: a
    3-D x or a strided last dim must not make a kernel backend look unable to run the case)."""
    def case_reason(name, mod):
        if name == "torch":
            return None
        if x.dtype == torch.float64:
            return "float64 runs on the torch backend only"
        # Asked about the tensors the launcher will get: (M, K) rows and a weight with a contiguous
        # last dim (a transposed weight is copied at launch, never refused).
        return mod.unsupported_reason(as_rows(x, x.shape[-1]), _contiguous_last(weight))
    return BACKENDS.select(backend, x.device, case_reason)


def _autocast(x, weight, bias):
    """Under torch.autocast for x's device: (autocast dtype, the inputs cast as torch casts F.linear's:
    every floating one but float64, differentiably). Else (None, the inputs unchanged)."""
    dt = autocast_dtype(x) if isinstance(x, Tensor) else None
    if dt is None:
        return None, (x, weight, bias)
    return dt, tuple(autocast_cast(t, dt) if isinstance(t, Tensor) else t for t in (x, weight, bias))


def _contiguous_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- validation
def _validate(x, weight, bias, activation, residual):
    check_tensor(x, "x", min_dim=1)
    check_tensor(weight, "weight", dim=2)
    check_like(weight, "weight", x, "x")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: in-features mismatch: x.shape[-1] = {x.shape[-1]} but weight is (N, K) = "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_like(bias, "bias", x, "x", shape=(N,))
    if residual is not None:
        check_like(residual, "residual", x, "x", shape=(*x.shape[:-1], N))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- eager path
class _LinearFn(torch.autograd.Function):
    """Kernel backends with a gradient to record; x2 (M, K), r2 (M, N). Returns the launcher's own
    (M, N) output, never a view made here: the caller reshapes it, so in-place edits of the result
    (nn.ReLU(inplace=True), h += 1) work as after torch.nn.Linear."""

    @staticmethod
    def forward(ctx, x2, weight, bias, r2, activation, need_preact, name):
        y, preact = BACKENDS.module(name).linear_fwd(x2, weight, bias, activation, r2, need_preact)
        ctx.save_for_backward(x2, weight, preact)
        ctx.meta = (activation, bias is not None, r2 is not None, name)
        return y                                                                   # (M, N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, preact = ctx.saved_tensors
        activation, has_bias, has_res, name = ctx.meta
        N = weight.shape[0]
        dy2 = as_rows(dy, N)                   # keeps a broadcast row (stride 0), e.g. from y.sum(0)
        needs_dx = ctx.needs_input_grad[0]
        needs_dw = ctx.needs_input_grad[1]
        needs_db = has_bias and ctx.needs_input_grad[2]
        dx = dw = db = None
        if needs_dx or needs_dw or needs_db:  # only residual needs a gradient: no preact was saved
            dx, dw, db = BACKENDS.module(name).linear_bwd(dy2, x2, weight, preact, activation, needs_db,
                                                          needs_dx, needs_dw)
        dres = dy if (has_res and ctx.needs_input_grad[3]) else None
        return dx, dw, db, dres, None, None, None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
           residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """act(x @ weight.T + bias) + residual in one kernel. x: (..., K); weight: (N, K); bias: (N,);
    residual: (..., N); activation in {None, "gelu", "gelu_tanh", "relu"}. fp32 inputs run with
    TF32 dot products in the Triton backend. All inputs share one dtype (mixed dtypes raise, as in
    F.linear); under torch.autocast x, weight and bias are cast to the autocast dtype first, as
    F.linear's are, and the result is what `act(F.linear(x, weight, bias)) + residual` gives there:
    the autocast dtype, or the promoted dtype of a residual of another dtype (a float32 residual
    stream stays float32; that add is then not fused)."""
    dt, (x, weight, bias) = _autocast(x, weight, bias)
    if dt is None:
        if torch.compiler.is_compiling():
            return _compiled(x, weight, bias, activation, residual, backend)
        return _eager(x, weight, bias, activation, residual, backend)
    # Under autocast the result is what `act(F.linear(x, w, b)) + residual` gives: the GEMM in the
    # autocast dtype, then a plain add, which promotes -- a float32 residual stream stays float32 (the
    # add is fused only when the residual already has the autocast dtype).
    late = residual if (residual is not None and residual.dtype != dt) else None
    fused = None if late is not None else residual
    with autocast_off(x):
        if torch.compiler.is_compiling():
            y = _compiled(x, weight, bias, activation, fused, backend)
        else:
            y = _eager(x, weight, bias, activation, fused, backend)
    return y if late is None else y + late


def _eager(x, weight, bias, activation, residual, backend):
    _validate(x, weight, bias, activation, residual)
    name = _select(backend, x, weight)
    BACKENDS.record(name)
    if name == "torch":
        return _torch_linear(x, weight, bias, activation, residual)
    weight = _contiguous_last(weight)
    bias = vector_arg(bias)
    K, N = x.shape[-1], weight.shape[0]
    out_shape = (*x.shape[:-1], N)
    x2 = as_rows(x, K)                                                             # (M, K)
    r2 = as_rows(residual, N) if residual is not None else None                    # (M, N)
    with device_guard(x):
        if needs_grad(x, weight, bias, residual):
            need_preact = activation is not None and needs_grad(x, weight, bias)
            y = _LinearFn.apply(x2, weight, bias, r2, activation, need_preact, name)
        else:
            y, _ = BACKENDS.module(name).linear_fwd(x2, weight, bias, activation, r2, False)
    return y.view(out_shape)


# ----------------------------------------------------------------------------- torch.compile path
def _compiled(x, weight, bias, activation, residual, backend):
    _validate(x, weight, bias, activation, residual)
    name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
    if torch_at_trace(name, x.device):
        return _torch_linear(x, weight, bias, activation, residual)  # inductor sees F.linear itself
    bias = vector_arg(bias)
    save_preact = activation is not None and needs_grad(x, weight, bias)
    y, _ = torch.ops.fastlayers.linear_fwd(x, weight, bias, residual, activation, save_preact, name)
    return y


@torch.library.custom_op("fastlayers::linear_fwd", mutates_args=())
def _linear_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                   activation: Optional[str], save_preact: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (y, preact); preact is a 0-element tensor when not saved. backend: a name or "" (auto)."""
    K, N = x.shape[-1], weight.shape[0]
    weight = _contiguous_last(weight)
    bias = vector_arg(bias)
    backend = resolve_in_op(backend, lambda b: _select(b, x, weight))
    with device_guard(x), no_autocast(x):
        y, preact = BACKENDS.module(backend).linear_fwd(as_rows(x, K), weight, bias, activation,
                                                        as_rows(residual, N) if residual is not None else None,
                                                        save_preact)
    out_shape = (*x.shape[:-1], N)
    return y.view(out_shape), (preact.view(out_shape) if preact is not None else empty_placeholder(x))


@_linear_fwd_op.register_fake
def _(x, weight, bias, residual, activation, save_preact, backend):
    out_shape = (*x.shape[:-1], weight.shape[0])
    preact = x.new_empty(out_shape) if (save_preact and activation is not None) else x.new_empty((0,))
    return x.new_empty(out_shape), preact


@torch.library.custom_op("fastlayers::linear_bwd", mutates_args=())
def _linear_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, preact: Optional[Tensor], activation: Optional[str],
                   has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    K, N = x.shape[-1], weight.shape[0]
    weight = _contiguous_last(weight)
    backend = resolve_in_op(backend, lambda b: _select(b, x, weight))
    with device_guard(x), no_autocast(x):
        dx, dw, db = BACKENDS.module(backend).linear_bwd(
            as_rows(dy, N), as_rows(x, K), weight, as_rows(preact, N) if activation is not None else None,
            activation, has_bias, True, True)
    return dx.view(x.shape), dw, (db if db is not None else empty_placeholder(x))


@_linear_bwd_op.register_fake
def _(dy, x, weight, preact, activation, has_bias, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), (weight.new_empty((weight.shape[0],))
                                                                  if has_bias else x.new_empty((0,)))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_preact, backend = inputs
    y, preact = output
    ctx.save_for_backward(x, weight, preact if activation is not None else None)
    ctx.meta = (activation, bias is not None, residual is not None, backend)


def _linear_backward(ctx, dy, dpreact):
    x, weight, preact = ctx.saved_tensors
    activation, has_bias, has_res, backend = ctx.meta
    if not any(ctx.needs_input_grad[:3]):  # only residual needs a gradient: no preact was saved
        return None, None, None, (dy if has_res else None), None, None, None
    dx, dw, db = torch.ops.fastlayers.linear_bwd(dy, x, weight, preact, activation, has_bias, backend)
    return dx, dw, (db if has_bias else None), (dy if has_res else None), None, None, None


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
