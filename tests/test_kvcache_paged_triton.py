"""Paged KV cache (block_table) in the Triton decode kernels (kernels/attention.py), kernel level.

Calls kernels.attention.attention_with_kvcache directly (CPU tensors, Triton interpreter; the GPU
runs the same tests compiled, on CUDA tensors). Contract (flash-attn's convention): k_cache, v_cache
are (num_blocks, P, H, D) pages; logical slot j of batch row b is k_cache[block_table[b, j // P],
j % P]; cache_seqlens, cache_leftpad, the k_new append and the bad-length rules are in logical slots
with Lmax = block_table.shape[1] * P. An entry out of [0, num_blocks) inside a row's window is never
dereferenced: that slot is not written and the row's output rows are NaN.
Expected values: the gather reference -- kl = k_cache[block_table].reshape(B, nblk * P, H, D), the
existing attention_with_kvcache_ref (no block_table) on kl / vl in float64, then the written logical
slots scattered back to their pages. Physical slots outside every row's window hold NaN / inf
(unused pages, padding, tails, the slots the step writes), so a read of one shows.
Tiny shapes: the interpreter is slow (BLOCK_N = 16 there, BLOCK_M = 16 up to Lq = 16).
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from fastlayers.kernels import attention as TA  # noqa: E402
from fastlayers.ops import attention as OPS  # noqa: E402
from helpers import assert_close_rule  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPE = torch.float32 if INTERPRET else torch.float16
POISON = (float("nan"), float("inf"), float("-inf"))
FLOOR = None if DTYPE == torch.float32 else 4e-3  # fp16 on the GPU: P is rounded to fp16 for P @ V


# ---------------------------------------------------------------------------------------- helpers
def _table(B, nblk, num_blocks, shared=0, share_rows=()):
    """(B, nblk) int32 of distinct random page ids; the first `shared` entries of the rows in
    share_rows equal row 0's (beams sharing a prefix)."""
    ids = torch.randperm(num_blocks)[:B * nblk].reshape(B, nblk)
    for b in share_rows:
        ids[b, :shared] = ids[0, :shared]
    return ids.to(torch.int32)


