"""Triton attention kernels (FlashAttention-2 style) and their launchers.

Called by pytorch_ext/ops/attention.py through exactly these functions (the launcher contract):
    attention_fwd(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state) -> (o, lse)
    attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, rng_state,
                  deterministic) -> (dq, dk, dv)
    attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal,
                           cache_leftpad=None, block_table=None) -> o
    unsupported_reason, kvcache_unsupported_reason(..., block_table=None).
Re-exports `dropout_keep_mask` / `dropout_uniform` from kernels/philox.py, the pure-torch spec of
the dropout mask that these kernels reproduce.

Layouts: q (B, Lq, H, D), k/v (B, Lk, H, D), last dim contiguous, other strides arbitrary (passed
through, never copied). o (B, Lq, H, D) contiguous, lse (B, H, Lq) fp32 natural log of the SCALED
scores' exp-sum, +inf for a row with no attended key (its o row is 0, its gradients are 0).
key_padding_mask (B, Lk) bool, cache_seqlens and cache_leftpad (B,) int32 are indexed as
CONTIGUOUS (the op layer copies other layouts; the launchers check it).
Causal is bottom-right aligned: query i attends key j iff j <= i + (Lk - Lq).
Masked keys: a key hidden by key_padding_mask never affects the output nor any gradient, even when
its k / v rows hold NaN or inf (its scores are replaced, its k / v rows zeroed in registers); its
dk / dv are 0. Causally hidden keys are real tokens: no such guarantee.
Dropout: rng_state = int64 [seed, offset] on q's device, READ BY THE KERNELS (tl.load), so a CUDA
graph replayed after the state was redrawn in place draws a fresh mask and the host never syncs.
keep(b, h, i, j) = u >= p with u = (philox4x32-10(key=(seed lo, seed hi), counter=(c lo, c hi, 0,
0)).word0 >> 8) * 2**-24, c = offset + ((b*H + h)*Lq + i)*Lk + j. This is tl.randint(seed, c) for
int64 c on Triton 3.9 (a test checks it); the kernels spell philox out so the mask cannot change
with how a Triton version splits 64-bit counters. p is compared in float32.
KV cache: row b attends slots [cache_leftpad[b] (0 without it), cache_seqlens[b] + Lq_new); a batch
row b whose cache_seqlens[b] < 0, cache_seqlens[b] + Lq_new > Lmax, cache_leftpad[b] < 0 or
cache_leftpad[b] > cache_seqlens[b] + Lq_new is bad: its cache rows are not written and its output
rows are NaN (loud, memory-safe, no host sync). Slots outside a row's window are never read.
Paged KV cache (block_table (B, nblk) int32 contiguous, flash-attn's convention): k_cache / v_cache
are (num_blocks, P, H, D) pages, logical slot j of row b is page block_table[b, j // P], row j % P,
any P >= 1; the rules above hold in logical slots with Lmax = nblk * P. Only the entries of slots a
row attends or writes are read; an entry out of [0, num_blocks) is never dereferenced: its new row
is not written and the batch row's output rows are NaN. Two rows writing one physical slot: undefined.
Grids: every launch puts its tile index on axis 0 (limit 2^31 - 1) and spreads the B*H heads over
axes 1 and 2 (limit 65535 each), see _grid; the grid functions below are what the launchers use
and what the CPU tests check against the limits at extreme shapes.
Numerics: fp32 accumulators, scores in the log2 domain (scale * log2(e) folded into one multiply).
Head dims: multiples of 8 up to 256, padded to BLOCK_D (next power of two, >= 16) by masked loads.
GPU: fp16/bf16. Interpreter (TRITON_INTERPRET=1, CPU tensors): fp32/fp16 (bf16 is upcast there,
because the interpreter's bf16 tl.dot multiplies raw bits).
"""
import functools
import os

import torch

import triton
import triton.language as tl

from .philox import check_rng_state, dropout_keep_mask, dropout_uniform  # noqa: F401  (the spec; re-exported for tests)

# Read once at import: decides whether kernels are interpreted (CPU) and whether dots are upcast.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = tuple(range(8, 257, 8))

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _head_index():
    """(b*H + h) of this program from grid axes 1 and 2 (see _grid), as int64; >= B*H past the end."""
    return tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)

