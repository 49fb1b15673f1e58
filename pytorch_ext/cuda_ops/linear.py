"""CUDA-backend launchers of the linear layer with a fused epilogue (csrc/linear/).

Guarantees: the same functions and semantics as fastlayers.kernels.linear (see the "linear" launcher
interface): linear_fwd, linear_bwd, unsupported_reason. fp16/bf16 only (tensor cores, fp32
accumulation); x, weight and every other tensor share one dtype. Outputs are allocated here with
torch.empty on the input's device; kernels run on its current stream. Inputs need a contiguous last
dim; row strides are passed through, 0 included (a broadcast row); 16-byte aligned bases and rows
take the cp.async / TMA paths, anything else (a storage offset, an odd row stride) a slower exact
one -- the C side checks every pointer and stride itself. Rows that overlap (0 < row stride < row
length, e.g. from Tensor.unfold) are copied here: the C ABI refuses them. bias is (N,) contiguous:
ops/linear.py copies any other layout once at the op boundary (vector_arg), and this bridge, like
the Triton launchers, refuses a view with the same message. Callers (ops/linear.py) validate
shapes and dtypes; the C ABI re-checks sizes (fl_build_info()["linear"]["max_dim"] is its limit,
reported by unsupported_reason) and reports errors as RuntimeError. Launch grids are planned in C
(fl_linear_grid, which the entry points use themselves; CPU tests query it).
The forward kernel is chosen in C from FASTLAYERS_CUDA_GEMM, read on every call and passed as
fl_linear_fwd's `impl` argument (no state in the library): "mma" (default: the mma.sync kernel),
"auto" (the sm_90a wgmma/TMA kernel on an sm_90 device when M >= 64, K >= 1 and x / weight are
16-byte aligned with row strides multiples of 8, else the mma.sync kernel) or "wgmma" (any M; a
case it cannot run raises RuntimeError with the reason, never a silent switch) -- for A/B
benchmarks (benchmarks/linear_gemm_ab.py). The default becomes "auto" once the wgmma kernel has
passed its GPU tests: it was written and compiled without a GPU (benchmarks/NOTES.md). The backward
always runs mma.sync.
The backward forms dz = dy * act'(preact) inside both gradient GEMMs' operand loads and sums dbias
in the dweight GEMM. Only when dbias is needed without dweight (a frozen weight) is dbias computed
here with torch ops (one pass over dy and preact), since there is no GEMM to fuse it into.
"""
from __future__ import annotations

import math

import torch

from .. import _cuda

_TORCH_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


IMPL_ENV = "FASTLAYERS_CUDA_GEMM"
_IMPL_CODES = _cuda.IMPL_CODES  # FL_LINEAR_IMPL_* of fastlayers.h
DEFAULT_IMPL = "mma"  # until the sm_90a kernel has run on a GPU; then "auto"


def forward_impl() -> int:
    """The forward kernel FASTLAYERS_CUDA_GEMM asks for, as the C code of the entry point's impl argument."""
    return _cuda.impl_code(IMPL_ENV, DEFAULT_IMPL)


def _info() -> dict:
    return _cuda.build_info()["linear"]


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the CUDA backend cannot run x @ weight.T (+ epilogue), or None when it can."""
    if not x.is_cuda:
        return f"the CUDA backend takes CUDA tensors, got a tensor on {x.device}"
    err = _cuda.load_error()
    if err is not None:
        return err
    dtypes = tuple(_TORCH_DTYPE_NAMES[n] for n in _info()["dtypes"])
    if x.dtype not in dtypes:
        return f"the CUDA linear kernels take {'/'.join(_info()['dtypes'])}, got {x.dtype}"
    if weight.dtype != x.dtype:
        return f"the CUDA linear kernels need weight.dtype == x.dtype, got {weight.dtype} and {x.dtype}"
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        return (f"the CUDA linear kernels need a contiguous last dim, got x.stride() = {x.stride()}, "
                f"weight.stride() = {weight.stride()}")
    max_dim = _info().get("max_dim")
    if max_dim is not None:
        for name, size in (("M (rows of x)", math.prod(x.shape[:-1])), ("N (out_features)", weight.shape[0]),
                           ("K (in_features)", weight.shape[1])):
            if size > max_dim:
                return f"the CUDA linear kernels take sizes up to {max_dim}, got {name} = {size}"
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    derr = _cuda.device_error(idx)
    if derr is not None:
        return derr
    major, minor = _capability(idx)
    if major * 10 + minor < _info()["min_arch"]:
        return f"the CUDA linear kernels need compute capability >= {_info()['min_arch']}, got {major}.{minor}"
    return None


_CAPS: dict[int, tuple[int, int]] = {}


def _capability(idx: int) -> tuple[int, int]:
    if idx not in _CAPS:
        _CAPS[idx] = torch.cuda.get_device_capability(idx)
    return _CAPS[idx]


def _act_code(activation) -> int:
    try:
        return _cuda.ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"activation: expected one of {tuple(_cuda.ACTIVATION_CODES)}, got {activation!r}") from None


def _call(name: str, device: torch.device, *args) -> None:
    # Kernels launch on the current device; make it the tensors' one (their stream lives there).
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _cuda.call(name, *args)
    else:
        _cuda.call(name, *args)


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _check_inner(t: torch.Tensor | None, name: str) -> None:
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: the CUDA linear kernels need stride(1) == 1, got strides {t.stride()}")


def _abi_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t (rows, cols) as the C ABI takes it: row stride 0 (broadcast) or >= cols; overlapping rows
    (0 < stride < cols, a valid torch view) are copied."""
    if t is None or t.shape[0] <= 1:
        return t
    ld = t.stride(0)
    return t if ld == 0 or ld >= t.shape[1] else t.contiguous()


