"""CUDA-backend launchers of attention (forward, backward, KV-cache decode).

Guarantees: the same functions and semantics as fastlayers.kernels.attention (the "attention"
launcher interface in the brief): q (B, Lq, H, D), k/v (B, Lk, H, D), bottom-right causal,
key_padding_mask (B, Lk) bool (True = attend), the counter-based philox dropout mask shared by every
backend, lse (B, H, Lq) fp32 with +inf for rows that attend no key.  Outputs and workspaces are
allocated here with torch.empty on the input's device; kernels run on its current stream
(csrc/attention/*.cu).  Strides are passed through as they are: the kernels need a contiguous head
dim, 16-byte aligned rows and (b, l, h) strides that are multiples of 8 elements --
unsupported_reason says so for tensors that break this (no hidden copies).  The supported head dims
come from the library's build info, never from a constant here.
The forward kernel is chosen in C from FASTLAYERS_CUDA_ATTENTION, read on every call and passed as an
argument (no state in the library): "mma" (default: the mma.sync kernel), "auto" (the sm_90a
wgmma/TMA kernel on an sm_90 device for D 64/128 without dropout, else the mma.sync kernel) or
"wgmma" (an explicit "wgmma" that cannot run the case raises RuntimeError with the reason, never a
silent switch). The default becomes "auto" once the wgmma kernel has passed its GPU tests: it was
written and compiled without a GPU (benchmarks/NOTES.md).
"""
from __future__ import annotations


import torch

from .. import _cuda

_DTYPES = (torch.float16, torch.bfloat16)


IMPL_ENV = "FASTLAYERS_CUDA_ATTENTION"
_IMPL_CODES = _cuda.IMPL_CODES  # FL_ATTENTION_IMPL_* of fastlayers.h
DEFAULT_IMPL = "mma"  # until the sm_90a kernel has run on a GPU; then "auto"


def forward_impl() -> int:
    """The forward kernel FASTLAYERS_CUDA_ATTENTION asks for, as the C code of the entry point's impl argument."""
    return _cuda.impl_code(IMPL_ENV, DEFAULT_IMPL)


def supported_head_dims() -> tuple[int, ...]:
    """Head dims the built library compiles (fl_build_info()["attention_head_dims"])."""
    return tuple(_cuda.build_info().get("attention_head_dims", ()))


def _layout_reason(name: str, t: torch.Tensor) -> str | None:
    if t.dim() != 4:
        return f"{name} must be 4-D (B, L, H, D), got shape {tuple(t.shape)}"
    if t.stride(3) != 1:
        return f"{name} must have a contiguous head dim (stride(3) == 1), got strides {t.stride()}"
    if any(s % 8 for s in t.stride()[:3]) or t.data_ptr() % 16:
        return (f"the CUDA attention kernels load 16-byte rows: {name}'s (b, l, h) strides must be "
                f"multiples of 8 and its data 16-byte aligned, got strides {t.stride()}")
    return None


def _common_reason(q: torch.Tensor, tensors) -> str | None:
    if not q.is_cuda:
        return f"the CUDA backend takes CUDA tensors, got a tensor on {q.device}"
    if q.dtype not in _DTYPES:
        return f"the CUDA attention kernels take float16/bfloat16, got {q.dtype}"
    err = _cuda.load_error()
    if err is not None:
        return err
    idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
    err = _cuda.device_error(idx)
    if err is not None:
        return err
    dims = supported_head_dims()
    if q.shape[-1] not in dims:
        return f"the CUDA attention kernels take head dims {list(dims)}, got {q.shape[-1]}"
    for name, t in tensors:
        if t.dtype != q.dtype:
            return f"{name} must have q's dtype {q.dtype}, got {t.dtype}"
        reason = _layout_reason(name, t)
        if reason is not None:
            return reason
    return None


def unsupported_reason(q, k, v, causal, key_padding_mask, dropout_p) -> str | None:
    """Why the CUDA backend cannot run this attention, or None when it can."""
    reason = _common_reason(q, (("q", q), ("k", k), ("v", v)))
    if reason is not None:
        return reason
    if key_padding_mask is not None and key_padding_mask.dtype not in (torch.bool, torch.uint8):
        return f"key_padding_mask must be bool or uint8, got {key_padding_mask.dtype}"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p must be in [0, 1), got {dropout_p}"
    return None


