"""Paged KV cache (block_table) on the CUDA backend, tested at the launcher
(pytorch_ext/cuda_ops/attention.py -> fl_attention_kvcache_fwd, csrc/attention/attention_fwd.cu).

Contract (issue 11, flash-attn's convention): k_cache, v_cache (num_blocks, P, H, D) pages, row b's
logical slot j at page block_table[b, j // P], row j % P, any P >= 1; Lmax = max_num_blocks * P;
lengths, cache_leftpad, causal and the append are in logical slots. Only the entries covering the
slots a row attends or writes are read; a row with one of them out of [0, num_blocks) gets NaN rows,
a new row whose own page id is out of range is not written, and no page is dereferenced through
such an id.
Expected values: pytorch_ext.ops.attention.attention_with_kvcache_ref(..., block_table=) on float64
CPU copies of the CLEAN caches (the gather of the brief); the kernel's own caches hold NaN at every
physical slot no row attends (unused pages, slots past a row's length, its left padding, the slots the
step writes), and the table entries no row uses hold garbage (negative, past num_blocks, or ids of
poisoned pages) -- so a read outside the contract shows up as NaN. Expected caches: the poisoned
caches with each valid new row written at its page by hand (exact comparison, NaN == NaN).
CPU tests: the ABI as the header declares it against _cuda.SIGNATURES, the stale-library refusal and
the host-side geometry of the bridge.
"""
import random
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastlayers import _cuda
from fastlayers.ops import attention as A
from helpers import assert_close_rule
from test_attention_cuda import _ops as _attention_cuda_ops

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastlayers.h"
FLOOR = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float16, torch.bfloat16)


# ================================================================================================ CPU
def _header_params(name):
    m = re.search(r"\b" + name + r"\s*\(([^;]*)\)\s*;", HEADER.read_text())
    assert m, f"{name} is not declared in {HEADER}"
    text = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return [a.strip() for a in text.split(",") if a.strip()]


def test_kvcache_abi_takes_the_block_table_after_cache_leftpad():
    """fl_attention_kvcache_fwd(..., cache_seqlens, cache_leftpad, block_table, max_num_blocks,
    num_blocks, page_block_size, k_new, ...): the header's order, and the ctypes table agreeing with it
    argument by argument (a shifted argument would pass a stride as a pointer without any error)."""
    params = _header_params("fl_attention_kvcache_fwd")
    names = [re.split(r"[\s*]+", p)[-1] for p in params]
    i = names.index("cache_leftpad")
    assert names[i + 1:i + 6] == ["block_table", "max_num_blocks", "num_blocks", "page_block_size", "k_new"]
    assert params[i + 1].startswith("const int32_t*") and all(p.startswith("int64_t") for p in params[i + 2:i + 5])
    sig = _cuda.SIGNATURES["fl_attention_kvcache_fwd"][1]
    assert len(sig) == len(params), (f"SIGNATURES has {len(sig)} arguments for fl_attention_kvcache_fwd, the "
                                     f"header {len(params)}")
    assert sig[i + 1:i + 5] == [_cuda.c_ptr, _cuda.c_i64, _cuda.c_i64, _cuda.c_i64]


def test_grid_kernel_codes_match_the_header():
    from fastlayers.cuda_ops import attention as CA
    codes = dict(re.findall(r"FL_ATTENTION_KERNEL_(\w+)\s*=\s*(\d+)", HEADER.read_text()))
    assert {k.lower(): int(v) for k, v in codes.items()} == CA.GRID_KERNELS


def test_bridge_refuses_a_library_without_block_table():
    """A library built before block_table (no attention_kvcache_paged in its build info) would read
    every argument after cache_leftpad shifted by four: the bridge never calls it, paged or not."""
    from fastlayers.cuda_ops import attention as CA
    with mock.patch.object(_cuda, "build_info", return_value={"attention_kvcache_leftpad": True}):
        assert "block_table" in CA._kvcache_abi_reason()
        with pytest.raises(RuntimeError, match="stale build"):
            CA.attention_with_kvcache(*([None] * 6), 0.1, True)
    with mock.patch.object(_cuda, "build_info",
                           return_value={"attention_kvcache_leftpad": True, "attention_kvcache_paged": True}):
        assert CA._kvcache_abi_reason() is None