def _phys(bt, b, j, P):
    """(page, row in page) of logical slot j of batch row b; page may be out of range."""
    return int(bt[b, j // P]), j % P


def _live(bt, lens, pads, num_blocks, P):
    """(num_blocks, P) bool: the physical slots some row attends before the step (its [pad, len))."""
    live = torch.zeros(num_blocks, P, dtype=torch.bool)
    for b, (n, p) in enumerate(zip(lens, pads)):
        for j in range(max(p, 0), max(n, 0)):
            page, r = _phys(bt, b, j, P)
            if 0 <= page < num_blocks:
                live[page, r] = True
    return live


def _poisoned_pages(num_blocks, P, H, D, live, page_stride=1):
    """(num_blocks, P, H, D) fresh random pages, NaN / inf on every slot outside `live`; with
    page_stride > 1 a view of every page_stride-th page of a bigger tensor (page stride != P*H*D)."""
    big = torch.randn(num_blocks * page_stride, P, H, D, dtype=DTYPE)
    t = big[::page_stride]
    dead = (~live).nonzero()
    vals = torch.tensor(POISON, dtype=DTYPE)[torch.arange(dead.shape[0]) % len(POISON)]
    t[dead[:, 0], dead[:, 1]] = vals[:, None, None].expand(-1, H, D)
    return t


def _row_ok(lens, pads, n_new, Lmax):
    return [n >= 0 and n + n_new <= Lmax and (p is None or 0 <= p <= n + n_new) for n, p in zip(lens, pads)]


def _expected(q, kc, vc, bt, lens, pads, kn, vn, scale, causal):
    """(o (B, Lq, H, D) float64 with NaN rows, kc, vc after the step): the gather reference."""
    B, Lq = q.shape[:2]
    num_blocks, P, H, D = kc.shape
    nblk = bt.shape[1]
    Lmax = nblk * P
    n_new = Lq if kn is not None else 0
    btc = bt.long().clamp(0, max(num_blocks - 1, 0))  # the gather itself must not fail on bad entries
    kl = kc.double()[btc].reshape(B, Lmax, H, D)
    vl = vc.double()[btc].reshape(B, Lmax, H, D)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    pads_t = None if pads is None else torch.tensor(pads, dtype=torch.int32)
    o = OPS.attention_with_kvcache_ref(q.double(), kl, vl, lens_t, None if kn is None else kn.double(),
                                       None if vn is None else vn.double(), scale, causal, pads_t)
    kc_exp, vc_exp = kc.clone(), vc.clone()
    ok = _row_ok(lens, [None] * B if pads is None else pads, n_new, Lmax)
    for b in range(B):
        if not ok[b]:
            continue
        first = 0 if pads is None else pads[b]
        entries = {int(bt[b, j // P]) for j in range(first, lens[b] + n_new)}
        if any(not 0 <= e < num_blocks for e in entries):
            o[b] = float("nan")  # an out-of-range entry inside the window
        for i in range(n_new):
            page, r = _phys(bt, b, lens[b] + i, P)
            if 0 <= page < num_blocks:  # an out-of-range page: that slot is skipped
                kc_exp[page, r] = kn[b, i]
                vc_exp[page, r] = vn[b, i]
    return o, kc_exp, vc_exp


def _run_and_check(q, kc, vc, bt, lens, pads, kn, vn, causal, num_splits=None, expect_nan=None):
    scale = q.shape[-1] ** -0.5
    o_ref, kc_exp, vc_exp = _expected(q, kc, vc, bt, lens, pads, kn, vn, scale, causal)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    pads_t = None if pads is None else torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    dev = [t if t is None else t.to(DEVICE) for t in (q, kc, vc, kn, vn)]
    qd, kcd, vcd, knd, vnd = dev
    if DEVICE != "cpu":  # keep the caches' strides (views) on the GPU too
        kcd = torch.empty_strided(kc.shape, kc.stride(), dtype=kc.dtype, device=DEVICE).copy_(kc)
        vcd = torch.empty_strided(vc.shape, vc.stride(), dtype=vc.dtype, device=DEVICE).copy_(vc)
    o = TA.attention_with_kvcache(qd, kcd, vcd, lens_t, knd, vnd, scale, causal, cache_leftpad=pads_t,
                                  block_table=bt.to(DEVICE), num_splits=num_splits)
    o, kcd, vcd = o.cpu(), kcd.cpu(), vcd.cpu()
    nan_rows = torch.isnan(o_ref).flatten(1).all(1)  # (B,) the rows the reference makes NaN
    if expect_nan is not None:  # the case means what it says: the test cannot pass vacuously
        assert nan_rows.tolist() == expect_nan
    assert torch.isnan(o[nan_rows]).all(), "a bad row (lengths or page entry) must be NaN, all of it"
    good = ~nan_rows
    assert_close_rule(o[good], o_ref[good], floor=FLOOR, what="paged decode output")
    # the caches: written where the contract says, bit for bit; untouched (poison included) elsewhere
    torch.testing.assert_close(kcd, kc_exp, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vcd, vc_exp, rtol=0, atol=0, equal_nan=True)
    return o


def _case(B, H, D, Lq, P, nblk, num_blocks, lens, pads, with_new, shared=0, share_rows=(), bt=None,
          page_stride=1):
    if bt is None:
        bt = _table(B, nblk, num_blocks, shared, share_rows)
    live = _live(bt, lens, [0] * B if pads is None else pads, num_blocks, P)
    kc = _poisoned_pages(num_blocks, P, H, D, live, page_stride)
    vc = _poisoned_pages(num_blocks, P, H, D, live, page_stride)
    q = torch.randn(B, Lq, H, D, dtype=DTYPE)
    kn = torch.randn(B, Lq, H, D, dtype=DTYPE) if with_new else None
    vn = torch.randn(B, Lq, H, D, dtype=DTYPE) if with_new else None
    return q, kc, vc, bt, kn, vn


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("P", [1, 3, 16])
def test_paged_causal_append_leftpad_shared(P, num_splits):
    """Causal Lq = 3 with k_new, left padding, rows sharing their first pages, page stride != P*H*D,
    a strided q; rows: a long one crossing key tiles, one ending exactly at the logical Lmax, a
    left-padded one, an empty window, and a bad length (len + Lq > logical Lmax: NaN, no write)."""
    H, D, Lq = 2, 16, 3
    nblk = -(-40 // P)  # logical Lmax >= 40: more than two key tiles of 16
    Lmax = nblk * P
    lens = [Lmax - Lq - 5, Lmax - Lq, 7, 4, Lmax - Lq + 1]
    pads = [0, 2, 5, 4 + Lq, 1]
    B = len(lens)
    # the first pages are shared by the rows that attend them and write none of their slots (a row
    # reading a slot another row writes in the same step is a race, as in flash-attn)
    shared = 1 if P > 1 else 2
    share_rows = [b for b in range(1, B) if lens[b] >= shared * P]
    q, kc, vc, bt, kn, vn = _case(B, H, D, Lq, P, nblk, 3 * B * nblk, lens, pads, True, shared=shared,
                                  share_rows=share_rows, page_stride=2)
    assert share_rows
    qv = torch.randn(B, Lq, 2 * H, D, dtype=DTYPE)[:, :, ::2]  # (B, Lq, H, D) with head stride 2*D
    qv.copy_(q)
    _run_and_check(qv, kc, vc, bt, lens, pads, kn, vn, True, num_splits,
                   expect_nan=[False, False, False, False, True])


def test_paged_decode_without_new_keys():
    """Lq = 1 without k_new (nothing written), non-causal, split count picked by the launcher from
    the LOGICAL Lmax (the physical k_cache.shape[1] = P would give one split)."""
    H, D, P, nblk = 1, 8, 3, 16  # logical Lmax 48: three key tiles of 16 in the interpreter
    lens, pads = [48, 20, 0], None
    q, kc, vc, bt, _, _ = _case(3, H, D, 1, P, nblk, 64, lens, pads, False)
    seen = []
    real = TA._num_splits

    def spy(device, programs, Lmax, block_n):
        seen.append(Lmax)
        return real(device, programs, Lmax, block_n)

    TA._num_splits = spy
    try:
        _run_and_check(q, kc, vc, bt, lens, pads, None, None, False, None, expect_nan=[False] * 3)
    finally:
        TA._num_splits = real
    assert seen == [nblk * P]


@pytest.mark.parametrize("num_splits", [1, 2])
def test_out_of_range_entries(num_splits):
    """Entries out of [0, num_blocks) (-1, num_blocks, 2^31 - 1): inside a row's old slots -> that
    row NaN; on an appended slot -> NaN and that slot skipped (the row's other new slots written);
    only outside the window (before the left pad, past len + Lq) -> never read, the row is fine."""
    H, D, P, nblk, Lq = 1, 8, 2, 12, 2  # logical Lmax 24
    num_blocks = 60
    lens = [9, 10, 10, 7]
    pads = [0, 0, 4, 0]
    bt = _table(len(lens), nblk, num_blocks)
    bt[0, 2] = -1                 # slots 4, 5 of row 0: attended
    bt[1, 5] = num_blocks         # slots 10, 11 of row 1: appended -> no write there, NaN row
    bt[2, 0] = 2**31 - 1          # slots 0, 1 of row 2: left padding only
    bt[2, 6:] = -7                # slots 12.. of row 2: past len + Lq = 12
    bt[3, 3] = num_blocks         # slots 6, 7 of row 3: 6 attended, 7 appended (skipped; 8 written)
    q, kc, vc, bt, kn, vn = _case(len(lens), H, D, Lq, P, nblk, num_blocks, lens, pads, True, bt=bt)
    _run_and_check(q, kc, vc, bt, lens, pads, kn, vn, True, num_splits,
                   expect_nan=[True, True, False, True])


def test_out_of_range_entry_past_the_first_query_block():
    """Lq = 65 > BLOCK_M (64): the first query block's causal range stops one slot short of the last
    appended slot, whose page entry is bad; that block's rows must be NaN too."""
    H, D, P, nblk, Lq = 1, 8, 1, 72, 65
    lens, pads = [5], None
    bt = _table(1, nblk, 80)
    bt[0, lens[0] + Lq - 1] = -1
    q, kc, vc, bt, kn, vn = _case(1, H, D, Lq, P, nblk, 80, lens, pads, True, bt=bt)
    _run_and_check(q, kc, vc, bt, lens, pads, kn, vn, True, 1, expect_nan=[True])


def test_launcher_checks_block_table():
    q = torch.randn(2, 1, 1, 8, dtype=DTYPE, device=DEVICE)
    kc = torch.randn(4, 2, 1, 8, dtype=DTYPE, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    bt = torch.zeros(2, 6, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table"):
        TA.attention_with_kvcache(q, kc, kc, lens, None, None, 1.0, True, block_table=bt[:, ::2])
    with pytest.raises(ValueError, match="block_table"):
        TA.attention_with_kvcache(q, kc, kc, lens, None, None, 1.0, True, block_table=bt.long())
    assert TA.kvcache_unsupported_reason(q, kc, kc, None, None, block_table=None) is None
    assert TA.kvcache_unsupported_reason(q, kc, kc, None, None, block_table=bt) is None
    assert "block_table" in TA.kvcache_unsupported_reason(q, kc, kc, block_table=bt.long())
    assert "block_table" in TA.kvcache_unsupported_reason(q, kc, kc, block_table=bt[0])
    big = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE).expand(2, 2**30)  # 2^30 * P=2 slots
    assert "2^31" in TA.kvcache_unsupported_reason(q, kc, kc, block_table=big)
