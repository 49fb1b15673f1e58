"""fl.attention and fl.attention_with_kvcache: fused scaled-dot-product attention.

Layout: (B, L, H, D) -- batch, sequence, heads, head dim -- as flash-attn, NOT the (B, H, L, D) of
F.scaled_dot_product_attention (from SDPA's layout pass `q.transpose(1, 2)`, a free view).
key_padding_mask: (B, Lk) bool, True = attend; nn.MultiheadAttention's key_padding_mask is the
opposite (True = ignore): pass `~mask`.

Guarantees, every backend:
  - causal is bottom-right aligned: query i attends key j iff j <= i + (Lk - Lq);
  - a key hidden by key_padding_mask (or, in attention_with_kvcache, a cache slot before the row's
    cache_leftpad or at / past its length) never affects the output nor any gradient, even when its
    k / v rows hold NaN or inf; its dk / dv are 0. A query with no key gets a zero output row and
    zero gradients.
    Keys hidden only by causality are real tokens: no such guarantee (a NaN there propagates);
  - dropout: a counter-based Philox mask (kernels/philox.py is the spec) drawn from an rng_state
    TENSOR [seed, offset] made by torch.randint on q's device -- torch.manual_seed fixes it, a CUDA
    graph replay redraws it, the host never syncs -- saved (never the mask) for the backward.
  - attention_with_kvcache never synchronises with a CUDA device in eager mode.

Pieces, in the order every op module follows: the reference (float64-capable; the oracle of the
tests and the custom ops' torch launchers), the "torch" backend (the native composition on
F.scaled_dot_product_attention, differentiable by torch's own autograd), validation, the eager path
(kernel launchers directly; one autograd.Function when a gradient is needed), the torch.compile path
and the torch.library custom ops fastlayers::attention_fwd / attention_bwd / attention_with_kvcache.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import OpBackends
from ._common import (autocast_cast, autocast_dtype, autocast_off, check_like, check_tensor, device_guard, dtype_name,
                      needs_grad, request_for_trace, resolve_in_op, torch_at_trace, vector_arg)
from ..kernels.philox import dropout_keep_mask

OP = "attention"
OP_KV = "attention_with_kvcache"
_REF_CHUNK_ELEMS = 1 << 26  # reference: bound the (B, H, rows, Lk) score block to ~256 MB of fp32
CHECK_LENGTHS_ENV = "FASTLAYERS_CHECK_LENGTHS"  # "1": check cache lengths on the host for CUDA tensors too
_LAYOUT = ("fl.attention takes (B, L, H, D) tensors; tensors in F.scaled_dot_product_attention's "
           "(B, H, L, D) layout need .transpose(1, 2)")


# ----------------------------------------------------------------------------- reference
def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _zero_rows(t: Tensor, keep: Tensor) -> Tensor:
    """t (B, L, H, D) with the rows where keep (B, L) is False set to 0 (NaN / inf included), so a
    hidden key's 0 probability cannot meet a NaN value (0 * NaN = NaN)."""
    return torch.where(keep.reshape(keep.shape[0], keep.shape[1], 1, 1), t, 0.0)  # cheaper than [:, :, None, None]


# A hidden key's score must stay finite where SDPA adds its mask's -inf (inf - inf = NaN): hidden k
# rows up to this magnitude keep |q . k| finite in float32 unless |q| ~ 1e24 (which overflows on real keys).
_SAFE_HIDDEN_K = 2.0 ** 40
# Below this many elements per tensor the two copies cost less than the check's ~10 small ops (CPU).
_CHECK_HIDDEN_MIN_ELEMS = 1 << 20


def _hidden_rows_safe(k_rows, v_rows) -> bool:
    """Host check (CPU tensors only): hidden k rows small enough, hidden v rows finite (0 * NaN = NaN)."""
    with torch.no_grad():
        if k_rows.numel() == 0:
            return True
        return bool((k_rows.abs().amax() <= _SAFE_HIDDEN_K) & torch.isfinite(v_rows.sum(dtype=_acc(v_rows))))


def _hide_values(k, v, valid):
    """k, v (B, L, H, D) made safe for the rows where valid (B, L) is False: a hidden key's 0 weight
    times a NaN value is NaN, so those rows are zeroed (a copy of k and v). On the CPU, outside
    torch.compile, the hidden rows are checked first -- free to read there, a fraction of the copy --
    and k, v are used as they are when they are harmless (see _hidden_rows_safe)."""
    if k.device.type == "cpu" and not torch.compiler.is_compiling() and k.numel() >= _CHECK_HIDDEN_MIN_ELEMS:
        hidden = ~valid
        if _hidden_rows_safe(k[hidden], v[hidden]):
            return k, v
    return _zero_rows(k, valid), _zero_rows(v, valid)


def _valid_keys(B, Lk, key_padding_mask, kv_lens, device):
    """(B, Lk) bool of the keys a row may attend (padding and per-batch length), or None."""
    valid = key_padding_mask
    if kv_lens is not None:
        within = torch.arange(Lk, device=device)[None, :] < kv_lens.to(device).long()[:, None]
        valid = within if valid is None else valid & within
    return valid


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
    valid = _valid_keys(B, Lk, key_padding_mask, kv_lens, device)
    if valid is not None:
        valid = valid.view(B, 1, 1, Lk)
        allowed = valid if allowed is None else allowed & valid
    return allowed


