"""CUDA-backend launchers of attention (forward, backward, KV-cache decode).

Guarantees: the same functions and semantics as fastlayers.kernels.attention (the launcher
contract): q (B, Lq, H, D), k/v (B, Lk, H, D), bottom-right causal, key_padding_mask (B, Lk) bool
(True = attend; contiguous, masked keys never read), the counter-based philox dropout mask shared by
every backend with its state rng_state = device int64 [seed, offset] read by the kernels at run
time, lse (B, H, Lq) fp32 with +inf for rows that attend no key, kv-cache rows attending slots
[cache_leftpad, length) (cache_leftpad None: from 0), rows with a bad length or left padding NaN and
unwritten; with block_table (flash-attn's paged caches) the caches are (num_blocks, P, H, D) pages,
every slot is logical (Lmax = block_table.shape[1] * P), a row with a used page id out of range is
NaN too and a new row whose page id is out of range is not written.  Outputs and workspaces are allocated here with torch.empty on the input's
device; kernels run on its current stream (csrc/attention/*.cu).  Strides are passed through as
they are when the kernels can read them (contiguous head dim, 16-byte aligned data, (b, l, h)
strides that are multiples of 8 elements; a size-1 dim's stride is never used); any other layout
is copied here first (the caches into an aligned copy that is written back), so no valid input is
refused or read wrong.  The supported head dims come from the library's build info, never from a
constant here.
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
from ..kernels.philox import check_rng_state

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
    if t.shape[1] >= 2**31 or t.shape[0] >= 2**31 or t.shape[2] >= 2**31:
        return f"{name}: the CUDA kernels take B, L and H below 2^31, got shape {tuple(t.shape)}"
    return None  # any strides / alignment: _kernel_layout copies what the kernels cannot read


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(b, l, h) strides for the C ABI; a size-1 dim's stride is never used by the kernels: 0."""
    if t is None:
        return (0, 0, 0)
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in range(3))


def _readable(t: torch.Tensor) -> bool:
    """The kernels load 16-byte rows with cp.async / uint4: contiguous head dim, 16-byte aligned
    data, (b, l, h) strides multiples of 8 elements (stride 0, a broadcast, included)."""
    return (t.stride(3) == 1 or t.shape[3] == 1) and t.data_ptr() % 16 == 0 and \
        all(s % 8 == 0 for s in _strides(t))


def _kernel_layout(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when the kernels can read it, else a fresh (aligned) contiguous copy."""
    if t is None or _readable(t):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)  # caching allocator: 512-byte aligned


def _require_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: the CUDA kernels index it as contiguous (the op layer copies other "
                         f"layouts), got shape {tuple(t.shape)} with strides {t.stride()}")


def _rng_ptr(rng_state, dropout_p: float, q: torch.Tensor) -> int:
    """Device address of the int64 [seed, offset] state the kernels read (0 without dropout)."""
    check_rng_state(rng_state, dropout_p, q.device)
    return _cuda.ptr(rng_state) if dropout_p > 0.0 else 0


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
    if q.shape[0] * q.shape[2] > 65535 ** 2:  # grid axes y and z carry the heads (fl_attention_grid)
        return f"the CUDA attention kernels take at most 65535^2 heads (B*H), got {q.shape[0] * q.shape[2]}"
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


def kvcache_unsupported_reason(q, k_cache, v_cache=None, k_new=None, v_new=None, block_table=None) -> str | None:
    """Why the CUDA backend cannot run attention_with_kvcache, or None when it can (every tensor's
    dtype, device, strides and alignment are checked, so auto selection never meets a C-side error).
    block_table: the paged caches' table (any page size runs)."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new))
    reason = _common_reason(q, tuple((n, t) for n, t in named if t is not None)) or _kvcache_abi_reason()
    if reason is None and block_table is not None:
        try:
            paged_geometry(q, k_cache, block_table)
        except (TypeError, ValueError) as e:
            reason = str(e)
    return reason


def _kvcache_abi_reason() -> str | None:
    """fl_attention_kvcache_fwd gained cache_leftpad after cache_seqlens, then block_table,
    max_num_blocks, num_blocks and page_block_size after that: a library built before the last change
    (no "attention_kvcache_paged" in its build info) would read every later argument shifted, so it
    is never called -- with or without a block_table."""
    if not _cuda.build_info().get("attention_kvcache_paged", False):
        return (f"{_cuda.LIB_NAME} predates fl_attention_kvcache_fwd's current arguments (cache_leftpad, then "
                f"block_table .. page_block_size; stale build? rebuild it)")
    return None


def paged_geometry(q, k_cache, block_table) -> tuple[int, int, int, int]:
    """(max_num_blocks, num_blocks, page_block_size, logical Lmax) of a paged step, the sizes
    fl_attention_kvcache_fwd takes with block_table; TypeError / ValueError naming the argument when
    the table cannot be passed as it is (the op layer hands it over int32, contiguous, on q's device)."""
    if block_table.dtype != torch.int32 or block_table.device != q.device:
        raise TypeError(f"block_table must be int32 on {q.device}, got {block_table.dtype} on {block_table.device}")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be (B, max_num_blocks) with B = {q.shape[0]}, got shape "
                         f"{tuple(block_table.shape)}")
    _require_contiguous(block_table, "block_table")  # (B, max_num_blocks) int32, row stride max_num_blocks
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]  # k_cache (num_blocks, P, H, D)
    if page < 1:
        raise ValueError(f"k_cache: pages of at least one row (page_block_size = k_cache.shape[1] >= 1), got "
                         f"shape {tuple(k_cache.shape)}")
    lmax = block_table.shape[1] * page
    if lmax >= 2**31:
        raise ValueError(f"block_table: the logical cache length max_num_blocks * page_block_size must be below "
                         f"2^31 for the CUDA kernels, got {block_table.shape[1]} * {page} = {lmax}")
    return block_table.shape[1], num_blocks, page, lmax


