"""CUDA-backend launchers of layer norm (LayerNorm / RMSNorm with fused residual add).

Guarantees: the same functions and semantics as fastlayers.kernels.layer_norm (see the "layer norm"
launcher interface); outputs and the backward workspace are allocated here with torch.empty on the
input's device and the kernels run on its current stream (csrc/layer_norm/layer_norm.cu).
Activations (x, residual, dy, dresidual_out) share one dtype; weight and bias have that dtype or
float32 (the C ABI's param_dtype: fp16/bf16 activations with fp32 parameters); weight and bias are
contiguous (the op boundary's vector_arg). Inputs have a contiguous last dim; row strides (0
included) are passed through. Callers (ops/layer_norm.py) validate shapes and dtypes; the C ABI
re-checks sizes and reports errors as RuntimeError. launch_dims() reports the grids the library
launches (tests check them against the CUDA limits on machines without a GPU).
"""
from __future__ import annotations

import ctypes

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


def _param_code(x: torch.Tensor, weight, bias) -> int:
    """The C ABI's param_dtype: the parameters' dtype code (x's when there are none)."""
    return _cuda.dtype_code(weight if weight is not None else bias if bias is not None else x)


def launch_dims(rows: int, cols: int, backward: bool, vector_width: int) -> list[tuple[tuple, tuple]]:
    """[(grid, block)] of the launches the library makes for (rows, cols): forward, or backward with
    a parameter gradient; vector_width 1, or 16 / element size on the 16-byte aligned path."""
    dims = (ctypes.c_int64 * 18)()
    count = ctypes.c_int32(0)
    _cuda.call("fl_layer_norm_launch_dims", rows, cols, int(backward), vector_width, dims, ctypes.byref(count))
    return [(tuple(dims[6 * i:6 * i + 3]), tuple(dims[6 * i + 3:6 * i + 6])) for i in range(count.value)]


def layer_norm_fwd(x, residual, weight, bias, eps: float, rms: bool):
    """-> (y, residual_out, mean, rstd); see the launcher interface in the module docstring."""
    rows, cols = x.shape  # (rows, cols), x.stride(1) == 1
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)  # (rows, cols)
    residual_out = torch.empty_like(y) if residual is not None else None  # (rows, cols)
    mean = None if rms else torch.empty((rows,), dtype=torch.float32, device=x.device)  # (rows,)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)  # (rows,)
    _cuda.call("fl_layer_norm_fwd",
               _cuda.ptr(x), x.stride(0), _cuda.ptr(residual), _row_stride(residual),
               _cuda.ptr(weight), _cuda.ptr(bias), _cuda.ptr(y), y.stride(0),
               _cuda.ptr(residual_out), _row_stride(residual_out), _cuda.ptr(mean), _cuda.ptr(rstd),
               rows, cols, float(eps), int(bool(rms)), _cuda.dtype_code(x), _param_code(x, weight, bias),
               _cuda.stream(x))
    return y, residual_out, mean, rstd


def layer_norm_bwd(dy, s, weight, mean, rstd, dresidual_out, has_bias: bool, rms: bool, *, param_dtype=None):
    """-> (ds, dweight, dbias); dweight/dbias in weight's dtype, else param_dtype, else s's, reduced
    deterministically in the kernel library."""
    rows, cols = s.shape  # (rows, cols), s.stride(1) == 1
    pdtype = weight.dtype if weight is not None else (param_dtype or s.dtype)
    ds = torch.empty((rows, cols), dtype=s.dtype, device=s.device)  # (rows, cols)
    dweight = torch.empty((cols,), dtype=pdtype, device=s.device) if weight is not None else None
    dbias = torch.empty((cols,), dtype=pdtype, device=s.device) if has_bias else None
    nbytes = _cuda.workspace_size("fl_layer_norm_bwd_workspace_size", rows, cols)
    workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=s.device)  # fp32 partials
    _cuda.call("fl_layer_norm_bwd",
               _cuda.ptr(dy), dy.stride(0), _cuda.ptr(s), s.stride(0), _cuda.ptr(weight),
               _cuda.ptr(mean), _cuda.ptr(rstd), _cuda.ptr(dresidual_out), _row_stride(dresidual_out),
               _cuda.ptr(ds), ds.stride(0), _cuda.ptr(dweight), _cuda.ptr(dbias),
               _cuda.ptr(workspace), nbytes, rows, cols, int(bool(rms)), _cuda.dtype_code(s),
               _cuda.DTYPE_CODES[pdtype], _cuda.stream(s))
    return ds, dweight, dbias