def _chunks(B, H, Lq, Lk):
    rows = max(1, min(Lq, _REF_CHUNK_ELEMS // max(1, B * H * Lk)))
    return [(s, min(Lq, s + rows)) for s in range(0, Lq, rows)]


def attention_ref(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state, kv_lens=None):
    """Reference forward: (o (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32 (fp64 for fp64); +inf for
    empty rows). rng_state: int64 [seed, offset] tensor (read with tensor ops) or None when p == 0."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = _acc(q)
    valid = _valid_keys(B, Lk, key_padding_mask, kv_lens, q.device)
    if valid is not None:
        k, v = _zero_rows(k, valid), _zero_rows(v, valid)
    kh = k.to(acc).transpose(1, 2)                                                # (B, H, Lk, D)
    vh = v.to(acc).transpose(1, 2)
    o = torch.empty((B, Lq, H, v.shape[-1]), dtype=acc, device=q.device)          # (B, Lq, H, D)
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
            keep = dropout_keep_mask(rng_state, B, H, Lq, Lk, q.device, dropout_p, q0, q1)
            p = p * keep / (1.0 - dropout_p)
        o[:, q0:q1] = torch.matmul(p, vh).transpose(1, 2)
        lse[:, :, q0:q1] = m
    return o.to(q.dtype), lse  # a tensor of its own (never a view): autograd.Function outputs may be edited


def attention_ref_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, rng_state,
                      deterministic):
    """Reference backward from the saved lse: (dq, dk, dv) in the inputs' dtypes."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = _acc(q)
    if key_padding_mask is not None:
        k, v = _zero_rows(k, key_padding_mask), _zero_rows(v, key_padding_mask)
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
            keep = dropout_keep_mask(rng_state, B, H, Lq, Lk, q.device, dropout_p, q0, q1)
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


def _kv_write_ok(cache_seqlens, n_new, Lmax, cache_leftpad=None):
    """(B,) bool: the batch rows whose lengths are valid (0 <= len, len + n_new <= Lmax, and with
    cache_leftpad 0 <= leftpad <= len + n_new), on the device."""
    lens = cache_seqlens.long()
    ok = (lens >= 0) & (lens + n_new <= Lmax)
    if cache_leftpad is not None:
        pad = cache_leftpad.long()
        ok = ok & (pad >= 0) & (pad <= lens + n_new)
    return ok


def _kv_window_mask(cache_leftpad, Lk, device):
    """(B, Lk) bool, True from slot cache_leftpad[b] on: the keys a left-padded row may attend (the
    upper end, the row's length, is applied as kv_lens)."""
    return torch.arange(Lk, device=device)[None, :] >= cache_leftpad.to(device).long()[:, None]


def _kv_write(k_cache, v_cache, cache_seqlens, k_new, v_new, ok):
    """Writes k_new / v_new (B, Lq, H, D) at rows len .. len+Lq-1 of each batch whose `ok` is True, with
    device index tensors only (no host read, graph-capturable). A bad batch row writes its own old
    values back at clamped positions: the cache is unchanged there."""
    B, Lq = k_new.shape[:2]
    Lmax = k_cache.shape[1]
    if B == 0 or Lq == 0 or Lmax == 0:
        return
    pos = (cache_seqlens.long()[:, None] + torch.arange(Lq, device=k_cache.device)).clamp(0, Lmax - 1)  # (B, Lq)
    bidx = torch.arange(B, device=k_cache.device)[:, None].expand(B, Lq)                                 # (B, Lq)
    okr = ok[:, None, None, None]
    k_cache[bidx, pos] = torch.where(okr, k_new.to(k_cache.dtype), k_cache[bidx, pos])
    v_cache[bidx, pos] = torch.where(okr, v_new.to(v_cache.dtype), v_cache[bidx, pos])


# ----------------------------------------------------------------------------- paged caches
# With block_table (B, max_num_blocks) int32, as flash-attn's: the caches are (num_blocks, P, H, D)
# pages and row b's LOGICAL slot j lives at cache[block_table[b, j // P], j % P]; every length rule
# is in logical slots, Lmax = max_num_blocks * P. The pieces below serve the reference and the torch
# backend: the per-row check of the entries a step reads or writes, the write of the new rows at
# their pages, and the gather of the logical caches.
def _paged_lmax(k_cache, block_table):
    return block_table.shape[1] * k_cache.shape[1]


def _paged_entries_ok(block_table, num_blocks, P, cache_seqlens, n_new, cache_leftpad):
    """(B,) bool on the device: every block_table entry covering a slot row b attends ([leftpad,
    len + n_new)) is in [0, num_blocks)."""
    return ~_paged_bad_entries(block_table, num_blocks, P, cache_seqlens, n_new, cache_leftpad, False).any(1)


def _paged_bad_entries(block_table, num_blocks, P, cache_seqlens, n_new, cache_leftpad, writes=True):
    """(B, max_num_blocks) bool: the entries a step attends (and with `writes`, writes: a new row in
    the left padding) that are out of [0, num_blocks)."""
    nblk = block_table.shape[1]
    lens = cache_seqlens.long()
    total = lens + n_new
    lo = cache_leftpad.long() if cache_leftpad is not None else torch.zeros_like(lens)
    if n_new and writes:
        lo = torch.minimum(lo, lens)
    e = torch.arange(nblk, device=block_table.device)[None, :]                        # (1, nblk)
    used = torch.maximum(e * P, lo[:, None]) < torch.minimum((e + 1) * P, total[:, None])  # (B, nblk)
    return used & ((block_table < 0) | (block_table >= num_blocks))


def _paged_logical(cache, block_table, n_blocks=None):
    """The logical cache (B, n_blocks * P, H, D) (a gathered copy) of the first n_blocks entries per
    row (all by default); out-of-range entries read page 0 (or zeros when there is no page): the
    callers NaN those rows."""
    table = block_table if n_blocks is None else block_table[:, :n_blocks]
    B, n = table.shape
    nb, P, H, D = cache.shape
    if nb == 0:
        return cache.new_zeros((B, n * P, H, D))
    return cache[table.long().clamp(0, nb - 1)].reshape(B, n * P, H, D)


def _paged_write(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, ok):
    """Writes k_new / v_new (B, Lq, H, D) of the rows where `ok` at their pages, with device index
    tensors only (graph-capturable). A write that must not happen (bad row, or a page entry out of
    range) is turned into a copy of a write that does (or, when none does, of an old value back to
    where it was): a duplicate index of index_put then always carries the same value."""
    B, Lq = k_new.shape[:2]
    nb, P = k_cache.shape[:2]
    Lmax = block_table.shape[1] * P
    if B == 0 or Lq == 0 or Lmax == 0 or nb == 0:
        return
    pos = (cache_seqlens.long()[:, None] + torch.arange(Lq, device=k_cache.device)).clamp(0, Lmax - 1)  # (B, Lq)
    entry = block_table.long().gather(1, pos // P)                                     # (B, Lq)
    valid = (ok[:, None] & (entry >= 0) & (entry < nb)).reshape(-1)                  # (B*Lq,)
    blk, off = entry.clamp(0, nb - 1).reshape(-1), (pos % P).reshape(-1)
    # a valid write, if any; (1,)-shaped index_select, never a 0-dim index (that would be .item(): a
    # host sync on CUDA, a graph break under torch.compile)
    anchor = valid.to(torch.int32).argmax().view(1)
    blk = torch.where(valid, blk, blk.index_select(0, anchor))
    off = torch.where(valid, off, off.index_select(0, anchor))
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        new = new.reshape(B * Lq, *new.shape[2:]).to(cache.dtype)
        val = torch.where(valid[:, None, None], new, cache[blk, off])
        val = torch.where(valid[:, None, None], val, val.index_select(0, anchor))
        cache[blk, off] = val


def attention_with_kvcache_ref(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal,
                               cache_leftpad=None, block_table=None):
    """Reference decode step (the semantics of every backend): writes the new rows of valid batch rows
    at slots len .. len+Lq_new-1, attends slots leftpad .. len+Lq_new-1 (leftpad = 0 without
    cache_leftpad; causal bottom-right on the absolute slots); a bad batch row (len < 0, len + Lq_new >
    Lmax, leftpad < 0 or leftpad > len + Lq_new) writes nothing and gets NaN output rows.
    block_table: slots are logical (see "paged caches" above); a row attending a slot whose entry is
    out of range gets NaN output rows; a new row whose entry is out of range is not written (the
    row's other new rows are)."""
    if block_table is not None:
        return _paged_step(attention_with_kvcache_ref, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                           softmax_scale, causal, cache_leftpad, block_table)
    Lq, Lmax = q.shape[1], k_cache.shape[1]
    n_new = Lq if k_new is not None else 0
    ok = _kv_write_ok(cache_seqlens, n_new, Lmax, cache_leftpad)
    if k_new is not None:
        _kv_write(k_cache, v_cache, cache_seqlens, k_new, v_new, ok)
    lens = cache_seqlens.to(q.device).long() + n_new
    window = _kv_window_mask(cache_leftpad, Lmax, q.device) if cache_leftpad is not None else None
    o, _ = attention_ref(q, k_cache, v_cache, window, softmax_scale, causal, 0.0, None, kv_lens=lens)
    return o.masked_fill(~ok[:, None, None, None], float("nan"))


def _paged_step(step, q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, cache_leftpad,
                block_table, n_blocks=None):
    """A paged decode step as `step` (a non-paged implementation) on the logical caches: the new rows
    written at their pages, the first n_blocks entries per row gathered (all by default), then `step`
    with no new rows and each row's length after the append (-1, a bad length, for a row whose
    lengths or page entries are bad: NaN rows)."""
    n_new = q.shape[1] if k_new is not None else 0
    ok = _kv_write_ok(cache_seqlens, n_new, _paged_lmax(k_cache, block_table), cache_leftpad)
    if k_new is not None:  # rows of good lengths, each new row where its page entry is in range
        _paged_write(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, ok)
    ok = ok & _paged_entries_ok(block_table, k_cache.shape[0], k_cache.shape[1], cache_seqlens, n_new,
                                cache_leftpad)
    lens = torch.where(ok, cache_seqlens.long() + n_new, -1).to(torch.int32)
    kl, vl = _paged_logical(k_cache, block_table, n_blocks), _paged_logical(v_cache, block_table, n_blocks)
    return step(q, kl, vl, lens, None, None, scale, causal, cache_leftpad=cache_leftpad)


# ----------------------------------------------------------------------------- "torch" backend
def attention_torch(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state):
    """The "torch" backend: fl.attention's semantics on F.scaled_dot_product_attention (bool mask),
    differentiable by torch's own autograd, traceable by torch.compile. -> (B, Lq, H, D) contiguous.
    With dropout the mask must be the Philox spec's, which SDPA cannot take: the plain math then."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if dropout_p > 0:
        return _attention_math(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state)
    if Lk == 0:  # no key at all: zero rows, zero (connected) gradients
        return torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q, 0.0)
    host = q.device.type == "cpu" and not torch.compiler.is_compiling()  # tensors readable for free
    pad_counts = None
    if key_padding_mask is not None:
        if host:
            pad_counts = key_padding_mask.sum(1).tolist()                          # keys per batch row
            if min(pad_counts, default=Lk) == Lk:
                key_padding_mask = None  # nothing padded (a tokenizer's all-ones mask): no mask at all
        if key_padding_mask is not None:
            k, v = _hide_values(k, v, key_padding_mask)
    allowed, is_causal = None, False
    causal_mask = causal and not (Lq == 1 or Lq == 0)  # one query (decode) sees every key: no mask
    if causal_mask:
        if Lq == Lk and key_padding_mask is None:
            is_causal = True  # SDPA's top-left alignment equals bottom-right when Lq == Lk
        else:
            j = torch.arange(Lk, device=q.device)
            i = torch.arange(Lq, device=q.device)
            allowed = (j[None, :] <= i[:, None] + (Lk - Lq))[None, None]           # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(B, 1, 1, Lk)
        allowed = pad if allowed is None else allowed & pad
    # A row with no key: SDPA returns NaN there. It attends every (zeroed or real) key instead and is
    # zeroed after, which also zeroes its gradients. Padding alone: known from the host counts.
    empty = None
    if allowed is not None and (key_padding_mask is not None or Lq > Lk):
        if not (host and allowed.shape[2] == 1 and 0 not in pad_counts):
            empty = ~allowed.any(-1, keepdim=True)                                 # (B|1, 1, Lq|1, 1)
            if host and not bool(empty.any()):
                empty = None
            else:
                allowed = allowed | empty
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed, is_causal=is_causal, scale=softmax_scale)  # (B, H, Lq, D)
    if empty is not None:
        o = o.masked_fill(empty, 0.0)
    o = o.transpose(1, 2)                                                          # (B, Lq, H, D)
    return o if o.is_contiguous() else o.contiguous()  # SDPA on CPU already writes this layout


def _attention_math(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state):
    """softmax(q k^T * scale) with the spec's dropout mask, then @ v, in fp32 (fp64 for fp64) math."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    acc = _acc(q)
    if key_padding_mask is not None:
        k, v = _hide_values(k, v, key_padding_mask)
    qh, kh, vh = (t.to(acc).transpose(1, 2) for t in (q, k, v))                   # (B, H, L, D)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale                    # (B, H, Lq, Lk)
    allowed = _allowed(B, Lq, Lk, causal, key_padding_mask, q.device, 0, Lq)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if Lk else s.new_zeros((B, H, Lq, 1))
    m = torch.where(torch.isfinite(m), m, 0.0)                                    # empty rows: exp(-inf) = 0
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, 1.0, den)
    keep = dropout_keep_mask(rng_state, B, H, Lq, Lk, q.device, dropout_p)
    p = p * (keep.to(acc) * (1.0 / (1.0 - dropout_p)))
    return torch.matmul(p, vh).transpose(1, 2).to(q.dtype).contiguous()


def attention_with_kvcache_torch(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal,
                                 cache_leftpad=None, block_table=None):
    """The "torch" backend of the decode step, on SDPA. CPU tensors (outside torch.compile): lengths
    read on the host (free there), keys sliced to the window the rows need. Other devices: no host
    read -- masks over Lmax, unused slots zeroed (NaN-proof), bad rows NaN. block_table: the logical
    caches are gathered (on the host path only the pages up to the longest row), a copy per call."""
    host = q.device.type == "cpu" and not torch.compiler.is_compiling()
    if block_table is not None:
        n_blocks = None
        if host and cache_seqlens.numel():
            n_new = q.shape[1] if k_new is not None else 0
            longest = max(0, int(cache_seqlens.max()) + n_new)
            n_blocks = min(block_table.shape[1], -(-longest // max(k_cache.shape[1], 1)))
        return _paged_step(attention_with_kvcache_torch, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                           softmax_scale, causal, cache_leftpad, block_table, n_blocks)
    if host:
        return _kvcache_torch_host(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal,
                                   cache_leftpad)
    return _kvcache_torch_device(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal,
                                 cache_leftpad)


def _kvcache_torch_host(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, cache_leftpad=None):
    B, Lq = q.shape[:2]
    Lmax = k_cache.shape[1]
    n_new = Lq if k_new is not None else 0
    lens = cache_seqlens.tolist()
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * B  # first attended slot per row
    ok = [0 <= n and n + n_new <= Lmax and 0 <= s <= n + n_new for n, s in zip(lens, starts)]
    same = all(ok) and len(set(lens)) <= 1 and len(set(starts)) <= 1
    if n_new:
        if same and B:  # one copy per cache (the common static-batch decode)
            k_cache[:, lens[0]:lens[0] + Lq] = k_new
            v_cache[:, lens[0]:lens[0] + Lq] = v_new
        elif all(ok):  # one indexed write per cache
            pos = torch.tensor(lens)[:, None] + torch.arange(Lq)                      # (B, Lq)
            bidx = torch.arange(B)[:, None].expand(B, Lq)
            k_cache[bidx, pos] = k_new
            v_cache[bidx, pos] = v_new
        else:
            for b, n in enumerate(lens):
                if ok[b]:
                    k_cache[b, n:n + Lq] = k_new[b]
                    v_cache[b, n:n + Lq] = v_new[b]
    totals = [n + n_new for n in lens]
    if same:  # every row attends keys s .. n-1 of its own cache: a plain causal/full attention
        n, s = (totals[0], starts[0]) if B else (n_new, 0)
        return attention_torch(q, k_cache[:, s:n], v_cache[:, s:n], None, scale, causal, 0.0, None)
    if all(ok):
        # One SDPA over the slots some row attends (lo .. n-1), masked per row -- if the unused slots
        # inside that window are harmless (_hidden_rows_safe); else one SDPA per row on exactly its keys.
        lo, n = min(starts), max(totals)
        kw, vw = k_cache[:, lo:n], v_cache[:, lo:n]                                # (B, n - lo, H, D) views
        total, start = torch.tensor(totals) - lo, torch.tensor(starts) - lo        # (B,) in window slots
        j = torch.arange(n - lo)[None, :]
        rows = ((j >= total[:, None]) | (j < start[:, None])).nonzero(as_tuple=True)  # the unused slots
        if _hidden_rows_safe(kw[rows], vw[rows]):
            width = min(t - s for t, s in zip(totals, starts))  # keys of the narrowest row
            may_be_empty = width == 0 or (causal and Lq > width)
            return _kv_masked_sdpa(q, kw, vw, total, scale, causal, zero_unused=False, may_be_empty=may_be_empty,
                                   start=start if cache_leftpad is not None else None)
    o = q.new_empty(q.shape)                                                       # (B, Lq, H, D)
    for b, (n, s) in enumerate(zip(lens, starts)):  # one SDPA per row, each on exactly its keys
        if ok[b]:
            o[b:b + 1] = attention_torch(q[b:b + 1], k_cache[b:b + 1, s:n + n_new], v_cache[b:b + 1, s:n + n_new],
                                         None, scale, causal, 0.0, None)
        else:
            o[b] = float("nan")
    return o


def _kvcache_torch_device(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal, cache_leftpad=None):
    Lq, Lmax = q.shape[1], k_cache.shape[1]
    n_new = Lq if k_new is not None else 0
    ok = _kv_write_ok(cache_seqlens, n_new, Lmax, cache_leftpad)                   # (B,)
    if k_new is not None:
        _kv_write(k_cache, v_cache, cache_seqlens, k_new, v_new, ok)
    start = cache_leftpad.long() if cache_leftpad is not None else None
    o = _kv_masked_sdpa(q, k_cache, v_cache, cache_seqlens.long() + n_new, scale, causal, zero_unused=True,
                        start=start)
    return o.masked_fill(~ok.view(-1, 1, 1, 1), float("nan"))


def _kv_masked_sdpa(q, k, v, total, scale, causal, zero_unused, may_be_empty=True, start=None):
    """q (B, Lq, H, D) over k, v (B, Lk, H, D) where row b attends slots start[b] .. total[b]-1 (start
    None: from 0; bottom-right causal against total[b]): one SDPA with a bool mask; rows with no key
    give 0 (may_be_empty=False: the caller knows there is none). zero_unused: set the slots outside
    each row's window to 0 first (NaN-proof at the cost of a copy of k and v)."""
    Lq, Lk = q.shape[1], k.shape[1]
    j = torch.arange(Lk, device=q.device)
    valid = j[None, :] < total[:, None]                                            # (B, Lk)
    if start is not None:
        valid = valid & (j[None, :] >= start[:, None])
    if zero_unused:
        k, v = _zero_rows(k, valid), _zero_rows(v, valid)
    allowed = valid[:, None, None, :]                                              # (B, 1, 1, Lk)
    if causal and Lq > 1:
        i = torch.arange(Lq, device=q.device)
        allowed = allowed & (j.view(1, 1, 1, -1) <= i.view(1, 1, -1, 1) + (total - Lq).view(-1, 1, 1, 1))
    empty = ~allowed.any(-1, keepdim=True) if may_be_empty else None               # (B, 1, Lq, 1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed if empty is None else allowed | empty,
                                       scale=scale)                                 # (B, H, Lq, D)
    if empty is not None:
        o = o.masked_fill(empty, 0.0)
    o = o.transpose(1, 2)                                                          # (B, Lq, H, D)
    return o if o.is_contiguous() else o.contiguous()


class _TorchBackend:
    """The "torch" backend behind the launcher interface. The eager path and torch.compile call
    attention_torch itself (native autograd); these launchers serve the custom ops when they resolve
    to torch (the automatic fallback for CUDA tensors no kernel takes): the reference, whose
    backward replays the same rng_state."""
    attention_fwd = staticmethod(attention_ref)
    attention_bwd = staticmethod(attention_ref_bwd)
    attention_with_kvcache = staticmethod(attention_with_kvcache_torch)

    @staticmethod
    def unsupported_reason(q, k, v, causal, key_padding_mask, dropout_p):
        return None

    @staticmethod
    def kvcache_unsupported_reason(q, k_cache, v_cache=None, k_new=None, v_new=None, block_table=None):
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
        if name == "torch":
            return None
        # Asked about the tensors the launcher will get (a strided head dim is copied, never refused).
        return _kernel_dtype_reason(name, q) or mod.unsupported_reason(
            *(_last_dim_contig(t) for t in (q, k, v)), causal, _mask_arg(key_padding_mask), dropout_p)
    return BACKENDS.select(backend, q.device, case_reason)


def _select_kv(backend, q, k_cache, v_cache=None, k_new=None, v_new=None, block_table=None):
    def case_reason(name, mod):
        return _kernel_dtype_reason(name, q) or mod.kvcache_unsupported_reason(q, k_cache, v_cache, k_new, v_new,
                                                                               block_table=block_table)
    return BACKENDS_KV.select(backend, q.device, case_reason)


# ----------------------------------------------------------------------------- validation
def _shape_error(arg, expected, got):
    return ValueError(f"{arg}: expected {expected}, got {tuple(got)} ({_LAYOUT})")


def _check_scale(softmax_scale):
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")


def _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p):
    check_tensor(q, "q", dim=4)
    check_tensor(k, "k", dim=4)
    check_tensor(v, "v", dim=4)
    check_like(k, "k", q, "q")
    check_like(v, "v", q, "q")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise _shape_error("k", f"shape (B={B}, Lk, H={H}, D={D}) to match q {tuple(q.shape)}", k.shape)
    if tuple(v.shape) != tuple(k.shape):
        raise _shape_error("v", f"k's shape {tuple(k.shape)}", v.shape)
    if D < 1:
        raise ValueError(f"q: head dim must be >= 1, got shape {tuple(q.shape)} ({_LAYOUT})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask: expected a bool tensor, True = attend, got {got} (an additive "
                            f"float mask of 0 / -inf converts with `mask == 0`; nn.MultiheadAttention's bool "
                            f"key_padding_mask means the opposite, True = ignore: pass `~mask`)")
        Lk = k.shape[1]
        if tuple(key_padding_mask.shape) != (B, Lk):
            hint = ""
            if key_padding_mask.dim() == 2 and key_padding_mask.shape[1] == H and H != Lk:
                hint = f"; its length matches k.shape[2] = H = {H}: were q, k, v passed as (B, H, L, D)?"
            raise ValueError(f"key_padding_mask: expected shape (B, Lk) = {(B, Lk)} with Lk = k.shape[1], got "
                             f"{tuple(key_padding_mask.shape)}{hint} ({_LAYOUT})")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected a tensor on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    _check_scale(softmax_scale)


def _draw_rng_state(device) -> Tensor:
    """int64 [seed, offset = 0] on `device`, drawn by torch's generator of that device: torch.manual_seed
    fixes it, a CUDA graph replays the draw with a fresh value, and nothing reads it on the host."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return F.pad(seed, (0, 1))                                                     # (2,) [seed, 0]


# ----------------------------------------------------------------------------- eager path
class _AttentionFn(torch.autograd.Function):
    """A kernel backend's forward and backward; outputs are the launcher's own tensors (not views), so
    they may be edited in place as torch.nn outputs can."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, rng_state, scale, causal, dropout_p, deterministic, name):
        o, lse = BACKENDS.module(name).attention_fwd(q, k, v, key_padding_mask, scale, causal, dropout_p, rng_state)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, rng_state)
        ctx.meta = (scale, causal, dropout_p, deterministic, name)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask, rng_state = ctx.saved_tensors
        scale, causal, dropout_p, deterministic, name = ctx.meta
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = BACKENDS.module(name).attention_bwd(do, q, k, v, o, lse, mask, scale, causal, dropout_p,
                                                         rng_state, deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None


def _last_dim_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_arg(key_padding_mask):
    """The kernels index key_padding_mask (B, Lk) as contiguous: other layouts are copied (B*Lk bytes)."""
    return key_padding_mask.contiguous() if key_padding_mask is not None else None


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, softmax_scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0, deterministic: bool = False,
              backend: Optional[str] = None) -> Tensor:
    """Fused attention: softmax(q k^T * softmax_scale) v per batch and head.

    Layout (B, L, H, D), as flash-attn -- NOT F.scaled_dot_product_attention's (B, H, L, D): from
    SDPA's layout pass q.transpose(1, 2) (and transpose the result back).
      q: (B, Lq, H, D); k, v: (B, Lk, H, D); float16, bfloat16, float32 or float64, one dtype
      (float64 runs on the torch backend only). Returns (B, Lq, H, D) contiguous, in q's dtype.
      key_padding_mask: (B, Lk) bool, True = attend, False = padding. This is the OPPOSITE of
        nn.MultiheadAttention's key_padding_mask (True = ignore): pass `~mask` from there. A padded
        key never affects the output nor the gradients, even when its k / v rows hold NaN / inf, and
        gets dk = dv = 0. A query row with no key to attend returns zeros (SDPA would return NaN).
      causal: bottom-right aligned, query i attends key j iff j <= i + (Lk - Lq) (equal to SDPA's
        is_causal when Lq == Lk). Causally hidden keys are real tokens: a NaN there may propagate.
      softmax_scale: defaults to 1 / sqrt(D).
      dropout_p: dropout on the attention probabilities whenever > 0 (pass 0 in eval, as with SDPA).
        The mask is a counter-based Philox stream seeded by torch's generator on q's device
        (torch.manual_seed reproduces it; CUDA-graph replays draw fresh masks), identical in every
        backend.
      deterministic: True (or torch.use_deterministic_algorithms) makes the backward bitwise reproducible.
      backend: None (automatic: kernels for CUDA tensors, "torch" for CPU ones), "torch", "triton" or
        "cuda"; an explicit backend that cannot run the case raises BackendUnavailableError.
    Under torch.autocast (CPU or CUDA) q, k, v are cast to the autocast dtype, as SDPA's are.
    Raises TypeError / ValueError naming the argument for a wrong dtype, shape, device or value.
    """
    ad = autocast_dtype(q) if isinstance(q, Tensor) else None
    if ad is not None:
        q, k, v = (autocast_cast(t, ad) if isinstance(t, Tensor) else t for t in (q, k, v))
        with autocast_off(q):
            return _attention(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend)
    return _attention(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend)


def _attention(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend):
    if torch.compiler.is_compiling():
        return _compiled(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend)
    _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = _select(backend, q, k, v, causal, key_padding_mask, dropout_p)
    BACKENDS.record(name)
    key_padding_mask = _mask_arg(key_padding_mask)
    rng_state = _draw_rng_state(q.device) if dropout_p > 0 else None
    if name == "torch":
        return attention_torch(q, k, v, key_padding_mask, scale, causal, float(dropout_p), rng_state)
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    deterministic = bool(deterministic or torch.are_deterministic_algorithms_enabled())
    with device_guard(q):
        if needs_grad(q, k, v):
            return _AttentionFn.apply(q, k, v, key_padding_mask, rng_state, scale, causal, float(dropout_p),
                                      deterministic, name)
        o, _ = BACKENDS.module(name).attention_fwd(q, k, v, key_padding_mask, scale, causal, float(dropout_p),
                                                   rng_state)
    return o


def _check_row_vector(t, arg, B, q):
    """cache_seqlens / cache_leftpad: an int32 (B,) tensor on q's device (any stride)."""
    if not isinstance(t, Tensor) or t.dtype != torch.int32:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{arg}: expected an int32 tensor, got {got}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{arg}: expected shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{arg}: expected a tensor on q's device {q.device}, got {t.device}")


def _validate_kv(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, cache_leftpad=None,
                 block_table=None):
    check_tensor(q, "q", dim=4)
    check_tensor(k_cache, "k_cache", dim=4)
    check_tensor(v_cache, "v_cache", dim=4)
    check_like(k_cache, "k_cache", q, "q")
    check_like(v_cache, "v_cache", q, "q")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise _shape_error("v_cache", f"k_cache's shape {tuple(k_cache.shape)}", v_cache.shape)
    B, Lq, H, D = q.shape
    if block_table is not None:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            got = block_table.dtype if isinstance(block_table, Tensor) else type(block_table).__name__
            raise TypeError(f"block_table: expected an int32 tensor, got {got}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table: expected shape (B, max_num_blocks_per_seq) with B = {B}, got "
                             f"{tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table: expected a tensor on q's device {q.device}, got {block_table.device}")
        if k_cache.shape[1] < 1 or k_cache.shape[2] != H or k_cache.shape[3] != D:
            raise _shape_error("k_cache", f"paged shape (num_blocks, page_block_size >= 1, H={H}, D={D}) to match "
                               f"q {tuple(q.shape)}", k_cache.shape)
    elif k_cache.shape[0] != B or k_cache.shape[2] != H or k_cache.shape[3] != D:
        raise _shape_error("k_cache", f"shape (B={B}, Lmax, H={H}, D={D}) to match q {tuple(q.shape)}", k_cache.shape)
    _check_row_vector(cache_seqlens, "cache_seqlens", B, q)
    if cache_leftpad is not None:
        _check_row_vector(cache_leftpad, "cache_leftpad", B, q)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new, v_new: pass both or neither")
    if k_new is not None:
        check_like(k_new, "k_new", q, "q")
        check_like(v_new, "v_new", q, "q")
        if tuple(k_new.shape) != tuple(q.shape):
            raise _shape_error("k_new", f"q's shape {tuple(q.shape)}", k_new.shape)
        if tuple(v_new.shape) != tuple(q.shape):
            raise _shape_error("v_new", f"q's shape {tuple(q.shape)}", v_new.shape)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    _check_scale(softmax_scale)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: the last dimension must be contiguous (the caches are written "
                         "in place, so they cannot be copied)")


def _check_lengths(q, k_cache, cache_seqlens, n_new, cache_leftpad=None, block_table=None):
    """The host check of the lengths (a device read): run for CPU tensors, where it is free, and for
    CUDA tensors only when FASTLAYERS_CHECK_LENGTHS=1 (never while a CUDA graph is captured). Without
    it, a bad length (or left padding, or page entry) gives NaN output rows and no write (the kernels'
    contract)."""
    dev = q.device.type
    if dev != "cpu" and (dev != "cuda" or os.environ.get(CHECK_LENGTHS_ENV) != "1"
                         or torch.cuda.is_current_stream_capturing()):
        return
    if cache_seqlens.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0:
        raise ValueError(f"cache_seqlens: lengths must be >= 0, got min {lo}")
    if block_table is not None:
        Lmax = _paged_lmax(k_cache, block_table)
        if hi + n_new > Lmax:
            raise ValueError(f"block_table: too few pages: cache_seqlens.max() + Lq_new = {hi} + {n_new} > "
                             f"max_num_blocks_per_seq * page_block_size = {block_table.shape[1]} * "
                             f"{k_cache.shape[1]} = {Lmax}")
    elif hi + n_new > k_cache.shape[1]:
        raise ValueError(f"k_cache: too short: cache_seqlens.max() + Lq_new = {hi} + {n_new} > Lmax = "
                         f"{k_cache.shape[1]}")
    if cache_leftpad is not None:
        pad = cache_leftpad.long()
        lo = int(pad.min())
        if lo < 0:
            raise ValueError(f"cache_leftpad: left padding must be >= 0, got min {lo}")
        over = pad - (cache_seqlens.long() + n_new)                                # > 0: past the row's keys
        b = int(over.argmax())
        if int(over[b]) > 0:
            raise ValueError(f"cache_leftpad: expected cache_leftpad[b] <= cache_seqlens[b] + Lq_new, got "
                             f"{int(pad[b])} > {int(cache_seqlens[b])} + {n_new} at b = {b}")
    if block_table is not None:
        nb, P = k_cache.shape[:2]
        bad = _paged_bad_entries(block_table, nb, P, cache_seqlens, n_new, cache_leftpad)
        if bool(bad.any()):
            b, e = (int(i) for i in bad.nonzero()[0])  # the first bad entry
            row = block_table[b]
            raise ValueError(f"block_table: expected entries in [0, num_blocks = {nb}), got block_table[{b}, {e}] = "
                             f"{int(row[e])} (row {b} attends or writes slots on that page)")


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                           k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *,
                           cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                           causal: bool = True, softmax_scale: Optional[float] = None,
                           backend: Optional[str] = None) -> Tensor:
    """One decoding step over a KV cache (forward only; inputs must not require grad).

    Layout (B, L, H, D), as fl.attention (NOT SDPA's (B, H, L, D)).
      q: (B, Lq, H, D); k_cache, v_cache: (B, Lmax, H, D), q's dtype, last dim contiguous (written in
      place, never copied); cache_seqlens: (B,) int32 on q's device, each row's length BEFORE this
      step (any stride). k_new, v_new: (B, Lq, H, D) or None. Returns (B, Lq, H, D) in q's dtype.
      cache_leftpad: None or (B,) int32 on q's device (any stride), as flash-attn's: row b's first
      cache_leftpad[b] slots are left padding of a left-padded prompt batch, never attended.
    k_new / v_new, when given, are written into the caches at rows cache_seqlens[b] ..
    cache_seqlens[b] + Lq - 1 (absolute slots, left padding included), and q attends slots
    cache_leftpad[b] (0 without it) .. cache_seqlens[b] + Lq - 1; with causal=True query i attends
    slots up to cache_seqlens[b] + i (+ Lq - Lq_new: bottom-right on the absolute slots). Slots
    outside that window (the left padding, and slots at or past a row's length after the append)
    never affect the output, even when they hold NaN / inf (what torch.empty leaves). A query with
    no slot to attend (cache_leftpad[b] == cache_seqlens[b] + Lq_new) gets a zero output row.
    Bad lengths (cache_seqlens[b] < 0, cache_seqlens[b] + Lq > Lmax with k_new, cache_leftpad[b] < 0
    or cache_leftpad[b] > cache_seqlens[b] + Lq_new): for CPU tensors a ValueError; for CUDA tensors
    the check would cost a host sync per call, so it is skipped -- row b is not written and its
    output rows are NaN -- unless FASTLAYERS_CHECK_LENGTHS=1 asks for it.
    block_table: None, or a paged cache as flash-attn's `block_table`: (B, max_num_blocks_per_seq)
      int32 on q's device (any stride; copied when not contiguous, a small copy), and k_cache, v_cache
      of shape (num_blocks, page_block_size, H, D), any page size >= 1. Row b's slot j (the slots
      above, called logical) lives at k_cache[block_table[b, j // page_block_size], j %
      page_block_size]; Lmax = max_num_blocks_per_seq * page_block_size. Only the entries covering
      slots a row attends or writes are read; rows may share pages (beams sharing a prefix: beam
      search reorders its beams by reordering the table rows, page size 1, not the caches). A slot
      one row writes in a call that another row also writes or reads in that call: undefined. An
      entry a row reads or writes that is out of [0, num_blocks): ValueError for CPU tensors (and
      with FASTLAYERS_CHECK_LENGTHS=1);
      otherwise never dereferenced: a row attending such a slot gets NaN output rows, and a new row
      whose page entry is out of range is not written (its other new rows are).
    Eager decode on CUDA never synchronises (CUDA-graph capturable). Under torch.autocast q, k_new and
    v_new are cast to the autocast dtype as SDPA's inputs are; caches of another dtype keep it (the
    new rows are written in their dtype) and are read at the autocast dtype.
    """
    ad = autocast_dtype(q) if isinstance(q, Tensor) else None
    if ad is not None:
        with autocast_off(q):
            q = autocast_cast(q, ad)
            if isinstance(k_cache, Tensor) and autocast_cast(k_cache, ad) is not k_cache:
                return _kvcache_mixed(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale,
                                      backend, ad, cache_leftpad, block_table)
            k_new, v_new = (autocast_cast(t, ad) if isinstance(t, Tensor) else t for t in (k_new, v_new))
            return _attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal,
                                           softmax_scale, backend, cache_leftpad, block_table)
    return _attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale,
                                   backend, cache_leftpad, block_table)


