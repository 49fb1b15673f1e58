"""ctypes bridge to libfastlayers_cuda.so (the C ABI of csrc/include/fastlayers.h).

Guarantees: nothing is loaded or queried at import; the library is opened on first use. Every entry
point is declared once, in SIGNATURES below -- the one table the Python side reads the ABI from.
`call` raises RuntimeError with fl_last_error()'s message when an entry point fails. Outputs and
workspaces are allocated by the callers (cuda_ops/*) with torch, so torch's caching allocator and
CUDA-graph capture see every byte.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
from pathlib import Path

import torch

LIB_NAME = "libfastlayers_cuda.so"

c_ptr = ctypes.c_void_p
c_i64 = ctypes.c_int64
c_i32 = ctypes.c_int32
c_u64 = ctypes.c_uint64
c_f32 = ctypes.c_float
c_size_p = ctypes.POINTER(ctypes.c_size_t)
c_str = ctypes.c_char_p

# Shared with fastlayers.h (fl_dtype, fl_activation).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# name -> (restype, argtypes). fl_status is c_i32.
SIGNATURES: dict[str, tuple] = {
    # ---------------------------------------------------------------- library
    "fl_last_error": (c_str, []),
    "fl_version": (c_str, []),
    "fl_build_info": (c_str, []),
    "fl_check_device": (c_i32, [c_i32]),
    # ---------------------------------------------------------------- layer norm
    "fl_layer_norm_fwd": (c_i32, [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_ptr, c_ptr, c_i64, c_ptr, c_i64,
                                  c_ptr, c_ptr, c_i64, c_i64, c_f32, c_i32, c_i32, c_i32, c_ptr]),
    "fl_layer_norm_bwd_workspace_size": (c_i32, [c_i64, c_i64, c_size_p]),
    "fl_layer_norm_bwd": (c_i32, [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_ptr, c_ptr, c_ptr, c_i64,
                                  c_ptr, c_i64, c_ptr, c_ptr, c_ptr, ctypes.c_size_t,
                                  c_i64, c_i64, c_i32, c_i32, c_i32, c_ptr]),
    "fl_layer_norm_launch_dims": (c_i32, [c_i64, c_i64, c_i32, c_i32, ctypes.POINTER(c_i64),
                                          ctypes.POINTER(c_i32)]),
    # ---------------------------------------------------------------- attention
    "fl_attention_fwd": (c_i32, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                 c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64, c_ptr,
                                 c_ptr, c_i64, c_i64, c_i64, c_i64, c_i64, c_i64, c_i64,
                                 c_f32, c_i32, c_f32, c_ptr, c_i32, c_i32, c_ptr]),
    "fl_attention_bwd_workspace_size": (c_i32, [c_i64, c_i64, c_i64, c_i64, c_i32, c_size_p]),
    "fl_attention_bwd": (c_i32, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                 c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                 c_ptr, c_i64, c_i64, c_i64, c_ptr, c_ptr, c_i64, c_i64,
                                 c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                 c_ptr, c_i64, c_i64, c_i64, c_ptr, ctypes.c_size_t,
                                 c_i64, c_i64, c_i64, c_i64, c_i64,
                                 c_f32, c_i32, c_f32, c_ptr, c_i32, c_i32, c_ptr]),
    "fl_attention_kvcache_workspace_size": (c_i32, [c_i64, c_i64, c_i64, c_i64, c_i64, c_size_p]),
    "fl_attention_kvcache_fwd": (c_i32, [c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                         c_ptr, c_i64, c_i64, c_i64, c_ptr, c_ptr,
                                         c_ptr, c_i64, c_i64, c_i64,
                                         c_ptr, c_i64, c_i64, c_i64, c_ptr, c_i64, c_i64, c_i64,
                                         c_ptr, c_i64, c_i64, c_i64, c_ptr, ctypes.c_size_t,
                                         c_i64, c_i64, c_i64, c_i64, c_i64,
                                         c_f32, c_i32, c_i32, c_ptr]),
    "fl_attention_grid": (c_i32, [c_i32, c_i64, c_i64, c_i64, c_i64, c_i64, c_i64, c_ptr]),
    # ---------------------------------------------------------------- linear
    "fl_linear_fwd": (c_i32, [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64,
                              c_i64, c_i64, c_i64, c_i32, c_i32, c_i32, c_ptr]),
    "fl_linear_bwd_dx": (c_i32, [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64,
                                 c_i64, c_i64, c_i64, c_i32, c_i32, c_ptr]),
    "fl_linear_bwd_dw": (c_i32, [c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64, c_ptr, c_i64, c_ptr,
                                 c_i64, c_i64, c_i64, c_i32, c_i32, c_ptr]),
    "fl_linear_grid": (c_i32, [c_i32, c_i64, c_i64, c_i64, c_i32, c_i32, ctypes.POINTER(c_i64)]),
}


def library_path() -> Path:
    override = os.environ.get("FASTLAYERS_CUDA_LIB")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "_lib" / LIB_NAME


@functools.lru_cache(maxsize=None)
def _load():
    """Returns (lib, None) or (None, reason). Never raises."""
    path = library_path()
    if not path.exists():
        return None, (f"{LIB_NAME} is not built ({path} missing): the install builds it when it finds "
                      f"nvcc and an NVIDIA driver; FASTLAYERS_BUILD_CUDA=1 pip install -e . (or "
                      f"`python setup.py build_cuda`) builds it anyway")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"{LIB_NAME} failed to load: {e}"
    missing = []
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    if missing:
        return None, f"{LIB_NAME} at {path} lacks {', '.join(missing)} (stale build? rebuild it)"
    return lib, None


def load_error() -> str | None:
    """Why the library cannot be used (None when it loaded)."""
    return _load()[1]


def lib():
    handle, err = _load()
    if handle is None:
        raise RuntimeError(f"fastlayers CUDA backend unavailable: {err}")
    return handle


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """fl_build_info() parsed: version, archs, and what each op publishes (e.g. head dims)."""
    return json.loads(lib().fl_build_info().decode())


@functools.lru_cache(maxsize=None)
def device_error(device_index: int) -> str | None:
    """None when the build can run on this device, else the reason (cached per device)."""
    status = lib().fl_check_device(device_index)
    return None if status == 0 else lib().fl_last_error().decode()


def call(name: str, *args) -> None:
    """Calls an entry point; raises RuntimeError carrying fl_last_error() on a non-zero status."""
    status = getattr(lib(), name)(*args)
    if status != 0:
        raise RuntimeError(f"{name} failed (status {status}): {lib().fl_last_error().decode()}")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The raw handle of the current stream on t's device (what every launch must use)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the CUDA backend takes float32/float16/bfloat16 tensors, got {t.dtype}") from None


# Kernel choice inside an entry point that has an mma.sync and an sm_90a (wgmma/TMA) kernel; values
# of FL_ATTENTION_IMPL_* / FL_LINEAR_IMPL_* in fastlayers.h. Read from an environment variable on
# every call and passed as an argument, so the library holds no state.
IMPL_CODES = {"auto": 0, "mma": 1, "wgmma": 2}


def impl_code(env_var: str, default: str) -> int:
    """The kernel choice `env_var` asks for ("auto", "mma" or "wgmma"; `default` when unset)."""
    name = os.environ.get(env_var, default).strip().lower() or default
    if name not in IMPL_CODES:
        raise ValueError(f"{env_var} must be one of {sorted(IMPL_CODES)}, got {name!r}")
    return IMPL_CODES[name]


def workspace_size(name: str, *args) -> int:
    out = ctypes.c_size_t(0)
    call(name, *args, ctypes.byref(out))
    return int(out.value)