def test_paged_geometry():
    """The sizes the bridge passes with a block_table: the logical Lmax = max_num_blocks * P (what the
    split count and the workspace use), and errors naming the argument for a table the kernels
    cannot index as it is."""
    from fastlayers.cuda_ops import attention as CA
    q = torch.randn(3, 1, 2, 8)
    kc = torch.randn(11, 5, 2, 8)                                   # 11 pages of 5 rows
    table = torch.randint(0, 11, (3, 7), dtype=torch.int32)
    assert CA.paged_geometry(q, kc, table) == (7, 11, 5, 35)
    with pytest.raises(TypeError, match="block_table"):
        CA.paged_geometry(q, kc, table.long())
    with pytest.raises(ValueError, match="block_table.*contiguous"):
        CA.paged_geometry(q, kc, torch.randint(0, 11, (7, 3), dtype=torch.int32).t())
    with pytest.raises(ValueError, match=r"block_table.*B = 3"):
        CA.paged_geometry(q, kc, table[:2])
    with pytest.raises(ValueError, match="page_block_size"):
        CA.paged_geometry(q, kc[:, :0], table)
    huge = torch.zeros(1, 1, 1, 8).expand(1, 2**21, 1, 8)           # P = 2^21 (a stride-0 view: no memory)
    with pytest.raises(ValueError, match="2\\^31"):
        CA.paged_geometry(q[:1], huge, torch.zeros(1, 1024, dtype=torch.int32))
    assert CA.paged_geometry(q[:1], huge, torch.zeros(1, 1023, dtype=torch.int32))[3] == 1023 * 2**21


# ================================================================================================ GPU
def _ops():
    CA = _attention_cuda_ops()
    if CA._kvcache_abi_reason() is not None:
        pytest.skip(CA._kvcache_abi_reason())
    return CA


def _garbage(rnd, num_blocks, poisoned_pages):
    """A table entry no row may read: out of range either way, or the id of a poisoned page."""
    choices = [-1, -2**31, num_blocks, num_blocks + 7, 2**31 - 1]
    if poisoned_pages:
        choices.append(rnd.choice(poisoned_pages))
    return rnd.choice(choices)