def _kvcache_mixed(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, backend, dtype,
                   cache_leftpad=None, block_table=None):
    """Autocast with caches of another dtype (e.g. fp32 caches under bf16 autocast), as `k_cache[...] =
    k_new` then SDPA would run: k_new / v_new are written into the caches in the caches' dtype, and the
    attention reads the caches cast to `dtype` (a copy per call: allocate the caches in the autocast
    dtype to avoid it)."""
    check_tensor(k_cache, "k_cache", dim=4)
    check_tensor(v_cache, "v_cache", dim=4)
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: expected k_cache's dtype {dtype_name(k_cache.dtype)}, "
                        f"got {dtype_name(v_cache.dtype)}")
    kc, vc = k_cache.to(dtype), v_cache.to(dtype)                                  # (B, Lmax, H, D) copies
    _validate_kv(q, kc, vc, cache_seqlens, *(None if t is None else autocast_cast(t, dtype) for t in (k_new, v_new)),
                 causal, softmax_scale, cache_leftpad, block_table)
    if k_new is not None:
        if needs_grad(q, k_cache, v_cache, k_new, v_new):
            raise RuntimeError(_FORWARD_ONLY)
        cache_seqlens, cache_leftpad = vector_arg(cache_seqlens), vector_arg(cache_leftpad)
        Lq = q.shape[1]
        if not torch.compiler.is_compiling():
            _check_lengths(q, k_cache, cache_seqlens, Lq, cache_leftpad, block_table)
        if block_table is not None:
            # rows of good lengths write (each new row where its page entry is in range); the step below
            # turns a row attending a bad entry NaN
            ok = _kv_write_ok(cache_seqlens, Lq, _paged_lmax(k_cache, block_table), cache_leftpad)
            for kk, vv in ((k_cache, v_cache), (kc, vc)):
                _paged_write(kk, vv, block_table, cache_seqlens, k_new, v_new, ok)
        else:
            ok = _kv_write_ok(cache_seqlens, Lq, k_cache.shape[1], cache_leftpad)
            _kv_write(k_cache, v_cache, cache_seqlens, k_new, v_new, ok)
            _kv_write(kc, vc, cache_seqlens, k_new.to(k_cache.dtype), v_new.to(k_cache.dtype), ok)
        # the new rows are in the caches now: attend len + Lq keys; a bad row keeps NaN rows (length -1)
        cache_seqlens = torch.where(ok, cache_seqlens + Lq, -1).to(torch.int32)
    return _attention_with_kvcache(q, kc, vc, cache_seqlens, None, None, causal, softmax_scale, backend,
                                   cache_leftpad, block_table)