def _check_bias(bias: torch.Tensor | None, N: int) -> None:
    # Same contract and message as the Triton launchers (fastlayers.kernels.linear._check_bias).
    if bias is None:
        return
    if tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape {(N,)}, got {tuple(bias.shape)}")
    if N > 1 and bias.stride(0) != 1:
        raise ValueError(f"bias: expected a contiguous (N,) tensor (stride 1; the op boundary copies "
                         f"views with vector_arg), got stride {bias.stride(0)}")


def linear_fwd(x, weight, bias, activation, residual, save_preact: bool):
    """-> (y (M, N), preact (M, N) | None); y = act(x @ weight.T + bias) + residual."""
    M, K = x.shape  # (M, K), x.stride(1) == 1
    N = weight.shape[0]  # weight (N, K)
    _check_inner(x, "x")
    _check_inner(weight, "weight")
    _check_inner(residual, "residual")
    _check_bias(bias, N)
    x, weight, residual = _abi_rows(x), _abi_rows(weight), _abi_rows(residual)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)  # (M, N)
    preact = torch.empty_like(y) if (save_preact and activation is not None) else None  # (M, N)
    _call("fl_linear_fwd", x.device,
          _cuda.ptr(x), x.stride(0), _cuda.ptr(weight), weight.stride(0), _cuda.ptr(bias),
          _cuda.ptr(residual), _row_stride(residual), _cuda.ptr(y), y.stride(0),
          _cuda.ptr(preact), _row_stride(preact), M, N, K, _act_code(activation),
          forward_impl(), _cuda.dtype_code(x), _cuda.stream(x))
    return y, preact


def _bias_grad_only(dy, preact, activation, dtype):
    """dbias without a dweight GEMM to fuse it into: torch's own act' backward, fp32 column sums."""
    if activation is None:
        dz = dy
    elif activation == "relu":
        dz = torch.ops.aten.threshold_backward(dy, preact, 0)
    else:
        dz = torch.ops.aten.gelu_backward(dy, preact, approximate="tanh" if activation == "gelu_tanh" else "none")
    return dz.sum(0, dtype=torch.float32).to(dtype)  # (N,)


def linear_bwd(dy, x, weight, preact, activation, has_bias: bool, needs_dx: bool, needs_dw: bool):
    """-> (dx (M, K) | None, dweight (N, K) | None, dbias (N,) | None), dz = dy * act'(preact)."""
    M, N = dy.shape  # (M, N), dy.stride(1) == 1
    K = x.shape[1]  # x (M, K)
    act = _act_code(activation)
    if activation is not None and preact is None:
        raise ValueError(f"preact: required for activation {activation!r}, got None")
    for t, name in ((dy, "dy"), (x, "x"), (weight, "weight"), (preact, "preact")):
        _check_inner(t, name)
    dy, x, weight, preact = _abi_rows(dy), _abi_rows(x), _abi_rows(weight), _abi_rows(preact)
    dx = dweight = dbias = None
    if needs_dx:
        dx = torch.empty((M, K), dtype=x.dtype, device=dy.device)  # (M, K)
        _call("fl_linear_bwd_dx", dy.device,
              _cuda.ptr(dy), dy.stride(0), _cuda.ptr(preact), _row_stride(preact),
              _cuda.ptr(weight), weight.stride(0), _cuda.ptr(dx), dx.stride(0),
              M, N, K, act, _cuda.dtype_code(dy), _cuda.stream(dy))
    if needs_dw:
        dweight = torch.empty((N, K), dtype=weight.dtype, device=dy.device)  # (N, K)
        dbias = torch.empty((N,), dtype=weight.dtype, device=dy.device) if has_bias else None  # (N,)
        _call("fl_linear_bwd_dw", dy.device,
              _cuda.ptr(dy), dy.stride(0), _cuda.ptr(preact), _row_stride(preact),
              _cuda.ptr(x), x.stride(0), _cuda.ptr(dweight), dweight.stride(0), _cuda.ptr(dbias),
              M, N, K, act, _cuda.dtype_code(dy), _cuda.stream(dy))
    elif has_bias:
        dbias = _bias_grad_only(dy, preact, activation, weight.dtype)
    return dx, dweight, dbias