@triton.jit
def _dropout_keep(seed, c, dropout_p):
    """keep mask for int64 counters c (any shape) under the int64 seed: the philox of kernels/philox.py."""
    c0 = c.to(tl.uint32)  # truncation: low word
    c1 = (c >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    k0 = seed.to(tl.uint32)  # seed in [0, 2^62): low and high words
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    u = (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p

@triton.jit
def _load_tile(ptrs, rows, n_rows, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
               UPCAST: tl.constexpr):
    # (R, BLOCK_D) tile; rows >= n_rows and padded head-dim columns read as 0.
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x

@triton.jit
def _load_rows(ptrs, row_ok, d_ok, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    # (R, BLOCK_D) tile of the rows where row_ok holds, others (and padded columns) read as 0: a
    # key masked by key_padding_mask is never read (its row may hold NaN / inf; 0 * NaN in P.V or
    # dS would poison the other rows), and a masked load keeps no second copy of the tile live.
    if EVEN_D:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x

@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, kpm_base,
              start_n, offs_m, offs_n, offs_d, d_ok, Lk, diag, qk_scale,
              dropout_p, drop_base, seed,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_k = start_n + offs_n  # (BLOCK_N,) key indices
    k_ptrs = k_base + offs_k[:, None].to(tl.int64) * stride_kl + offs_d[None, :]
    v_ptrs = v_base + offs_k[:, None].to(tl.int64) * stride_vl + offs_d[None, :]
    if HAS_KPM:
        km = tl.load(kpm_base + offs_k, mask=offs_k < Lk, other=0) != 0  # (BLOCK_N,), False past Lk
        k = _load_rows(k_ptrs, km, d_ok, EVEN_D, UPCAST)  # (BLOCK_N, BLOCK_D); masked keys read as 0
        v = _load_rows(v_ptrs, km, d_ok, EVEN_D, UPCAST)
    else:
        k = _load_tile(k_ptrs, offs_k, Lk, d_ok, MASKED, EVEN_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(v_ptrs, offs_k, Lk, d_ok, MASKED, EVEN_D, UPCAST)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) log2-domain scores
    # Per-element masks only on boundary tiles (the Lk edge and the causal diagonal).
    if MASKED:
        ok = offs_k[None, :] < Lk
        if IS_CAUSAL:
            ok = ok & (offs_k[None, :] <= offs_m[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
    if HAS_KPM:
        s = tl.where(km[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key masked so far keeps m = -inf; subtract 0 instead (no inf - inf).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser uses the undropped P
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        c = drop_base + offs_m[:, None].to(tl.int64) * Lk + offs_k[None, :]
        p = tl.where(_dropout_keep(seed, c, dropout_p), p, 0.0)
    acc += tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new

@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_fwd_kernel(
    Q, K, V,  # (B, Lq|Lk, H, D) inputs, last dim contiguous
    O,  # (B, Lq, H, D) contiguous output
    LSE,  # (B, H, Lq) fp32 output, natural log
    KPM,  # (B, Lk) contiguous uint8 view of the bool key_padding_mask (unused without HAS_KPM)
    RNG,  # (2,) int64 [seed, offset] on the device (unused without HAS_DROPOUT)
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    BH, H, Lq, Lk, qk_scale, dropout_p, drop_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query tiles see the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = _head_index()
    if bh >= BH:  # the axis-1 x axis-2 rectangle overhangs B*H by fewer than num_programs(2)
        return
    b = bh // H
    h = bh % H
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql
                   + offs_d[None, :], offs_m, Lq, d_ok, True, EVEN_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * Lk
    if HAS_DROPOUT:  # read at run time: a graph replay after an in-place redraw sees the new state
        seed = tl.load(RNG)
        drop_base = tl.load(RNG + 1) + bh * Lq * Lk
    else:
        seed = 0
        drop_base = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = Lk - Lq
    m0 = pid_m * BLOCK_M
    if IS_CAUSAL:
        # keys past the last row's diagonal are skipped; tiles wholly left of the first row's
        # diagonal need no per-element mask.
        hi = tl.maximum(tl.minimum(Lk, m0 + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(Lk, m0 + diag + 1), 0)
        full_end = (full_end // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl,
                                  kpm_base, start_n, offs_m, offs_n, offs_d, d_ok,
                                  Lk, diag, qk_scale, dropout_p, drop_base, seed,
                                  False, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl,
                                  kpm_base, start_n, offs_m, offs_n, offs_d, d_ok,
                                  Lk, diag, qk_scale, dropout_p, drop_base, seed,
                                  True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    if HAS_DROPOUT:
        o = o * drop_scale
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    row_ok = offs_m < Lq
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Lq + offs_m, lse, mask=row_ok)

@triton.jit(do_not_specialize=["Lq"])
def _attn_bwd_preprocess_kernel(
    O, DO,  # (B, Lq, H, D)
    DELTA,  # (B, H, Lq) fp32 output: rowsum(dO * O)
    stride_ob, stride_ol, stride_oh, stride_dob, stride_dol, stride_doh,
    BH, H, Lq, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = _head_index()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_ol + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dol + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)

@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base, delta_base,
               key_ok, start_m, offs_n, offs_d, d_ok, Lq, Lk, diag, qk_scale,
               dropout_p, drop_scale, drop_base, seed,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    q = _load_tile(q_base + rows * stride_ql + offs_d[None, :], offs_m, Lq, d_ok, True, EVEN_D, UPCAST)
    do = _load_tile(do_base + rows * stride_dol + offs_d[None, :], offs_m, Lq, d_ok, True, EVEN_D, UPCAST)
    # rows past Lq read lse = +inf, so their P^T columns are exactly 0 without a mask.
    lse2 = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
    s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASKED:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
    if HAS_KPM:
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    if HAS_DROPOUT:
        c = drop_base + offs_m[None, :].to(tl.int64) * Lk + offs_n[:, None]
        keep = _dropout_keep(seed, c, dropout_p)
        pd_t = tl.where(keep, p_t * drop_scale, 0.0)
    else:
        pd_t = p_t
    dv += tl.dot(pd_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
    if HAS_DROPOUT:
        dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv

@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # inputs (B, L, H, D), last dim contiguous
    LSE, DELTA,  # (B, H, Lq) fp32
    KPM,  # (B, Lk) contiguous uint8 view of the bool mask
    RNG,  # (2,) int64 [seed, offset]
    DK, DV,  # (B, Lk, H, D) contiguous outputs
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    BH, H, Lq, Lk, sm_scale, qk_scale, dropout_p, drop_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = _head_index()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    cols = offs_n[:, None].to(tl.int64)
    if HAS_KPM:
        key_ok = tl.load(KPM + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0
    else:
        key_ok = offs_n < Lk
    # masked keys (may hold NaN / inf) read as 0: their S^T and dP^T rows are finite, so P^T = 0
    # there keeps dS^T = 0 (0 * NaN would not) and their dk, dv come out 0.
    k = _load_rows(K + b * stride_kb + h * stride_kh + cols * stride_kl + offs_d[None, :],
                   key_ok, d_ok, EVEN_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + b * stride_vb + h * stride_vh + cols * stride_vl + offs_d[None, :],
                   key_ok, d_ok, EVEN_D, UPCAST)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * Lq
    delta_base = DELTA + bh * Lq
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        drop_base = tl.load(RNG + 1) + bh * Lq * Lk
    else:
        seed = 0
        drop_base = 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = Lk - Lq
    if IS_CAUSAL:
        # first query that sees key n0 is n0 - diag; from row n0 + BLOCK_N - 1 - diag on, every
        # key of the tile is visible, so those query tiles need no per-element mask.
        m_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, m_lo), Lq)
    else:
        m_lo = 0
        m_full = 0
    for start_m in range(m_lo, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base,
                            delta_base, key_ok, start_m, offs_n, offs_d, d_ok, Lq, Lk, diag,
                            qk_scale, dropout_p, drop_scale, drop_base, seed,
                            BLOCK_M, True, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    for start_m in range(m_full, Lq, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, stride_ql, stride_dol, lse_base,
                            delta_base, key_ok, start_m, offs_n, offs_d, d_ok, Lq, Lk, diag,
                            qk_scale, dropout_p, drop_scale, drop_base, seed,
                            BLOCK_M, False, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    dk = dk * sm_scale
    mask = (offs_n[:, None] < Lk) & d_ok[None, :]
    out = b * stride_dkb + h * stride_dkh + cols * stride_dkl + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)

@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kpm_base,
             start_n, offs_m, offs_n, offs_d, d_ok, Lk, diag, qk_scale,
             dropout_p, drop_scale, drop_base, seed,
             MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_k = start_n + offs_n
    k_ptrs = k_base + offs_k[:, None].to(tl.int64) * stride_kl + offs_d[None, :]
    v_ptrs = v_base + offs_k[:, None].to(tl.int64) * stride_vl + offs_d[None, :]
    if HAS_KPM:
        # masked keys (may hold NaN / inf) read as 0: dS = 0 * finite there, dQ += 0 * 0
        km = tl.load(kpm_base + offs_k, mask=offs_k < Lk, other=0) != 0
        k = _load_rows(k_ptrs, km, d_ok, EVEN_D, UPCAST)
        v = _load_rows(v_ptrs, km, d_ok, EVEN_D, UPCAST)
    else:
        k = _load_tile(k_ptrs, offs_k, Lk, d_ok, MASKED, EVEN_D, UPCAST)
        v = _load_tile(v_ptrs, offs_k, Lk, d_ok, MASKED, EVEN_D, UPCAST)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        ok = offs_k[None, :] < Lk
        if IS_CAUSAL:
            ok = ok & (offs_k[None, :] <= offs_m[:, None] + diag)
        p = tl.where(ok, p, 0.0)
    if HAS_KPM:
        p = tl.where(km[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
    if HAS_DROPOUT:
        c = drop_base + offs_m[:, None].to(tl.int64) * Lk + offs_k[None, :]
        dp = tl.where(_dropout_keep(seed, c, dropout_p), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq

@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # inputs (B, L, H, D), last dim contiguous
    LSE, DELTA,  # (B, H, Lq) fp32
    KPM,  # (B, Lk) contiguous uint8 view of the bool mask
    RNG,  # (2,) int64 [seed, offset]
    DQ,  # (B, Lq, H, D) contiguous output
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    BH, H, Lq, Lk, sm_scale, qk_scale, dropout_p, drop_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query tiles see the most keys: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = _head_index()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    rows = offs_m[:, None].to(tl.int64)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows * stride_ql + offs_d[None, :],
                   offs_m, Lq, d_ok, True, EVEN_D, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows * stride_dol + offs_d[None, :],
                    offs_m, Lq, d_ok, True, EVEN_D, UPCAST)
    lse2 = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * Lk
    if HAS_DROPOUT:
        seed = tl.load(RNG)
        drop_base = tl.load(RNG + 1) + bh * Lq * Lk
    else:
        seed = 0
        drop_base = 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = Lk - Lq
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(Lk, m0 + BLOCK_M + diag), 0)
        full_end = tl.maximum(tl.minimum(Lk, m0 + diag + 1), 0)
        full_end = (full_end // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kpm_base,
                      start_n, offs_m, offs_n, offs_d, d_ok, Lk, diag, qk_scale,
                      dropout_p, drop_scale, drop_base, seed,
                      False, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, kpm_base,
                      start_n, offs_m, offs_n, offs_d, d_ok, Lk, diag, qk_scale,
                      dropout_p, drop_scale, drop_base, seed,
                      True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, EVEN_D, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dql + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & d_ok[None, :])

@triton.jit
def _cache_window(SEQLENS, LEFTPAD, b, n_new, Lmax, HAS_LEFTPAD: tl.constexpr):
    """(first slot, end slot, bad) of batch row b: it attends slots [first, end) with first =
    cache_leftpad[b] (0 without HAS_LEFTPAD) and end = cache_seqlens[b] + n_new. Bad when
    cache_seqlens[b] < 0, cache_seqlens[b] + n_new > Lmax, cache_leftpad[b] < 0 or cache_leftpad[b]
    > end; a bad row attends nothing (first = end = 0; its output is NaN, see combine)."""
    lens = tl.load(SEQLENS + b)  # int32, as written before this step
    bad = (lens < 0) | (lens > Lmax - n_new)  # no int32 overflow, whatever the length
    if HAS_LEFTPAD:
        pad = tl.load(LEFTPAD + b)  # int32
        bad = bad | (pad < 0) | (pad.to(tl.int64) > lens.to(tl.int64) + n_new)
        first = tl.where(bad, 0, pad)
    else:
        first = lens * 0
    return first, tl.where(bad, 0, tl.minimum(lens, Lmax - n_new) + n_new), bad

@triton.jit(do_not_specialize=["Lq", "Lmax", "nblk", "num_blocks"])
def _decode_append_kernel(
    KN, VN,  # (B, Lq, H, D) new keys / values
    KC, VC,  # (B, Lmax, H, D) caches, or (num_blocks, P, H, D) pages with HAS_BLOCK_TABLE; written at
             # the (logical) slots cache_seqlens[b] + i
    SEQLENS,  # (B,) int32 contiguous
    LEFTPAD,  # (B,) int32 contiguous cache_leftpad (unused without HAS_LEFTPAD)
    BT,  # (B, nblk) int32 contiguous block_table: slot j of row b is page BT[b, j // P], row j % P
         # (unused without HAS_BLOCK_TABLE)
    stride_knb, stride_knl, stride_knh, stride_vnb, stride_vnl, stride_vnh,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    BH, H, Lq, Lmax, nblk, P, num_blocks,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_BLOCK_TABLE: tl.constexpr,
):
    i = tl.program_id(0)  # new row
    bh = _head_index()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    lens = tl.load(SEQLENS + b)
    _, _, bad = _cache_window(SEQLENS, LEFTPAD, b, Lq, Lmax, HAS_LEFTPAD)
    ok = ~bad  # a bad row writes nothing
    if HAS_BLOCK_TABLE:
        slot = tl.where(ok, lens, 0) + i  # logical slot, < Lmax = nblk * P when ok
        page = tl.load(BT + b * nblk + slot // P, mask=ok, other=-1)
        ok = ok & (page >= 0) & (page < num_blocks)  # an out-of-range page entry: this slot is skipped
        page = tl.where(ok, page, 0).to(tl.int64)
        k_row = page * stride_kb + (slot % P).to(tl.int64) * stride_kl
        v_row = page * stride_vb + (slot % P).to(tl.int64) * stride_vl
    else:
        row = tl.where(ok, lens, 0).to(tl.int64) + i
        k_row = b * stride_kb + row * stride_kl
        v_row = b * stride_vb + row * stride_vl
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < tl.where(ok, HEAD_D, 0)
    kn = tl.load(KN + b * stride_knb + i.to(tl.int64) * stride_knl + h * stride_knh + offs_d, mask=mask)
    vn = tl.load(VN + b * stride_vnb + i.to(tl.int64) * stride_vnl + h * stride_vnh + offs_d, mask=mask)
    tl.store(KC + k_row + h * stride_kh + offs_d, kn, mask=mask)
    tl.store(VC + v_row + h * stride_vh + offs_d, vn, mask=mask)

@triton.jit(do_not_specialize=["Lq", "Lmax", "n_new", "nblk", "num_blocks"])
def _decode_split_kernel(
    Q,  # (B, Lq, H, D)
    KC, VC,  # (B, Lmax, H, D) caches, or (num_blocks, P, H, D) pages with HAS_BLOCK_TABLE (already
             # holding the new keys)
    SEQLENS,  # (B,) int32 contiguous: cache lengths before this step
    LEFTPAD,  # (B,) int32 contiguous cache_leftpad: first attended slot (unused without HAS_LEFTPAD)
    BT,  # (B, nblk) int32 contiguous block_table (unused without HAS_BLOCK_TABLE)
    OP,  # (B, H, S, Lq, BLOCK_D) fp32 partial outputs (normalised within the split)
    LSEP,  # (B, H, S, Lq) fp32 partial log2-sum-exp2, -inf for an empty split
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    BH, H, Lq, Lmax, n_new, num_splits, qk_scale, nblk, P, num_blocks,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    HAS_BLOCK_TABLE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = _head_index()  # (b*H + h) * num_splits + split
    if head >= BH * num_splits:
        return
    split = head % num_splits
    bh = head // num_splits
    b = bh // H
    h = bh % H
    EVEN_D: tl.constexpr = HEAD_D == BLOCK_D
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql
                   + offs_d[None, :], offs_m, Lq, d_ok, True, EVEN_D, UPCAST)
    # Keys of this row: slots [first, seqlen) (0, 0 when bad), seqlen <= Lmax.
    first, seqlen, _ = _cache_window(SEQLENS, LEFTPAD, b, n_new, Lmax, HAS_LEFTPAD)
    diag = seqlen - Lq
    # The splits share this row's key tiles from the one holding `first` (a device value, so the
    # split count stays a static); a split past the row's keys is empty: lse -inf, o 0 (combine).
    tile0 = (first // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(seqlen - tile0, num_splits), BLOCK_N) * BLOCK_N
    start = tile0 + split * chunk
    end = tl.minimum(start + chunk, seqlen)  # slots >= seqlen are never loaded
    if IS_CAUSAL:
        end = tl.minimum(end, m0 + BLOCK_M + diag)
    if HAS_BLOCK_TABLE:
        k_base = KC + h * stride_kh  # + page * stride_kb + (slot % P) * stride_kl per key
        v_base = VC + h * stride_vh
        bt_row = BT + b * nblk
        page_bad = offs_n < 0  # (BLOCK_N,) False: a page entry this split reads is out of range
    else:
        k_base = KC + b * stride_kb + h * stride_kh
        v_base = VC + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Decode is bandwidth-bound: every tile is masked (first and end are device values), the mask
    # is free; slots before `first` (left padding) are never loaded, as slots >= end.
    for start_n in range(start, end, BLOCK_N):
        offs_k = start_n + offs_n
        key_ok = (offs_k >= first) & (offs_k < end)  # (BLOCK_N,)
        if HAS_BLOCK_TABLE:
            # only the entries of attended slots are read; an out-of-range one is never dereferenced
            page = tl.load(bt_row + offs_k // P, mask=key_ok, other=0)  # (BLOCK_N,) int32
            page_ok = (page >= 0) & (page < num_blocks)
            page_bad = page_bad | (key_ok & ~page_ok)
            key_ok = key_ok & page_ok
            page = page.to(tl.int64)
            in_page = (offs_k % P).to(tl.int64)
            k_ptrs = k_base + (page * stride_kb + in_page * stride_kl)[:, None] + offs_d[None, :]
            v_ptrs = v_base + (page * stride_vb + in_page * stride_vl)[:, None] + offs_d[None, :]
        else:
            k_ptrs = k_base + offs_k[:, None].to(tl.int64) * stride_kl + offs_d[None, :]
            v_ptrs = v_base + offs_k[:, None].to(tl.int64) * stride_vl + offs_d[None, :]
        k = _load_rows(k_ptrs, key_ok, d_ok, EVEN_D, UPCAST)
        v = _load_rows(v_ptrs, key_ok, d_ok, EVEN_D, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = key_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_k[None, :] <= offs_m[:, None] + diag)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf"))
    if HAS_BLOCK_TABLE:
        # The causal clamp may leave this split's last slots unvisited (Lq > BLOCK_M): their page
        # entries are checked too, so every query row of a batch row sees the same verdict.
        chunk_end = tl.minimum(start + chunk, seqlen)
        for start_n in range(tl.maximum(end, start), chunk_end, BLOCK_N):
            offs_k = start_n + offs_n
            want = (offs_k >= first) & (offs_k < chunk_end)
            page = tl.load(bt_row + offs_k // P, mask=want, other=0)
            page_bad = page_bad | (want & ((page < 0) | (page >= num_blocks)))
        # A NaN partial makes the combined row NaN whatever its weight (0 * NaN = NaN): loud.
        o = tl.where(tl.max(page_bad.to(tl.int32), 0) > 0, float("nan"), o)
    row_ok = offs_m < Lq
    part = (bh * num_splits + split) * Lq
    tl.store(OP + (part + offs_m[:, None]) * BLOCK_D + offs_d[None, :], o, mask=row_ok[:, None])
    tl.store(LSEP + part + offs_m, lse2, mask=row_ok)

@triton.jit(do_not_specialize=["Lq", "Lmax", "n_new"])
def _decode_combine_kernel(
    OP, LSEP,  # partials from _decode_split_kernel
    O,  # (B, Lq, H, D) contiguous output, q.dtype
    SEQLENS,  # (B,) int32 contiguous: a bad length makes the row NaN
    LEFTPAD,  # (B,) int32 contiguous cache_leftpad: a bad one makes the row NaN (unused without HAS_LEFTPAD)
    stride_ob, stride_ol, stride_oh, BH, H, Lq, Lmax, n_new, num_splits,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
):
    i = tl.program_id(0)  # query row
    bh = _head_index()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    part = (bh * num_splits + offs_s) * Lq + i  # (BLOCK_S,)
    lse = tl.load(LSEP + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # 0 for empty splits
    den = tl.sum(w, 0)
    op = tl.load(OP + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(op * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)  # no key at all -> 0
    _, _, bad = _cache_window(SEQLENS, LEFTPAD, b, n_new, Lmax, HAS_LEFTPAD)
    o = tl.where(bad, float("nan"), o)
    tl.store(O + b * stride_ob + h * stride_oh + i.to(tl.int64) * stride_ol + offs_d,
             o.to(O.dtype.element_ty), mask=offs_d < HEAD_D)

# ----------------------------------------------------------------------------------------------
# Configs (heuristics; no autotune so the first call does not stall)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _device_info(index: int):
    """(major, minor, SM count) of a CUDA device, queried at first launch, never at import."""
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor, props.multi_processor_count


def _is_hopper(device) -> bool:
    return device.type == "cuda" and _device_info(device.index if device.index is not None
                                                  else torch.cuda.current_device())[0] >= 9


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


@functools.lru_cache(maxsize=None)
def _fwd_config(block_d: int, hopper: bool, dropout: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel.

    Chosen from ptxas -v (fp16, causal + key padding, CUDA 13 ptxas; see the report): every pick
    stays within 255 registers without spills. Not yet tuned by timing on a GPU.
    """
    if _INTERPRET:
        return 16, 16, 4, 1
    if block_d <= 64:
        return 128, 64, 8, 3
    if block_d <= 128:
        # philox state (4 words per score) spills the (128 x 64) tile (sm_90a, and sm_80 since the
        # [seed, offset] state is read from device memory: 44-60 bytes)
        return (128, 32, 8, 3) if dropout else (128, 64, 8, 3)
    # D = 256: q (64 x 256) + 2 stages of k, v (32 x 256): 70 KB (sm_80) / 100 KB (sm_90a) shared
    return 64, 32, 8, 2


@functools.lru_cache(maxsize=None)
def _bwd_config(block_d: int, hopper: bool):
    """((BLOCK_M, BLOCK_N, num_warps) of dk/dv, (BLOCK_M, BLOCK_N, num_warps) of dq, num_stages).

    dk/dv holds two fp32 (BLOCK_N x D) accumulators plus k, v: 8 warps is what keeps it off the
    local-memory spill path (ptxas, sm_80/sm_90a, with dropout). Not yet tuned by timing.
    """
    if _INTERPRET:
        return (16, 16, 4), (16, 16, 4), 1
    if block_d <= 64:
        return (32, 128, 8), (128, 32, 8), (3 if hopper else 2)
    if block_d <= 128:
        return (32, 64, 8), (128, 32, 8), 2
    return (32, 32, 8), (32, 32, 8), 1


def _decode_config(block_d: int, Lq: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); all Lq rows of a head share one program up to 64."""
    block_m = min(64, max(16, triton.next_power_of_2(Lq)))
    if _INTERPRET:
        return block_m, 16, 4, 1
    if block_d <= 64:
        return block_m, 64, 4, 3
    # ptxas: 64-71 registers, no spills, 70-75 KB shared at 3 stages (not tuned by timing)
    return block_m, (64 if block_d <= 128 else 32), 8, 3


def _num_splits(device, programs: int, Lmax: int, block_n: int) -> int:
    """Split count from statics only (Lmax, B*H*query blocks, SM count): CUDA-graph safe."""
    sms = 4 if _INTERPRET else _device_info(device.index if device.index is not None
                                            else torch.cuda.current_device())[2]
    min_keys = block_n if _INTERPRET else 256  # a split must amortise its combine traffic
    max_by_len = max(1, triton.cdiv(Lmax, min_keys))
    want = triton.cdiv(2 * sms, max(programs, 1))  # about two waves of programs
    return max(1, min(want, max_by_len, 128))


def _kpm_arg(key_padding_mask, q):
    if key_padding_mask is None:
        return q  # never read: HAS_KPM is False
    _require_contiguous(key_padding_mask, "key_padding_mask")
    return key_padding_mask.view(torch.uint8)  # bool -> same bytes, no copy


def _rng_arg(rng_state, dropout_p, q):
    """The [seed, offset] state tensor the kernels read (q as a never-read stand-in without dropout)."""
    check_rng_state(rng_state, dropout_p, q.device)
    return rng_state if dropout_p > 0.0 else q


def _require_contiguous(t, name):
    if not t.is_contiguous():
        raise ValueError(f"{name}: the kernels index it as contiguous (the op layer copies other "
                         f"layouts), got shape {tuple(t.shape)} with strides {t.stride()}")


# ----------------------------------------------------------------------------------------------
# Grids. Axis 0 (limit 2^31 - 1) carries the tile index, axes 1 and 2 (limit 65535 each) carry the
# heads: n = B*H is spread as ny * nz >= n with nz = cdiv(n, 65535), ny = cdiv(n, nz), so at most
# nz - 1 programs overhang (and return at once). Valid for B*H < 65535^2 and any int32 length.
# ----------------------------------------------------------------------------------------------
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _grid(tiles: int, heads: int):
    """(tiles, ny, nz) for `tiles` programs per head and `heads` = B*H heads."""
    nz = max(1, triton.cdiv(heads, GRID_LIMITS[2]))
    ny = max(1, triton.cdiv(heads, nz))
    grid = (max(1, tiles), ny, nz)
    if any(g > lim for g, lim in zip(grid, GRID_LIMITS)):
        raise ValueError(f"attention grid: {tiles} tiles x {heads} heads (B*H) exceed the launch limits "
                         f"{GRID_LIMITS} (got {grid})")
    return grid


def fwd_grid(B: int, H: int, Lq: int, block_m: int):
    return _grid(triton.cdiv(Lq, block_m), B * H)


def bwd_preprocess_grid(B: int, H: int, Lq: int, block_m: int):
    return _grid(triton.cdiv(Lq, block_m), B * H)


def bwd_dkdv_grid(B: int, H: int, Lk: int, block_n: int):
    return _grid(triton.cdiv(Lk, block_n), B * H)


def bwd_dq_grid(B: int, H: int, Lq: int, block_m: int):
    return _grid(triton.cdiv(Lq, block_m), B * H)


def decode_append_grid(B: int, H: int, Lq: int):
    return _grid(Lq, B * H)  # one program per new row and head


def decode_split_grid(B: int, H: int, Lq: int, block_m: int, num_splits: int):
    return _grid(triton.cdiv(Lq, block_m), B * H * num_splits)  # axes 1, 2 = (b, h, split)


def decode_combine_grid(B: int, H: int, Lq: int):
    return _grid(Lq, B * H)  # one program per query row and head


_PREPROCESS_BLOCK_M = 16 if _INTERPRET else 64


# ----------------------------------------------------------------------------------------------
# Launchers (the launcher contract in the module docstring)
# ----------------------------------------------------------------------------------------------
def attention_fwd(q, k, v, key_padding_mask, softmax_scale: float, causal: bool, dropout_p: float,
                  rng_state):
    """-> (o (B, Lq, H, D) q.dtype, lse (B, H, Lq) fp32). Arguments as validated by the op module;
    rng_state: int64 [seed, offset] on q's device (read by the kernel), or None when dropout_p == 0."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    has_drop = dropout_p > 0.0
    kpm = _kpm_arg(key_padding_mask, q)
    rng = _rng_arg(rng_state, dropout_p, q)
    if B * H * Lq == 0:
        return o, lse
    block_d = _block_d(D)
    BM, BN, warps, stages = _fwd_config(block_d, _is_hopper(q.device), has_drop)
    _attn_fwd_kernel[fwd_grid(B, H, Lq, BM)](
        q, k, v, o, lse, kpm, rng,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        B * H, H, Lq, Lk, float(softmax_scale) * _LOG2E, float(dropout_p),
        1.0 / (1.0 - dropout_p) if has_drop else 1.0,
        HEAD_D=D, BLOCK_D=block_d, BLOCK_M=BM, BLOCK_N=BN, IS_CAUSAL=bool(causal),
        HAS_KPM=key_padding_mask is not None, HAS_DROPOUT=has_drop,
        UPCAST=_INTERPRET, num_warps=warps, num_stages=stages,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, rng_state,
                  deterministic: bool):
    """-> (dq, dk, dv) in q.dtype, shapes of q/k/v, contiguous.

    dq always comes from its own kernel looping over key tiles (no atomics), so the result is
    bitwise reproducible whether or not `deterministic` is set; the flag therefore changes nothing.
    """
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    dk = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    dv = torch.empty((B, Lk, H, D), dtype=q.dtype, device=q.device)  # (B, Lk, H, D)
    has_drop = dropout_p > 0.0
    kpm = _kpm_arg(key_padding_mask, q)
    rng = _rng_arg(rng_state, dropout_p, q)
    if B * H == 0 or (Lq == 0 and Lk == 0):
        return dq, dk, dv
    if Lq == 0:
        return dq, dk.zero_(), dv.zero_()
    block_d = _block_d(D)
    (BM1, BN1, warps1), (BM2, BN2, warps2), stages = _bwd_config(block_d, _is_hopper(q.device))
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # (B, H, Lq)
    _attn_bwd_preprocess_kernel[bwd_preprocess_grid(B, H, Lq, _PREPROCESS_BLOCK_M)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        B * H, H, Lq, HEAD_D=D, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M, num_warps=4,
    )
    common = (B * H, H, Lq, Lk, float(softmax_scale), float(softmax_scale) * _LOG2E, float(dropout_p),
              1.0 / (1.0 - dropout_p) if has_drop else 1.0)
    flags = dict(HEAD_D=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal),
                 HAS_KPM=key_padding_mask is not None, HAS_DROPOUT=has_drop, UPCAST=_INTERPRET,
                 num_stages=stages)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    if Lk > 0:
        _attn_bwd_dkdv_kernel[bwd_dkdv_grid(B, H, Lk, BN1)](
            q, k, v, do, lse, delta, kpm, rng, dk, dv, *strides,
            dk.stride(0), dk.stride(1), dk.stride(2), *common,
            BLOCK_M=BM1, BLOCK_N=BN1, num_warps=warps1, **flags,
        )
    _attn_bwd_dq_kernel[bwd_dq_grid(B, H, Lq, BM2)](
        q, k, v, do, lse, delta, kpm, rng, dq, *strides,
        dq.stride(0), dq.stride(1), dq.stride(2), *common,
        BLOCK_M=BM2, BLOCK_N=BN2, num_warps=warps2, **flags,
    )
    return dq, dk, dv


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale: float,
                           causal: bool, cache_leftpad=None, block_table=None, num_splits=None):
    """Decode step -> o (B, Lq, H, D) q.dtype; writes k_new/v_new into the caches in place.

    Never syncs the host. Row b attends slots cache_leftpad[b] (0 when None) .. cache_seqlens[b] +
    Lq_new - 1. A batch row whose lengths are bad (cache_seqlens[b] < 0, cache_seqlens[b] + Lq >
    Lmax with new keys, cache_leftpad[b] < 0 or > cache_seqlens[b] + Lq_new) gets NaN output rows and
    no cache write; slots outside a row's window are never read (torch.empty garbage there cannot
    leak in). `num_splits` (extra, keyword) forces the split count, for tests; None picks it from statics.
    block_table (B, nblk) int32 contiguous (paged cache, flash-attn's convention): k_cache, v_cache
    are (num_blocks, P, H, D) pages and logical slot j of row b is k_cache[block_table[b, j // P],
    j % P]; every slot above (and Lmax = nblk * P) is logical. Only the entries of attended or written
    slots are read; one out of [0, num_blocks) is never dereferenced: that slot is not written and
    the row's output rows are NaN.
    """
    B, Lq, H, D = q.shape
    paged = block_table is not None
    if paged:
        _require_contiguous(block_table, "block_table")
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected a (B={B}, max_num_blocks_per_seq) int32 tensor, got "
                             f"shape {tuple(block_table.shape)} and dtype {block_table.dtype}")
        nblk, num_blocks = block_table.shape[1], k_cache.shape[0]
        page_size = max(1, k_cache.shape[1])  # no slot exists when k_cache.shape[1] == 0 (Lmax = 0)
        Lmax = nblk * k_cache.shape[1]  # logical
        bt = block_table
    else:
        nblk, page_size, num_blocks = 0, 1, 0  # unused without HAS_BLOCK_TABLE
        Lmax = k_cache.shape[1]
        bt = cache_seqlens  # never read without HAS_BLOCK_TABLE
    _require_contiguous(cache_seqlens, "cache_seqlens")
    has_pad = cache_leftpad is not None
    if has_pad:
        _require_contiguous(cache_leftpad, "cache_leftpad")
    leftpad = cache_leftpad if has_pad else cache_seqlens  # never read without HAS_LEFTPAD
    o = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)  # (B, Lq, H, D)
    if B * H * Lq == 0:
        return o
    block_d = _block_d(D)
    n_new = 0
    if k_new is not None:
        n_new = Lq
        _decode_append_kernel[decode_append_grid(B, H, Lq)](
            k_new, v_new, k_cache, v_cache, cache_seqlens, leftpad, bt,
            k_new.stride(0), k_new.stride(1), k_new.stride(2), v_new.stride(0), v_new.stride(1), v_new.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            B * H, H, Lq, Lmax, nblk, page_size, num_blocks,
            HEAD_D=D, BLOCK_D=block_d, HAS_LEFTPAD=has_pad, HAS_BLOCK_TABLE=paged, num_warps=1,
        )
    BM, BN, warps, stages = _decode_config(block_d, Lq)
    m_blocks = triton.cdiv(Lq, BM)
    if num_splits is None:
        num_splits = _num_splits(q.device, B * H * m_blocks, Lmax, BN)
    num_splits = max(1, min(num_splits, GRID_LIMITS[1] * GRID_LIMITS[2] // (B * H)))  # (b, h, split) on axes 1, 2
    chunk = triton.cdiv(triton.cdiv(max(Lmax, 1), num_splits), BN) * BN
    num_splits = max(1, triton.cdiv(max(Lmax, 1), chunk))  # no split starts past Lmax
    o_part = torch.empty((B, H, num_splits, Lq, block_d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, num_splits, Lq), dtype=torch.float32, device=q.device)
    _decode_split_kernel[decode_split_grid(B, H, Lq, BM, num_splits)](
        q, k_cache, v_cache, cache_seqlens, leftpad, bt, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        B * H, H, Lq, Lmax, n_new, num_splits, float(softmax_scale) * _LOG2E, nblk, page_size, num_blocks,
        HEAD_D=D, BLOCK_D=block_d, BLOCK_M=BM, BLOCK_N=BN, IS_CAUSAL=bool(causal),
        UPCAST=_INTERPRET, HAS_LEFTPAD=has_pad, HAS_BLOCK_TABLE=paged, num_warps=warps, num_stages=stages,
    )
    _decode_combine_kernel[decode_combine_grid(B, H, Lq)](
        o_part, lse_part, o, cache_seqlens, leftpad, o.stride(0), o.stride(1), o.stride(2),
        B * H, H, Lq, Lmax, n_new, num_splits,
        HEAD_D=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        HAS_LEFTPAD=has_pad, num_warps=4,
    )
    return o


# ----------------------------------------------------------------------------------------------
# Capabilities
# ----------------------------------------------------------------------------------------------
def _common_reason(q, tensors) -> "str | None":
    if q.device.type == "cuda":
        if _INTERPRET:
            return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors only"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"q.dtype: expected float16 or bfloat16 on CUDA, got {q.dtype}"
        major, minor, _ = _device_info(q.device.index)
        if major < 8:  # tile configs assume sm_80+ shared memory; bf16 dots need sm_80
            return f"GPU: expected compute capability >= 8.0, got {major}.{minor}"
    elif q.device.type == "cpu":
        if not _INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"q.dtype: expected float32, float16 or bfloat16, got {q.dtype}"
    else:
        return f"q.device: expected cuda (or cpu under TRITON_INTERPRET=1), got {q.device.type}"
    if q.dim() != 4:
        return f"q: expected 4 dims (B, L, H, D), got {q.dim()}"
    D = q.shape[-1]
    if D not in _SUPPORTED_HEAD_DIMS:
        return f"head dim: expected a multiple of 8 in [8, 256], got {D}"
    for name, t in tensors:
        if t.dim() != 4 or t.shape[-1] != D:
            return f"{name}: expected (B, L, H, {D}), got {tuple(t.shape)}"
        if t.dtype != q.dtype:
            return f"{name}.dtype: expected {q.dtype} (q's), got {t.dtype}"
        if t.device != q.device:
            return f"{name}.device: expected {q.device}, got {t.device}"
    for name, t in [("q", q)] + list(tensors):
        if t.stride(-1) != 1:
            return f"{name}.stride(-1): expected 1, got {t.stride(-1)}"
        if t.shape[1] >= 2**31:  # row indices are int32 in the kernels
            return f"{name}: expected a length (dim 1) below 2^31, got {t.shape[1]}"
    heads = q.shape[0] * q.shape[2]
    if heads > GRID_LIMITS[1] * GRID_LIMITS[2]:
        return f"B*H: expected at most 65535^2 heads (grid axes 1 and 2), got {heads}"
    return None


def unsupported_reason(q, k, v, causal, key_padding_mask, dropout_p) -> "str | None":
    reason = _common_reason(q, [("k", k), ("v", v)])
    if reason is not None:
        return reason
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            return f"key_padding_mask.dtype: expected torch.bool, got {key_padding_mask.dtype}"
        if tuple(key_padding_mask.shape) != (q.shape[0], k.shape[1]):
            return (f"key_padding_mask: expected shape {(q.shape[0], k.shape[1])}, "
                    f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            return f"key_padding_mask.device: expected {q.device}, got {key_padding_mask.device}"
    if not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p: expected 0 <= p < 1, got {dropout_p}"
    return None


def kvcache_unsupported_reason(q, k_cache, v_cache=None, k_new=None, v_new=None,
                               block_table=None) -> "str | None":
    others = [(n, t) for n, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new))
              if t is not None]
    reason = _common_reason(q, others)
    if reason is not None or block_table is None:
        return reason
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        return (f"block_table: expected a 2-dim int32 tensor, got {block_table.dim()} dims of "
                f"{block_table.dtype}")
    if block_table.device != q.device:
        return f"block_table.device: expected {q.device}, got {block_table.device}"
    if v_cache is not None and v_cache.shape[:2] != k_cache.shape[:2]:
        return (f"v_cache: expected k_cache's (num_blocks, page_block_size) {tuple(k_cache.shape[:2])}, "
                f"got {tuple(v_cache.shape[:2])}")
    if block_table.shape[1] * k_cache.shape[1] >= 2**31:  # logical slots are int32 in the kernels
        return (f"block_table: expected max_num_blocks_per_seq * page_block_size below 2^31, got "
                f"{block_table.shape[1]} * {k_cache.shape[1]}")
    return None