_FORWARD_ONLY = ("attention_with_kvcache is forward-only (decoding): its inputs require grad; call it under "
                 "torch.no_grad() / torch.inference_mode(), or use fl.attention to train")


def _attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, backend,
                            cache_leftpad=None, block_table=None):
    _validate_kv(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, softmax_scale, cache_leftpad,
                 block_table)
    if needs_grad(q, k_cache, v_cache, k_new, v_new):
        raise RuntimeError(_FORWARD_ONLY)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cache_seqlens, cache_leftpad = vector_arg(cache_seqlens), vector_arg(cache_leftpad)
    block_table = block_table.contiguous() if block_table is not None else None  # (B, max_blocks): small
    q = _last_dim_contig(q)
    k_new = _last_dim_contig(k_new) if k_new is not None else None
    v_new = _last_dim_contig(v_new) if v_new is not None else None
    if torch.compiler.is_compiling():
        # The custom op even for the torch backend: on CPU tensors its SDPA composition slices the keys
        # to the lengths it reads on the host, which no traced graph can do; the traceable form (masks
        # over Lmax, a copy of both caches per step) measured 10x slower at B=8, Lmax=2048, len~1000.
        name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
        return torch.ops.fastlayers.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                           scale, causal, name, cache_leftpad, block_table)
    _check_lengths(q, k_cache, cache_seqlens, q.shape[1] if k_new is not None else 0, cache_leftpad, block_table)
    name = _select_kv(backend, q, k_cache, v_cache, k_new, v_new, block_table)
    BACKENDS_KV.record(name)
    with device_guard(q):
        return BACKENDS_KV.module(name).attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                               scale, causal, cache_leftpad=cache_leftpad,
                                                               block_table=block_table)