def _mask_args(key_padding_mask: torch.Tensor | None):
    if key_padding_mask is None:
        return 0, 0, 0
    _require_contiguous(key_padding_mask, "key_padding_mask")
    m = key_padding_mask
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes (0 / 1): no copy
    return _cuda.ptr(m), m.stride(0), m.stride(1)


def attention_fwd(q, k, v, key_padding_mask, softmax_scale: float, causal: bool, dropout_p: float,
                  rng_state):
    """-> (o (B, Lq, H, D) q.dtype, lse (B, H, Lq) fp32); rng_state: int64 [seed, offset] on q's
    device (read by the kernel when it runs), or None when dropout_p == 0."""
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    Lk = k.shape[1]  # k, v (B, Lk, H, D)
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    kpm, kpm_b, kpm_l = _mask_args(key_padding_mask)
    rng = _rng_ptr(rng_state, dropout_p, q)
    _cuda.call("fl_attention_fwd",
               _cuda.ptr(q), *_strides(q), _cuda.ptr(k), *_strides(k), _cuda.ptr(v), *_strides(v),
               _cuda.ptr(o), *_strides(o), _cuda.ptr(lse), kpm, kpm_b, kpm_l,
               B, Lq, Lk, H, D, float(softmax_scale), int(bool(causal)), float(dropout_p),
               rng, forward_impl(), _cuda.dtype_code(q), _cuda.stream(q))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, rng_state,
                  deterministic: bool):
    """-> (dq, dk, dv) in q.dtype with the shapes of q, k, v (contiguous)."""
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    Lk = k.shape[1]  # (B, Lk, H, D)
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    dk = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    dv = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    # dO comes from autograd in whatever layout the next op produced; the kernels need 16-byte rows.
    do, q, k, v, o = (_kernel_layout(t) for t in (do, q, k, v, o))
    lse = lse.contiguous()  # (B, H, Lq) fp32
    nbytes = _cuda.workspace_size("fl_attention_bwd_workspace_size", B, Lq, H, D, int(bool(deterministic)))
    workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=q.device)  # delta (+ fp32 dq)
    kpm, kpm_b, kpm_l = _mask_args(key_padding_mask)
    _cuda.call("fl_attention_bwd",
               _cuda.ptr(do), *_strides(do), _cuda.ptr(q), *_strides(q), _cuda.ptr(k), *_strides(k),
               _cuda.ptr(v), *_strides(v), _cuda.ptr(o), *_strides(o), _cuda.ptr(lse), kpm, kpm_b, kpm_l,
               _cuda.ptr(dq), *_strides(dq), _cuda.ptr(dk), *_strides(dk), _cuda.ptr(dv), *_strides(dv),
               _cuda.ptr(workspace), nbytes, B, Lq, Lk, H, D, float(softmax_scale), int(bool(causal)),
               float(dropout_p), _rng_ptr(rng_state, dropout_p, q), int(bool(deterministic)),
               _cuda.dtype_code(q), _cuda.stream(q))
    return dq, dk, dv


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale: float,
                           causal: bool, cache_leftpad=None, block_table=None):
    """-> o (B, Lq, H, D); writes k_new / v_new into the caches in place (see the module docstring).
    Row b attends slots cache_leftpad[b] (0 when None) .. cache_seqlens[b] + Lq_new - 1. Never syncs
    the host; a row with a bad length (< 0, or + Lq new rows > Lmax) or a bad cache_leftpad (< 0, or
    > its length + Lq new rows) gets NaN output rows and no cache write.
    block_table (B, max_num_blocks) int32 contiguous on q's device, or None: the caches are then
    (num_blocks, P, H, D) pages, row b's logical slot j at page block_table[b, j // P], row j % P, and
    Lmax (the lengths' bound, the split count, the workspace) is the logical max_num_blocks * P; a row
    with a page id it uses out of [0, num_blocks) gets NaN rows, a new row whose page id is out of range
    is not written (no such id is dereferenced)."""
    reason = _kvcache_abi_reason()
    if reason is not None:
        raise RuntimeError(reason)
    B, Lq, H, D = q.shape  # (B, Lq, H, D)
    if block_table is None:
        Lmax = k_cache.shape[1]  # k_cache, v_cache (B, Lmax, H, D)
        max_blocks = num_blocks = page = 0
    else:  # k_cache, v_cache (num_blocks, P, H, D); block_table (B, max_num_blocks)
        max_blocks, num_blocks, page, Lmax = paged_geometry(q, k_cache, block_table)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must both be given or both be None, got "
                         f"k_new={'None' if k_new is None else 'tensor'}, v_new={'None' if v_new is None else 'tensor'}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.device != q.device:
        raise TypeError(f"cache_seqlens must be int32 on {q.device}, got {cache_seqlens.dtype} on "
                        f"{cache_seqlens.device}")
    _require_contiguous(cache_seqlens, "cache_seqlens")  # (B,) int32
    if cache_leftpad is not None:
        if cache_leftpad.dtype != torch.int32 or cache_leftpad.device != q.device:
            raise TypeError(f"cache_leftpad must be int32 on {q.device}, got {cache_leftpad.dtype} on "
                            f"{cache_leftpad.device}")
        _require_contiguous(cache_leftpad, "cache_leftpad")  # (B,) int32
    q, k_new, v_new = _kernel_layout(q), _kernel_layout(k_new), _kernel_layout(v_new)
    # The caches are written in place: one the kernels cannot read runs on an aligned copy that is
    # copied back afterwards (rows of bad lengths are untouched in the copy, so unchanged).
    kc, vc = _kernel_layout(k_cache), _kernel_layout(v_cache)
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    with torch.cuda.device(q.device):  # the split count (and so the workspace) follows this device's SMs
        nbytes = _cuda.workspace_size("fl_attention_kvcache_workspace_size", B, Lq, H, D, Lmax)
        workspace = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=q.device)  # fp32 partials
        _cuda.call("fl_attention_kvcache_fwd",
                   _cuda.ptr(q), *_strides(q), _cuda.ptr(kc), *_strides(kc),
                   _cuda.ptr(vc), *_strides(vc), _cuda.ptr(cache_seqlens), _cuda.ptr(cache_leftpad),
                   _cuda.ptr(block_table), max_blocks, num_blocks, page,
                   _cuda.ptr(k_new), *_strides(k_new), _cuda.ptr(v_new), *_strides(v_new),
                   _cuda.ptr(o), *_strides(o), _cuda.ptr(workspace), nbytes,
                   B, Lq, Lmax, H, D, float(softmax_scale), int(bool(causal)), _cuda.dtype_code(q),
                   _cuda.stream(q))
    if k_new is not None:
        if kc is not k_cache:
            k_cache.copy_(kc)
        if vc is not v_cache:
            v_cache.copy_(vc)
    return o


# ------------------------------------------------------------------ launch grids
# FL_ATTENTION_KERNEL_* of fastlayers.h: the kernels whose grids fl_attention_grid reports.
GRID_KERNELS = {"fwd": 0, "fwd_sm90": 1, "bwd_preprocess": 2, "bwd_dkdv": 3, "bwd_dq": 4,
                "bwd_dq_convert": 5, "kvcache_append": 6, "kvcache_combine": 7}


def launch_grid(kernel: str, B: int, Lq: int, Lk: int, H: int, D: int, num_splits: int = 1) -> tuple[int, int, int]:
    """(x, y, z) grid the library launches `kernel` with (fl_attention_grid: the entry points use
    the same function); RuntimeError when a size is out of range or an axis would exceed its limit."""
    import ctypes
    out = (ctypes.c_int64 * 3)()
    _cuda.call("fl_attention_grid", GRID_KERNELS[kernel], B, Lq, Lk, H, D, num_splits, out)
    return int(out[0]), int(out[1]), int(out[2])