def _case(B, P, nblk, H, D, Lq, with_new, dtype, lens, pads=None, share=0, spare=3, bad=(), dev="cuda"):
    """A paged step on CUDA tensors.

    lens / pads: per row (pads None: no cache_leftpad). share: rows 1.. take row 0's first `share`
    pages (a common prefix below every row's length and pad-free). spare: extra pages no row uses.
    bad: (row, logical page index) entries set out of range after the fact (a row attending such an
    entry: NaN; a new row on one: not written, the others are).
    Returns a dict with the kernel's inputs (poisoned caches), the clean float64 CPU caches of the
    reference, and the expected caches after the step."""
    rnd = random.Random(torch.randint(0, 2**31, ()).item())
    n_new = Lq if with_new else 0
    lo = [min(p, n) if n_new else p for p, n in zip(pads or [0] * B, lens)]  # first used slot per row
    hi = [n + n_new for n in lens]
    used = [[e for e in range(nblk) if e * P < hi[b] and (e + 1) * P > lo[b]] for b in range(B)]
    # physical ids: a random permutation; shared prefix pages are row 0's
    need = sum(len(u) for u in used) + spare
    perm = torch.randperm(need).tolist()
    table = [[None] * nblk for _ in range(B)]
    nxt = 0
    for b in range(B):
        for e in used[b]:
            if b > 0 and e < share:
                assert (e + 1) * P <= min(lens[0], lens[b]) and lo[b] == 0 and lo[0] == 0, "bad share"
                table[b][e] = table[0][e]
            else:
                table[b][e] = perm[nxt]
                nxt += 1
    num_blocks = need
    owned = {pg for row in table for pg in row if pg is not None}
    poisoned_pages = [pg for pg in range(num_blocks) if pg not in owned]
    for b in range(B):
        for e in range(nblk):
            if table[b][e] is None:
                table[b][e] = _garbage(rnd, num_blocks, poisoned_pages)
    for b, e in bad:
        table[b][e] = rnd.choice([-1, num_blocks, num_blocks + 100, -2**31])
    table = torch.tensor(table, dtype=torch.int32, device=dev)                        # (B, nblk)

    kc = torch.randn(num_blocks, P, H, D, dtype=dtype, device=dev)                     # (num_blocks, P, H, D)
    vc = torch.randn(num_blocks, P, H, D, dtype=dtype, device=dev)
    q = torch.randn(B, Lq, H, D, dtype=dtype, device=dev)                              # (B, Lq, H, D)
    kn = torch.randn(B, Lq, H, D, dtype=dtype, device=dev) if with_new else None
    vn = torch.randn(B, Lq, H, D, dtype=dtype, device=dev) if with_new else None
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    pads_t = torch.tensor(pads, dtype=torch.int32, device=dev) if pads is not None else None

    # keep: physical slots holding data some row attends before the step (old slots [pad, len))
    keep = torch.zeros(num_blocks, P, dtype=torch.bool)
    tcpu = table.cpu()
    # a row is NaN when a bad entry covers a slot it attends ([pad, len + new)); one covering only a
    # new row in its left padding just skips that write
    pad_of = pads or [0] * B
    row_ok = [not any(r == b and max(e * P, pad_of[b]) < min((e + 1) * P, hi[b]) for r, e in bad)
              for b in range(B)]
    for b in range(B):
        if not row_ok[b]:
            continue  # (reads nothing)
        for j in range((pads or [0] * B)[b], lens[b]):
            keep[tcpu[b, j // P], j % P] = True
    ref = {"kc": kc.double().cpu(), "vc": vc.double().cpu()}                             # clean, float64
    poison = ~keep.to(dev)[:, :, None, None]
    kc_p = kc.masked_fill(poison, float("nan"))
    vc_p = vc.masked_fill(poison, float("nan"))

    # expected caches: the poisoned ones with each new row at its page when that id is in range
    kc_e, vc_e = kc_p.clone(), vc_p.clone()
    if with_new:
        for b in range(B):
            for i in range(Lq):
                j = lens[b] + i
                pg = int(tcpu[b, j // P])
                if 0 <= pg < num_blocks:
                    kc_e[pg, j % P], vc_e[pg, j % P] = kn[b, i], vn[b, i]
    return dict(q=q, kc=kc_p, vc=vc_p, kn=kn, vn=vn, lens=lens_t, pads=pads_t, table=table, ref=ref,
                kc_e=kc_e, vc_e=vc_e, row_ok=row_ok, Lmax=nblk * P)


def _expected(c, causal, scale):
    """attention_with_kvcache_ref with block_table on float64 CPU copies of the clean caches."""
    cpu = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    kc, vc = c["ref"]["kc"].clone(), c["ref"]["vc"].clone()
    o = A.attention_with_kvcache_ref(cpu(c["q"]), kc, vc, c["lens"].cpu(), cpu(c["kn"]), cpu(c["vn"]), scale,
                                     causal, cache_leftpad=None if c["pads"] is None else c["pads"].cpu(),
                                     block_table=c["table"].cpu())
    return o


def _run_and_check(CA, c, causal, dtype, expect_splits=None):
    B, Lq, H, D = c["q"].shape
    scale = D ** -0.5
    if expect_splits is not None and c["q"].is_cuda:
        # the split count follows host sizes only (0 workspace bytes <=> one split); a split needs
        # fewer CTAs than SMs, one split at least as many
        sms = torch.cuda.get_device_properties(c["q"].device).multi_processor_count
        if expect_splits != (B * H * -(-Lq // 64) < sms):
            expect_splits = None
    if expect_splits is not None:
        with torch.cuda.device(c["q"].device):
            nbytes = _cuda.workspace_size("fl_attention_kvcache_workspace_size", B, Lq, H, D, c["Lmax"])
        assert (nbytes > 0) == expect_splits, f"workspace {nbytes} bytes: the case does not test what it says"
    expect = _expected(c, causal, scale)
    o = CA.attention_with_kvcache(c["q"], c["kc"], c["vc"], c["lens"], c["kn"], c["vn"], scale, causal,
                                  cache_leftpad=c["pads"], block_table=c["table"])
    if o.is_cuda:
        torch.cuda.synchronize()
    good = [b for b in range(B) if c["row_ok"][b]]
    for b in range(B):
        assert torch.isnan(expect[b]).all() == (not c["row_ok"][b]), f"row {b}: the case and the reference disagree"
        if not c["row_ok"][b]:
            assert torch.isnan(o[b]).all(), f"row {b} reads an out-of-range page id: its rows must be NaN"
    if good:
        assert_close_rule(o[good], expect[good].to(o.device), None, factor=0, floor=FLOOR[dtype])
    torch.testing.assert_close(c["kc"], c["kc_e"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(c["vc"], c["vc_e"], rtol=0, atol=0, equal_nan=True)
    return o


# (P, max_num_blocks): page sizes 1 (beam search), 3 (pages straddle every tile edge), 16, 256 (a tile
# spans several pages / a page several tiles)
PAGES = [(1, 300), (3, 100), (16, 20), (256, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_new", [True, False], ids=["append", "read"])
@pytest.mark.parametrize("P,nblk", PAGES, ids=[f"P{p}" for p, _ in PAGES])
def test_paged_decode_matches_gather_reference(P, nblk, with_new, causal, dtype):
    """One query per row, B*H small: split-KV over the logical length (asserted), rows of very
    different lengths (one at the end of its logical cache, one empty before the step)."""
    CA = _ops()
    Lmax, Lq = P * nblk, 1
    n_new = Lq if with_new else 0
    lens = [Lmax - n_new, 0 if with_new else 1, int(torch.randint(1, Lmax - n_new + 1, ())), 37 % (Lmax - n_new) + 1]
    c = _case(4, P, nblk, 2, 64, Lq, with_new, dtype, lens)
    _run_and_check(CA, c, causal, dtype, expect_splits=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,nblk", PAGES, ids=[f"P{p}" for p, _ in PAGES])
def test_paged_shared_prefix_pages(P, nblk, dtype):
    """Beams: rows 1.. read row 0's first pages (same physical ids) and append into pages of their
    own. Both the split and the one-split path (many heads)."""
    CA = _ops()
    Lmax = P * nblk
    base = Lmax // 2
    share = max(1, (base - 1) // P) if P < Lmax else 0
    lens = [base, base + 1, base - 1 if P == 1 else base, Lmax - 1]
    for H, splits in ((2, True), (48, False)):
        c = _case(4, P, nblk, H, 32, 1, True, dtype, lens, share=min(share, (min(lens) // P)))
        _run_and_check(CA, c, True, dtype, expect_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,nblk", [(1, 200), (3, 70), (16, 13)])
def test_paged_leftpad(P, nblk, dtype):
    """cache_leftpad on logical slots: a pad inside the window, a pad past the first tile, an empty
    window (pad == len + new), pad above the length with new rows written below it (their page
    ids are used, the slots are not attended)."""
    CA = _ops()
    Lq = 2
    lens = [50, 100, 40, 30, 120]
    pads = [7, 70, 42, 31, 0]
    c = _case(5, P, nblk, 2, 64, Lq, True, dtype, lens, pads=pads)
    o = _run_and_check(CA, c, True, dtype)
    assert (o[2] == 0).all(), "an empty window gives zero rows"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,nblk", [(1, 400), (16, 25), (256, 2)])
@pytest.mark.parametrize("Lq", [5, 70], ids=["Lq5", "Lq70-two-query-tiles"])
def test_paged_causal_block_of_new_rows(Lq, P, nblk, dtype):
    """Lq > 1 new rows appended at their pages and attended causally (bottom-right on the logical
    slots); Lq = 70 spans two 64-query tiles, each checking the whole row's pages."""
    CA = _ops()
    Lmax = P * nblk
    lens = [0, Lmax - Lq, (Lmax - Lq) // 3]
    c = _case(3, P, nblk, 2, 64, Lq, True, dtype, lens, pads=[0, 5, 1])
    _run_and_check(CA, c, True, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,nblk", [(1, 300), (3, 100), (16, 20)])
@pytest.mark.parametrize("H", [2, 48], ids=["split", "one-split"])
def test_paged_out_of_range_entries(H, P, nblk, dtype):
    """An attended entry out of [0, num_blocks) -- in the read prefix, at the written slot, in the
    last split's share -- makes the row's output NaN; a new row on such an entry is not written,
    also below the pad (row 4: not attended, so its output stays exact); the other rows are exact
    (garbage in unused entries never matters)."""
    CA = _ops()
    Lmax = P * nblk
    lens = [Lmax // 2, Lmax // 2, Lmax - 1, Lmax // 3, 60, Lmax // 4]
    pads = [0, 0, 0, 0, 61, 3]          # row 4: pad above its length, the new row written below it
    bad = [(0, 0), (1, (lens[1]) // P), (2, (Lmax - 2) // P), (4, 60 // P)]
    c = _case(6, P, nblk, H, 32, 1, True, dtype, lens, pads=pads, bad=bad)
    _run_and_check(CA, c, False, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_cache_views(dtype):
    """Caches that are views: a head slice (strides passed as they are) and a storage offset of one
    element (unaligned: the bridge runs on an aligned copy and copies it back)."""
    CA = _ops()
    P, nblk, H, D = 16, 12, 2, 64
    for view in ("heads", "offset"):
        c = _case(3, P, nblk, H, D, 1, True, dtype, [50, 120, 191])
        nb = c["kc"].shape[0]
        for name in ("kc", "vc", "kc_e", "vc_e"):
            t = c[name]
            if view == "heads":
                big = torch.randn(nb, P, 2 * H, D, dtype=dtype, device="cuda")
                v = big[:, :, H:]
            else:
                flat = torch.randn(t.numel() + 1, dtype=dtype, device="cuda")
                v = flat[1:].view(t.shape)
            v.copy_(t)
            c[name] = v
        _run_and_check(CA, c, True, dtype)
