"""fl.attention and fl.attention_with_kvcache: fused scaled-dot-product attention.

    attention(q, k, v)  q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)
      causal: bottom-right aligned (query i attends key j iff j <= i + Lk - Lq);
      key_padding_mask: (B, Lk) bool, True = attend; a query row with no key gives zeros and zero grads;
      dropout_p: dropout on the probabilities in every backend, mask from a counter-based Philox
      (kernels/philox.py) seeded from torch's RNG, replayed (never stored) in the backward.
    attention_with_kvcache: one decoding step over a (B, Lmax, H, D) cache, forward only.

Same structure as ops/layer_norm.py: reference ("torch" backend, fp32 math), validation, eager path
(launchers direct; one autograd.Function when a gradient is needed), custom ops for torch.compile.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backends import OpBackends
from ._common import check_like, check_tensor, device_guard, needs_grad, request_for_trace, resolve_in_op
from ..kernels.philox import dropout_keep_mask

OP = "attention"
OP_KV = "attention_with_kvcache"
_REF_CHUNK_ELEMS = 1 << 26  # reference: bound the (B, H, rows, Lk) score block to ~256 MB of fp32


# ----------------------------------------------------------------------------- reference
def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _allowed(B, Lq, Lk, causal, key_padding_mask, device, q_start, q_stop, kv_lens=None):
    """(B or 1, 1, rows, Lk) bool of attended pairs, or None when everything is attended."""
    allowed = None
    j = torch.arange(Lk, device=device)
    if causal:
        i = torch.arange(q_start, q_stop, device=device)
        if kv_lens is None:
            allowed = (j[None, :] <= i[:, None] + (Lk - Lq))[None, None]           # (1, 1, rows, Lk)
        else:  # per-batch key count (decode): bottom-right against each batch's own length
            shift = (kv_lens.to(device).long() - Lq).view(-1, 1, 1, 1)
            allowed = j.view(1, 1, 1, -1) <= i.view(1, 1, -1, 1) + shift           # (B, 1, rows, Lk)
    if kv_lens is not None:
        valid = (j[None, :] < kv_lens.to(device).long()[:, None]).view(B, 1, 1, Lk)
        allowed = valid if allowed is None else allowed & valid
    if key_padding_mask is not None:
        pad = key_padding_mask.view(B, 1, 1, Lk)
        allowed = pad if allowed is None else allowed & pad
    return allowed


def _chunks(B, H, Lq, Lk):
    rows = max(1, min(Lq, _REF_CHUNK_ELEMS // max(1, B * H * Lk)))
    return [(s, min(Lq, s + rows)) for s in range(0, Lq, rows)]


def attention_ref(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, seed, offset, kv_lens=None):
    """Reference forward: (o (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32; +inf for empty rows)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = _acc(q)
    kh = k.to(acc).transpose(1, 2)                                                # (B, H, Lk, D)
    vh = v.to(acc).transpose(1, 2)
    o = torch.empty((B, H, Lq, v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32 if acc == torch.float32 else acc, device=q.device)
    for q0, q1 in _chunks(B, H, Lq, Lk):
        qh = q[:, q0:q1].to(acc).transpose(1, 2)                                  # (B, H, rows, D)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale                # (B, H, rows, Lk)
        allowed = _allowed(B, Lq, Lk, causal, key_padding_mask, q.device, q0, q1, kv_lens)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        m = torch.logsumexp(s, dim=-1)                                            # (B, H, rows)
        m = torch.where(torch.isneginf(m), torch.full_like(m, float("inf")), m)
        p = torch.exp(s - m[..., None])                                           # 0 on empty rows
        if dropout_p > 0:
            keep = dropout_keep_mask(seed, offset, B, H, Lq, Lk, q.device, dropout_p, q0, q1)
            p = p * keep / (1.0 - dropout_p)
        o[:, :, q0:q1] = torch.matmul(p, vh)
        lse[:, :, q0:q1] = m
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


def attention_ref_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, seed, offset,
                      deterministic):
    """Reference backward from the saved lse: (dq, dk, dv) in the inputs' dtypes."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = _acc(q)
    kh, vh = k.to(acc).transpose(1, 2), v.to(acc).transpose(1, 2)                 # (B, H, Lk, D)
    dq = torch.empty((B, H, Lq, D), dtype=acc, device=q.device)
    dk = torch.zeros((B, H, Lk, D), dtype=acc, device=q.device)
    dv = torch.zeros((B, H, Lk, v.shape[-1]), dtype=acc, device=q.device)
    for q0, q1 in _chunks(B, H, Lq, Lk):
        qh = q[:, q0:q1].to(acc).transpose(1, 2)                                  # (B, H, rows, D)
        doh = do[:, q0:q1].to(acc).transpose(1, 2)
        oh = o[:, q0:q1].to(acc).transpose(1, 2)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
        allowed = _allowed(B, Lq, Lk, causal, key_padding_mask, q.device, q0, q1)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        p = torch.exp(s - lse[:, :, q0:q1, None].to(acc))                         # (B, H, rows, Lk)
        dp = torch.matmul(doh, vh.transpose(-1, -2))
        if dropout_p > 0:
            keep = dropout_keep_mask(seed, offset, B, H, Lq, Lk, q.device, dropout_p, q0, q1)
            scale = keep.to(acc) / (1.0 - dropout_p)  # bool / float would be float32
            dv += torch.matmul((p * scale).transpose(-1, -2), doh)
            dp = dp * scale
        else:
            dv += torch.matmul(p.transpose(-1, -2), doh)
        delta = (doh * oh).sum(-1, keepdim=True)                                  # rowsum(dO * O)
        ds = p * (dp - delta)
        dq[:, :, q0:q1] = torch.matmul(ds, kh) * softmax_scale
        dk += torch.matmul(ds.transpose(-1, -2), qh) * softmax_scale
    back = lambda t, like: t.transpose(1, 2).to(like.dtype).contiguous()  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


def attention_with_kvcache_ref(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal):
    B, Lq = q.shape[:2]
    lens = cache_seqlens.to(q.device).long()
    if k_new is not None:
        pos = lens[:, None] + torch.arange(Lq, device=q.device)[None, :]          # (B, Lq)
        bidx = torch.arange(B, device=q.device)[:, None].expand_as(pos)
        k_cache[bidx, pos] = k_new
        v_cache[bidx, pos] = v_new
        lens = lens + Lq
    o, _ = attention_ref(q, k_cache, v_cache, None, softmax_scale, causal, 0.0, 0, 0, kv_lens=lens)
    return o


class _TorchBackend:
    """The "torch" backend: the reference, behind the launcher interface."""
    attention_fwd = staticmethod(attention_ref)
    attention_bwd = staticmethod(attention_ref_bwd)
    attention_with_kvcache = staticmethod(attention_with_kvcache_ref)

    @staticmethod
    def unsupported_reason(q, k, v, causal, key_padding_mask, dropout_p):
        return None

    @staticmethod
    def kvcache_unsupported_reason(q, k_cache, v_cache=None, k_new=None, v_new=None):
        return None


BACKENDS = OpBackends(
    OP,
    {"torch": lambda: _TorchBackend, "triton": "fastlayers.kernels.attention",
     "cuda": "fastlayers.cuda_ops.attention"},
    # Until GPU measurements rank them, the Triton kernels -- exercised in CI through the
    # interpreter -- come first; the CUDA kernels take over where they are measured faster.
    auto_order=("triton", "cuda"),
)
BACKENDS_KV = OpBackends(OP_KV, BACKENDS._sources, auto_order=("triton", "cuda"))


def _kernel_dtype_reason(name, t):
    if name != "torch" and t.dtype == torch.float64:
        return "float64 runs on the torch backend only"
    return None


def _select(backend, q, k, v, causal, key_padding_mask, dropout_p):
    def case_reason(name, mod):
        return _kernel_dtype_reason(name, q) or mod.unsupported_reason(q, k, v, causal, key_padding_mask, dropout_p)
    return BACKENDS.select(backend, q.device, case_reason)


def _select_kv(backend, q, k_cache, v_cache=None, k_new=None, v_new=None):
    def case_reason(name, mod):
        return _kernel_dtype_reason(name, q) or mod.kvcache_unsupported_reason(q, k_cache, v_cache, k_new, v_new)
    return BACKENDS_KV.select(backend, q.device, case_reason)


# ----------------------------------------------------------------------------- validation
def _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p):
    check_tensor(q, "q", dim=4)
    check_tensor(k, "k", dim=4)
    check_tensor(v, "v", dim=4)
    check_like(k, "k", q, "q")
    check_like(v, "v", q, "q")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"k: expected shape (B={B}, Lk, H={H}, D={D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"q: head dim must be >= 1, got shape {tuple(q.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask: expected a bool tensor (True = attend), got {got}")
        if tuple(key_padding_mask.shape) != (B, k.shape[1]):
            raise ValueError(f"key_padding_mask: expected shape (B, Lk) = {(B, k.shape[1])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected a tensor on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")


def _draw_seed() -> int:
    # From torch's default (CPU) generator: torch.manual_seed(s) fixes the masks, no device sync.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


# ----------------------------------------------------------------------------- eager path
class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, causal, dropout_p, seed, deterministic, name):
        mod = BACKENDS.module(name)
        o, lse = mod.attention_fwd(q, k, v, key_padding_mask, scale, causal, dropout_p, seed, 0)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.meta = (scale, causal, dropout_p, seed, deterministic, name)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, causal, dropout_p, seed, deterministic, name = ctx.meta
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = BACKENDS.module(name).attention_bwd(do, q, k, v, o, lse, mask, scale, causal, dropout_p,
                                                         seed, 0, deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None


def _last_dim_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0, deterministic: bool = False,
              backend: Optional[str] = None) -> Tensor:
    """Fused attention. q: (B, Lq, H, D); k, v: (B, Lk, H, D); returns (B, Lq, H, D) in q's dtype.

    softmax_scale defaults to 1/sqrt(D). dropout_p applies whenever it is > 0 (pass 0 in eval, as
    F.scaled_dot_product_attention). deterministic=True (or torch.use_deterministic_algorithms)
    makes the backward bitwise reproducible.
    """
    if torch.compiler.is_compiling():
        return _compiled(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend)
    _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    name = _select(backend, q, k, v, causal, key_padding_mask, dropout_p)
    BACKENDS.record(name)
    seed = _draw_seed() if dropout_p > 0 else 0
    deterministic = bool(deterministic or torch.are_deterministic_algorithms_enabled())
    with device_guard(q):
        if needs_grad(q, k, v):
            return _AttentionFn.apply(q, k, v, key_padding_mask, scale, causal, float(dropout_p), seed,
                                      deterministic, name)
        o, _ = BACKENDS.module(name).attention_fwd(q, k, v, key_padding_mask, scale, causal, float(dropout_p),
                                                   seed, 0)
    return o


def _validate_kv(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale):
    check_tensor(q, "q", dim=4)
    check_tensor(k_cache, "k_cache", dim=4)
    check_tensor(v_cache, "v_cache", dim=4)
    check_like(k_cache, "k_cache", q, "q")
    check_like(v_cache, "v_cache", q, "q", shape=k_cache.shape)
    B, Lq, H, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[2] != H or k_cache.shape[3] != D:
        raise ValueError(f"k_cache: expected shape (B={B}, Lmax, H={H}, D={D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k_cache.shape)}")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, Tensor) else type(cache_seqlens).__name__
        raise TypeError(f"cache_seqlens: expected an int32 tensor, got {got}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens: expected shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected a tensor on q's device {q.device}, got {cache_seqlens.device}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new, v_new: pass both or neither")
    if k_new is not None:
        check_like(k_new, "k_new", q, "q", shape=q.shape)
        check_like(v_new, "v_new", q, "q", shape=q.shape)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    # Lengths live on the device: checking them costs a host sync, so it is skipped while a CUDA
    # graph is being captured or torch.compile traces (the kernels never write past Lmax regardless).
    if torch.compiler.is_compiling() or q.device.type == "meta":  # meta: no lengths to read
        return
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        need = Lq if k_new is not None else 0
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens)) if B else (0, 0)
        if lo < 0:
            raise ValueError(f"cache_seqlens: lengths must be >= 0, got min {lo}")
        if hi + need > k_cache.shape[1]:
            raise ValueError(f"k_cache: too short: cache_seqlens.max() + Lq = {hi} + {need} > Lmax = "
                             f"{k_cache.shape[1]}")


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                           k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *,
                           causal: bool = True, softmax_scale: Optional[float] = None,
                           backend: Optional[str] = None) -> Tensor:
    """One decoding step over a KV cache (forward only).

    q: (B, Lq, H, D); k_cache, v_cache: (B, Lmax, H, D); cache_seqlens: (B,) int32 lengths before
    this step. k_new/v_new (B, Lq, H, D), when given, are written into the caches in place at rows
    cache_seqlens[b] .. cache_seqlens[b]+Lq-1, and q attends keys 0 .. cache_seqlens[b]+Lq-1
    (bottom-right causal within the new block when causal=True).
    """
    _validate_kv(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale)
    if needs_grad(q, k_cache, v_cache, k_new, v_new):
        raise RuntimeError("attention_with_kvcache is forward-only (decoding): its inputs require grad; call it "
                           "under torch.no_grad() / torch.inference_mode(), or use fl.attention to train")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the last dimension must be contiguous (the caches are written "
                         "in place, so they cannot be copied)")
    q = _last_dim_contig(q)
    k_new = _last_dim_contig(k_new) if k_new is not None else None
    v_new = _last_dim_contig(v_new) if v_new is not None else None
    if torch.compiler.is_compiling():
        name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
        return torch.ops.fastlayers.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                           scale, causal, name)
    name = _select_kv(backend, q, k_cache, v_cache, k_new, v_new)
    BACKENDS_KV.record(name)
    with device_guard(q):
        return BACKENDS_KV.module(name).attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                               scale, causal)


# ----------------------------------------------------------------------------- torch.compile path
def _compiled(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend):
    _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
    o, _, _ = torch.ops.fastlayers.attention_fwd(q, k, v, key_padding_mask, scale, causal, float(dropout_p),
                                                 bool(deterministic), name)
    return o


@torch.library.custom_op("fastlayers::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], softmax_scale: float,
                      causal: bool, dropout_p: float, deterministic: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o, lse, rng_state); rng_state = int64 [seed, offset] on the CPU, drawn here (at run
    time, not at trace time) so every call of a compiled graph draws a fresh dropout mask."""
    seed = _draw_seed() if dropout_p > 0 else 0
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    backend = resolve_in_op(backend, lambda b: _select(b, q, k, v, causal, key_padding_mask, dropout_p))
    with device_guard(q):
        o, lse = BACKENDS.module(backend).attention_fwd(q, k, v, key_padding_mask, softmax_scale, causal,
                                                        dropout_p, seed, 0)
    return o, lse, torch.tensor([seed, 0], dtype=torch.int64)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, deterministic, backend):
    B, Lq, H, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=lse_dtype),
            torch.empty((2,), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("fastlayers::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      key_padding_mask: Optional[Tensor], rng_state: Tensor, softmax_scale: float, causal: bool,
                      dropout_p: float, deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    seed, offset = (int(x) for x in rng_state.tolist())
    do, q, k, v = (_last_dim_contig(t) for t in (do, q, k, v))
    backend = resolve_in_op(backend, lambda b: _select(b, q, k, v, causal, key_padding_mask, dropout_p))
    with device_guard(q):
        return BACKENDS.module(backend).attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale,
                                                      causal, dropout_p, seed, offset, deterministic)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, rng_state, softmax_scale, causal, dropout_p, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, dropout_p, deterministic, backend = inputs
    o, lse, rng_state = output
    ctx.save_for_backward(q, k, v, o, lse, mask, rng_state)
    ctx.meta = (scale, causal, dropout_p, deterministic, backend)


def _attn_backward(ctx, do, dlse, drng):
    q, k, v, o, lse, mask, rng_state = ctx.saved_tensors
    scale, causal, dropout_p, deterministic, backend = ctx.meta
    dq, dk, dv = torch.ops.fastlayers.attention_bwd(do, q, k, v, o, lse, mask, rng_state, scale, causal, dropout_p,
                                                    deterministic, backend)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("fastlayers::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kv_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Optional[Tensor],
                     v_new: Optional[Tensor], softmax_scale: float, causal: bool, backend: str) -> Tensor:
    backend = resolve_in_op(backend, lambda b: _select_kv(b, q, k_cache, v_cache, k_new, v_new))
    with device_guard(q):
        return BACKENDS_KV.module(backend).attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new,
                                                                  v_new, softmax_scale, causal)


@_attention_kv_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal, backend):
    return q.new_empty(q.shape)