def kvcache_unsupported_reason(q, k_cache, v_cache=None, k_new=None, v_new=None) -> str | None:
    """Why the CUDA backend cannot run attention_with_kvcache, or None when it can (every tensor's
    dtype, device, strides and alignment are checked, so auto selection never meets a C-side error)."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new))
    return _common_reason(q, tuple((n, t) for n, t in named if t is not None))


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _mask_args(key_padding_mask: torch.Tensor | None):
    if key_padding_mask is None:
        return 0, 0, 0
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes (0 / 1): no copy
    return _cuda.ptr(m), m.stride(0), m.stride(1)


def attention_fwd(q, k, v, key_padding_mask, softmax_scale: float, causal: bool, dropout_p: float,
                  seed: int, offset: int):
    """-> (o (B, Lq, H, D) q.dtype, lse (B, H, Lq) fp32)."""
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    Lk = k.shape[1]  # k, v (B, Lk, H, D)
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    kpm, kpm_b, kpm_l = _mask_args(key_padding_mask)
    _cuda.call("fl_attention_fwd",
               _cuda.ptr(q), *_strides(q), _cuda.ptr(k), *_strides(k), _cuda.ptr(v), *_strides(v),
               _cuda.ptr(o), *_strides(o), _cuda.ptr(lse), kpm, kpm_b, kpm_l,
               B, Lq, Lk, H, D, float(softmax_scale), int(bool(causal)), float(dropout_p),
               int(seed), int(offset), forward_impl(), _cuda.dtype_code(q), _cuda.stream(q))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, seed, offset,
                  deterministic: bool):
    """-> (dq, dk, dv) in q.dtype with the shapes of q, k, v (contiguous)."""
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    Lk = k.shape[1]  # (B, Lk, H, D)
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    dk = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    dv = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    if do.stride(-1) != 1 or any(s % 8 for s in do.stride()[:3]) or do.data_ptr() % 16:
        # dO comes from autograd in whatever layout the next op produced; the kernel needs 16-byte rows.
        do = do.contiguous()
    lse = lse.contiguous()  # (B, H, Lq) fp32
    nbytes = _cuda.workspace_size("fl_attention_bwd_workspace_size", B, Lq, H, D, int(bool(deterministic)))
    workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=q.device)  # delta (+ fp32 dq)
    kpm, kpm_b, kpm_l = _mask_args(key_padding_mask)
    _cuda.call("fl_attention_bwd",
               _cuda.ptr(do), *_strides(do), _cuda.ptr(q), *_strides(q), _cuda.ptr(k), *_strides(k),
               _cuda.ptr(v), *_strides(v), _cuda.ptr(o), *_strides(o), _cuda.ptr(lse), kpm, kpm_b, kpm_l,
               _cuda.ptr(dq), *_strides(dq), _cuda.ptr(dk), *_strides(dk), _cuda.ptr(dv), *_strides(dv),
               _cuda.ptr(workspace), nbytes, B, Lq, Lk, H, D, float(softmax_scale), int(bool(causal)),
               float(dropout_p), int(seed), int(offset), int(bool(deterministic)), _cuda.dtype_code(q),
               _cuda.stream(q))
    return dq, dk, dv


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale: float,
                           causal: bool):
    """-> o (B, Lq, H, D); writes k_new / v_new into the caches in place (see the module docstring)."""
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    Lmax = k_cache.shape[1]  # k_cache, v_cache (B, Lmax, H, D)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must both be given or both be None, got "
                         f"k_new={'None' if k_new is None else 'tensor'}, v_new={'None' if v_new is None else 'tensor'}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.device != q.device:
        raise TypeError(f"cache_seqlens must be int32 on {q.device}, got {cache_seqlens.dtype} on "
                        f"{cache_seqlens.device}")
    cache_seqlens = cache_seqlens.contiguous()  # (B,) int32
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    with torch.cuda.device(q.device):  # the split count (and so the workspace) follows this device's SMs
        nbytes = _cuda.workspace_size("fl_attention_kvcache_workspace_size", B, Lq, H, D, Lmax)
        workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=q.device)  # fp32 partials
        _cuda.call("fl_attention_kvcache_fwd",
                   _cuda.ptr(q), *_strides(q), _cuda.ptr(k_cache), *_strides(k_cache),
                   _cuda.ptr(v_cache), *_strides(v_cache), _cuda.ptr(cache_seqlens),
                   _cuda.ptr(k_new), *_strides(k_new), _cuda.ptr(v_new), *_strides(v_new),
                   _cuda.ptr(o), *_strides(o), _cuda.ptr(workspace), nbytes,
                   B, Lq, Lmax, H, D, float(softmax_scale), int(bool(causal)), _cuda.dtype_code(q),
                   _cuda.stream(q))
    return o
