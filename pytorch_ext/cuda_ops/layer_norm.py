"""CUDA-backend launchers of layer norm (LayerNorm / RMSNorm with fused residual add).

Guarantees: the same functions and semantics as fastlayers.kernels.layer_norm (see the "layer norm"
launcher interface); outputs and the backward workspace are allocated here with torch.empty on the
input's device and the kernels run on its current stream (csrc/layer_norm/layer_norm.cu).
Every tensor of a call must share the input's dtype (the C ABI takes one dtype code): a float32
weight with bfloat16 activations raises TypeError here -- cast it at the op boundary.
Inputs must have a contiguous last dim; row strides are passed through. Callers (ops/layer_norm.py)
validate shapes and dtypes; the C ABI re-checks sizes and reports errors as RuntimeError.
"""
from __future__ import annotations

import torch

from .. import _cuda

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the CUDA backend cannot normalise x, or None when it can."""
    if not x.is_cuda:
        return f"the CUDA backend takes CUDA tensors, got a tensor on {x.device}"
    if x.dtype not in _DTYPES:
        return f"the CUDA backend takes float32/float16/bfloat16, got {x.dtype}"
    err = _cuda.load_error()
    if err is not None:
        return err
    max_cols = _cuda.build_info()["layer_norm"]["max_cols"]
    cols = x.shape[-1] if x.dim() else 1
    if not 1 <= cols <= max_cols:
        return f"the CUDA backend normalises 1 to {max_cols} columns, got {cols}"
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _cuda.device_error(idx)


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _check_same_dtype(ref: torch.Tensor, **tensors) -> None:
    # The C ABI takes one dtype code for every tensor of a call.
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"layer norm (CUDA backend): {name} must have dtype {ref.dtype} like the input, "
                            f"got {t.dtype}")


def layer_norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    """-> (y, residual_out, mean, rstd); see the launcher interface in the module docstring."""
    rows, cols = x.shape  # (rows, cols), x.stride(1) == 1
    _check_same_dtype(x, residual=residual, weight=weight, bias=bias)
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)  # (rows, cols)
    residual_out = torch.empty_like(y) if residual is not None else None  # (rows, cols)
    mean = None if rms else torch.empty((rows,), dtype=torch.float32, device=x.device)  # (rows,)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)  # (rows,)
    _cuda.call("fl_layer_norm_fwd",
               _cuda.ptr(x), x.stride(0), _cuda.ptr(residual), _row_stride(residual),
               _cuda.ptr(weight), _cuda.ptr(bias), _cuda.ptr(y), y.stride(0),
               _cuda.ptr(residual_out), _row_stride(residual_out), _cuda.ptr(mean), _cuda.ptr(rstd),
               rows, cols, float(eps), int(bool(rms)), _cuda.dtype_code(x), _cuda.stream(x))
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, has_bias: bool, rms: bool):
    """-> (ds, dweight, dbias); dweight/dbias reduced deterministically in the kernel library."""
    rows, cols = s.shape  # (rows, cols), s.stride(1) == 1
    _check_same_dtype(s, dy=dy, weight=weight, dresidual_out=dresidual_out)
    ds = torch.empty((rows, cols), dtype=s.dtype, device=s.device)  # (rows, cols)
    dweight = torch.empty((cols,), dtype=weight.dtype, device=s.device) if weight is not None else None
    dbias = torch.empty((cols,), dtype=s.dtype, device=s.device) if has_bias else None
    nbytes = _cuda.workspace_size("fl_layer_norm_bwd_workspace_size", rows, cols)
    workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=s.device)  # fp32 partials
    _cuda.call("fl_layer_norm_bwd",
               _cuda.ptr(dy), dy.stride(0), _cuda.ptr(s), s.stride(0), _cuda.ptr(weight),
               _cuda.ptr(mean), _cuda.ptr(rstd), _cuda.ptr(dresidual_out), _row_stride(dresidual_out),
               _cuda.ptr(ds), ds.stride(0), _cuda.ptr(dweight), _cuda.ptr(dbias),
               _cuda.ptr(workspace), nbytes, rows, cols, int(bool(rms)), _cuda.dtype_code(s), _cuda.stream(s))
    return ds, dweight, dbias