# ----------------------------------------------------------------------------- torch.compile path
def _compiled(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p, deterministic, backend):
    _validate(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = request_for_trace(backend)  # "" = automatic; resolved in the op on its real inputs
    key_padding_mask = _mask_arg(key_padding_mask)
    # Drawn in the graph (a random op of the compiled program), so every call draws a fresh state.
    rng_state = _draw_rng_state(q.device) if dropout_p > 0 else None
    if torch_at_trace(name, q.device):
        return attention_torch(q, k, v, key_padding_mask, scale, causal, float(dropout_p), rng_state)
    o, _ = torch.ops.fastlayers.attention_fwd(q, k, v, key_padding_mask, rng_state, scale, causal, float(dropout_p),
                                              bool(deterministic), name)
    return o


@torch.library.custom_op("fastlayers::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                      rng_state: Optional[Tensor], softmax_scale: float, causal: bool, dropout_p: float,
                      deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (o, lse). rng_state: int64 [seed, offset] on q's device (None when dropout_p == 0),
    an input drawn by the caller's graph, so the op is a pure function of its inputs."""
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    key_padding_mask = _mask_arg(key_padding_mask)
    backend = resolve_in_op(backend, lambda b: _select(b, q, k, v, causal, key_padding_mask, dropout_p))
    with device_guard(q):
        return BACKENDS.module(backend).attention_fwd(q, k, v, key_padding_mask, softmax_scale, causal,
                                                      dropout_p, rng_state)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, rng_state, softmax_scale, causal, dropout_p, deterministic, backend):
    B, Lq, H, D = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=lse_dtype)


