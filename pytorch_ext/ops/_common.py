"""What every op module shares: argument checks that name the argument, and the trace-time
backend resolution used under torch.compile.

The op pattern (layer_norm.py is the model; attention.py and linear.py follow it):
  1. reference implementation (fp32 math) = the "torch" backend and the test oracle;
  2. validation once, at the public function;
  3. eager: resolve the backend, call its launcher directly (through one autograd.Function only
     when a gradient is needed) -- the custom op's ~20-50 us dispatch cost is not paid in eager;
  4. torch.compile: the same public function calls the torch.library custom op, whose schema, fake
     implementation and registered autograd make it traceable; the backend request is fixed at trace
     time and resolved inside the op on its real inputs (shapes may be symbolic while tracing).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from ..backends import requested, use_backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(d: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how error messages spell a dtype."""
    return str(d).replace("torch.", "")


def check_tensor(t, arg: str, *, dtypes=FLOAT_DTYPES, min_dim: int | None = None, dim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{arg}: expected dtype in ({names}), got {dtype_name(t.dtype)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{arg}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{arg}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_like(t, arg: str, ref: torch.Tensor, ref_arg: str, *, shape=None, same_dtype: bool = True):
    """t must be a tensor on ref's device (and of ref's dtype), of `shape` when given."""
    check_tensor(t, arg, dtypes=FLOAT_DTYPES if same_dtype else (t.dtype,))
    if t.device != ref.device:
        raise ValueError(f"{arg}: expected a tensor on {ref_arg}'s device {ref.device}, got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{arg}: expected {ref_arg}'s dtype {dtype_name(ref.dtype)}, "
                        f"got {dtype_name(t.dtype)} (mixed dtypes are not supported)")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{arg}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any outer strides but need stride 1 in the last dimension."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def as_rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """(..., cols) -> (rows, cols) with stride(1) == 1; a view whenever the layout allows."""
    t = last_dim_contiguous(t)
    t2 = t.reshape(math.prod(t.shape[:-1]), cols)  # not -1: ambiguous when cols == 0
    if cols == 1 and t2.stride(1) != 1:  # a size-1 dim may carry any stride
        t2 = t2.as_strided(t2.shape, (t2.stride(0), 1))
    return t2


def host_readable(t: torch.Tensor) -> bool:
    """Reading t on the host is allowed: not while torch.compile traces, not while a CUDA graph is
    captured (where a device read would sync or break the capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def empty_placeholder(like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: absent outputs are 0-element tensors."""
    return like.new_empty((0,))


def request_for_trace(backend) -> str:
    """torch.compile path: the explicit backend request in force at trace time (argument, then
    use_backend block, then FASTLAYERS_BACKEND), or "" for the automatic choice. The custom ops
    resolve it against their real inputs at run time (resolve_in_op): while tracing, shapes may be
    symbolic (dynamic sequence lengths), which assume_constant_result cannot take as arguments."""
    return requested(backend) or ""


# What torch.compiler.assume_constant_result(fn) does (torch/_dynamo/decorators.py), set by hand: the
# decorator imports torch._dynamo (~3 s) at `import fastlayers`. tests/test_import.py checks that
# the decorator still sets exactly this attribute, so a torch upgrade that changes it fails loudly.
request_for_trace._dynamo_marked_constant = True


def torch_at_trace(request: str, device: torch.device) -> bool:
    """torch.compile path: True when the backend is "torch" whatever the shapes -- an explicit
    "torch" request, or the automatic choice for a non-CUDA tensor. The public function then traces
    the native torch composition itself (inductor sees F.layer_norm, SDPA, F.linear) instead of
    the custom op, which stays for the kernel backends."""
    return request == "torch" or (request == "" and device.type != "cuda")


# ----------------------------------------------------------------------------- tensor policy
def vector_arg(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The policy for every 1-D tensor a kernel reads (norm weight/bias, linear bias, cache_seqlens):
    kernels index it as contiguous, so any other layout -- stride 2, stride 0 (expanded), a column
    of a matrix -- is copied here, once, at the op boundary. A storage offset needs no copy
    (data_ptr() includes it). Multi-dimensional tensors keep their outer strides (kernels take
    them, 0 included) and get a contiguous last dimension (last_dim_contiguous)."""
    if t is None or t.dim() != 1 or t.shape[0] <= 1 or t.stride(0) == 1:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------- autocast
def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The lower-precision dtype of the autocast region in force for t's device type, or None when
    autocast is off there (torch.is_autocast_enabled / get_autocast_dtype, torch >= 2.4)."""
    dev = t.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Casts t as autocast casts an op's inputs: floating tensors other than float64 go to dtype
    (differentiably); None, float64 and integer/bool tensors pass unchanged."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def no_autocast(t: torch.Tensor):
    """autocast_off(t) when autocast is on for t's device type, else a no-op context. Custom op
    bodies run with the caller's autocast state: the public function already cast the inputs, so
    the backend's own torch calls (the reference's fp32 math) must not be recast."""
    return autocast_off(t) if autocast_dtype(t) is not None else contextlib.nullcontext()


def autocast_off(t: torch.Tensor):
    """A context that disables autocast for t's device type: once an op has cast its inputs, its
    backends (and the reference's fp32 matmuls) must run at the dtypes they were given."""
    return torch.autocast(t.device.type, enabled=False)


def resolve_in_op(request: str, select) -> str:
    """Inside a custom op: the backend that runs this call. request "" = automatic; a name is an
    explicit request (BackendUnavailableError when it cannot run the case). select(None) is the op's
    _select bound to the op's real inputs."""
    with use_backend(request or None):  # None on the stack: automatic, the environment not consulted
        return select(None)


def device_guard(t: torch.Tensor):
    """Makes t's GPU the current device for the call (kernels launch on the current device; a
    tensor on another GPU would otherwise meet a stream of the wrong device)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