@torch.library.custom_op("fastlayers::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      key_padding_mask: Optional[Tensor], rng_state: Optional[Tensor], softmax_scale: float,
                      causal: bool, dropout_p: float, deterministic: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    do, q, k, v = (_last_dim_contig(t) for t in (do, q, k, v))
    key_padding_mask = _mask_arg(key_padding_mask)
    backend = resolve_in_op(backend, lambda b: _select(b, q, k, v, causal, key_padding_mask, dropout_p))
    with device_guard(q):
        return BACKENDS.module(backend).attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale,
                                                      causal, dropout_p, rng_state, deterministic)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, rng_state, softmax_scale, causal, dropout_p, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, mask, rng_state, scale, causal, dropout_p, deterministic, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, mask, rng_state)
    ctx.meta = (scale, causal, dropout_p, deterministic, backend)


def _attn_backward(ctx, do, dlse):
    q, k, v, o, lse, mask, rng_state = ctx.saved_tensors
    scale, causal, dropout_p, deterministic, backend = ctx.meta
    dq, dk, dv = torch.ops.fastlayers.attention_bwd(do, q, k, v, o, lse, mask, rng_state, scale, causal, dropout_p,
                                                    deterministic, backend)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("fastlayers::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kv_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Optional[Tensor],
                     v_new: Optional[Tensor], softmax_scale: float, causal: bool, backend: str,
                     cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None) -> Tensor:
    backend = resolve_in_op(backend, lambda b: _select_kv(b, q, k_cache, v_cache, k_new, v_new, block_table))
    cache_seqlens, cache_leftpad = vector_arg(cache_seqlens), vector_arg(cache_leftpad)
    block_table = block_table.contiguous() if block_table is not None else None
    _check_lengths(q, k_cache, cache_seqlens, q.shape[1] if k_new is not None else 0,
                   cache_leftpad, block_table)  # real tensors here
    with device_guard(q):
        return BACKENDS_KV.module(backend).attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new,
                                                                  v_new, softmax_scale, causal,
                                                                  cache_leftpad=cache_leftpad,
                                                                  block_table=block_table)


@_attention_kv_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal, backend, cache_leftpad=None,
      block_table=None):
    return q.new_empty(q.shape)
