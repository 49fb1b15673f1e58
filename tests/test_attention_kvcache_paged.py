"""fl.attention_with_kvcache(..., block_table=...) (issue 11): paged KV caches, flash-attn's convention.

Semantics under test (every backend): k_cache, v_cache are (num_blocks, page_block_size, H, D) pages;
row b's logical slot j lives at cache[block_table[b, j // P], j % P]; lengths, left padding, causality
and the append are those of the plain cache on the logical slots (Lmax = max_num_blocks * P). Rows
may share pages (beams sharing a prefix). Pages no row attends hold NaN / inf and must never matter.
An entry a row reads or writes that is out of range: ValueError for CPU tensors (the op's host
check); without the check (the kernels' contract) the row's output is NaN and nothing is written there.
Expected values: tests/helpers.attention_f64 on each row's own logical window, float64; expected
caches: the physical pages with exactly the new rows written at their pages.
"""
import random

import pytest
import torch

import fastlayers as fl
from fastlayers.ops import attention as A
from fastlayers.models import generation as G
from fastlayers.models.generation import StaticKVCache
from backends_matrix import kernel_backend_cases
from helpers import assert_close_rule, attention_f64
from test_attention_kvcache_leftpad import POISON, _check, _gpu, _rows

FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TRITON_CPU = [pytest.param(c.values[0], marks=c.marks, id="triton-interp")
              for c in kernel_backend_cases() if c.values[1] == "cpu"]
SCALE = 0.3


def _poison_like(shape, dtype, device):
    n = torch.Size(shape).numel()
    vals = torch.tensor(POISON, dtype=dtype)[torch.arange(n) % len(POISON)]
    return vals.reshape(shape).to(device)


def _make(causal, B, P, nblk, H, D, Lq, with_new, dtype=torch.float32, device="cpu", lens=None, pads=None,
          share=True, spare=3):
    """A paged case: random logical caches (B, nblk * P, H, D) laid out on shuffled pages among
    `spare` extra poisoned ones; row 1 shares row 0's full pages of their common history (share);
    every slot outside a row's window [pad, len) poisoned. Returns the inputs and the float64
    expectation: output, and the physical caches after the step."""
    Lmax = nblk * P
    n_new = Lq if with_new else 0
    if lens is None:
        lens, pads = _rows(B, Lmax, n_new, tile=max(P, 4))
        pads[0] = 0                                   # row 0's history is all real: row 1 may share it
    rnd = random.Random(torch.randint(0, 2**31, ()).item())
    kl, vl = (torch.randn(B, Lmax, H, D, dtype=dtype) for _ in range(2))          # logical caches
    q, kn, vn = (torch.randn(B, Lq, H, D, dtype=dtype) for _ in range(3))
    num_blocks = B * nblk + spare
    order = list(range(num_blocks))
    rnd.shuffle(order)
    table = torch.tensor(order[:B * nblk], dtype=torch.int32).view(B, nblk)
    shared = 0
    if share and B > 1 and pads[0] == 0:
        shared = min(lens[0], lens[1], max(pads[1], 0) + 10**9) // P     # full pages of common history
        table[1, :shared] = table[0, :shared]
        kl[1, :shared * P], vl[1, :shared * P] = kl[0, :shared * P], vl[0, :shared * P]
    kc, vc = (_poison_like((num_blocks, P, H, D), dtype, "cpu") for _ in range(2))
    for b in range(B):
        for j in range(max(pads[b], 0), min(max(lens[b], 0), Lmax)):  # the history a row may attend
            e, o = table[b, j // P], j % P
            kc[e, o], vc[e, o] = kl[b, j], vl[b, j]
    kc_e, vc_e = kc.clone(), vc.clone()
    expect = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    for b, (n, p) in enumerate(zip(lens, pads)):
        end = n + n_new
        if not (0 <= n and end <= Lmax and 0 <= p <= end):
            continue                                  # a bad row: NaN, no write (checked by the callers)
        ek, ev = kl[b].clone(), vl[b].clone()
        if with_new:
            ek[n:end], ev[n:end] = kn[b], vn[b]
            for i in range(n_new):
                e, o = table[b, (n + i) // P], (n + i) % P
                kc_e[e, o], vc_e[e, o] = kn[b, i], vn[b, i]
        expect[b:b + 1] = attention_f64(q[b:b + 1], ek[None, p:end], ev[None, p:end], causal=causal, scale=SCALE)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=to(q), kc=to(kc), vc=to(vc), kn=to(kn) if with_new else None, vn=to(vn) if with_new else None,
                lens=to(torch.tensor(lens, dtype=torch.int32)), pads=to(torch.tensor(pads, dtype=torch.int32)),
                table=to(table), expect=to(expect), kc_e=to(kc_e), vc_e=to(vc_e), shared=shared, lens_l=lens)


def _run(path, c, causal, table=None):
    """One step through `path` on copies of the caches -> (o, k_cache, v_cache)."""
    kc, vc = c["kc"].clone(), c["vc"].clone()
    table = c["table"] if table is None else table
    args = (c["q"], kc, vc, c["lens"], c["kn"], c["vn"])
    with torch.no_grad():
        if path == "ref":
            o = A.attention_with_kvcache_ref(*args, SCALE, causal, c["pads"], block_table=table)
        elif path == "torch_device":  # the no-host-read composition CUDA tensors run
            o = A._paged_step(A._kvcache_torch_device, *args, SCALE, causal, c["pads"], table)
        elif path.endswith("_compiled"):
            torch._dynamo.reset()
            backend = path.split("_")[0]
            f = torch.compile(lambda q, kc, vc, lens, kn, vn, pads, bt: fl.attention_with_kvcache(
                q, kc, vc, lens, kn, vn, cache_leftpad=pads, block_table=bt, causal=causal, softmax_scale=SCALE,
                backend=backend), fullgraph=True, backend="aot_eager")
            o = f(*args, c["pads"], table)
        else:
            o = fl.attention_with_kvcache(*args, cache_leftpad=c["pads"], block_table=table, causal=causal,
                                          softmax_scale=SCALE, backend=path)
            assert fl.last_backend("attention_with_kvcache") == path
    return o, kc, vc


STEPS = [(1, True), (3, True), (1, False), (3, False)]  # (Lq, with k_new)
STEP_IDS = ["new1", "new3", "q1-nonew", "q3-nonew"]
PATHS = ["ref", "torch", "torch_device", "torch_compiled"]


# ----------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("P", [1, 3, 8], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Lq,with_new", STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("path", PATHS)
def test_paged_matches_float64_windows(path, Lq, with_new, causal, P):
    c = _make(causal, 5, P, -(-24 // P), 2, 8, Lq, with_new)
    o, kc, vc = _run(path, c, causal)
    _check(o, kc, vc, c)


@pytest.mark.parametrize("P", [1, 3, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("Lq,with_new", [(1, True), (2, True), (2, False)], ids=["new1", "new2", "q2-nonew"])
@pytest.mark.parametrize("path", TRITON_CPU)
def test_paged_triton_interpreter(path, Lq, with_new, P):
    c = _make(True, 4, P, -(-20 // P), 2, 16, Lq, with_new)
    o, kc, vc = _run(path, c, True)
    _check(o, kc, vc, c)


@pytest.mark.parametrize("path", ["torch"] + TRITON_CPU)
def test_paged_equals_plain_cache(path):
    """One page per row of Lmax slots with block_table = arange(B): the plain cache's results, bit for bit."""
    B, Lmax, H, D = 3, 20, 2, 16
    q, kn, vn = (torch.randn(B, 1, H, D) for _ in range(3))
    kc, vc = torch.randn(B, Lmax, H, D), torch.randn(B, Lmax, H, D)
    lens, pads = torch.tensor([4, 19, 9], dtype=torch.int32), torch.tensor([0, 3, 9], dtype=torch.int32)
    table = torch.arange(B, dtype=torch.int32)[:, None]
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    with torch.no_grad():
        plain = fl.attention_with_kvcache(q, k1, v1, lens, kn, vn, cache_leftpad=pads, backend=path)
        paged = fl.attention_with_kvcache(q, k2, v2, lens, kn, vn, cache_leftpad=pads, block_table=table,
                                          backend=path)
    torch.testing.assert_close(paged, plain, rtol=0, atol=0)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("path", ["ref", "torch_device"])
def test_out_of_range_entries_give_nan_rows_and_no_write(path):
    """The kernels' contract where no host check runs: a row whose used entry is out of range is NaN,
    a new row is not written where its entry is out of range (row 0's write at slot 5, on a good
    page, lands); an out-of-range entry no row uses changes nothing."""
    c = _make(True, 4, 2, 8, 2, 8, 1, True, lens=[5, 9, 3, 6], pads=[0, 2, 0, 7], share=False)
    table = c["table"].clone()
    nb = c["kc"].shape[0]
    table[0, 1] = nb          # row 0 attends slots 2, 3: bad
    table[1, 4] = -1          # row 1 writes (and attends) slot 9 (page 4): bad
    table[2, 6] = nb + 100    # row 2 never reaches page 6: harmless
    table[3, 3] = -7          # row 3 writes slot 6 inside its left padding (7): not written, not attended
    o, kc, vc = _run(path, c, True, table=table)
    assert torch.isnan(o[0]).all() and torch.isnan(o[1]).all()
    assert_close_rule(o[2:], c["expect"][2:], None, factor=0, floor=1e-5)
    assert (o[3] == 0).all()  # an empty window
    kc_e, vc_e = c["kc_e"].clone(), c["vc_e"].clone()
    for b, e, off in ((1, 4, 1), (3, 3, 0)):   # rows 1 and 3's writes did not happen
        page = int(c["table"][b, e])
        kc_e[page, off], vc_e[page, off] = c["kc"][page, off], c["vc"][page, off]
    torch.testing.assert_close(kc, kc_e, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, vc_e, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_out_of_range_entry_raises_for_cpu_tensors(compiled):
    c = _make(True, 3, 4, 4, 2, 8, 1, True, lens=[5, 9, 3], pads=[0, 0, 0], share=False)
    table = c["table"].clone()
    table[1, 2] = c["kc"].shape[0]
    with pytest.raises(ValueError, match=r"block_table: expected entries in \[0, num_blocks = 15\), got "
                                         r"block_table\[1, 2\] = 15"):
        _run("torch_compiled" if compiled else "torch", c, True, table=table)
    table = c["table"].clone()
    table[2, 3] = -5                                  # a page row 2 does not reach: fine
    o, kc, vc = _run("torch", c, True, table=table)
    _check(o, kc, vc, c)


def test_block_table_argument_checks():
    q, kn, vn = (torch.randn(2, 1, 2, 8) for _ in range(3))
    kc, vc = torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    run = lambda **kw: fl.attention_with_kvcache(q, kw.get("kc", kc), kw.get("vc", vc), kw.get("lens", lens),  # noqa: E731
                                                 kn, vn, block_table=kw.get("table", table))
    with pytest.raises(TypeError, match="block_table: expected an int32 tensor, got torch.int64"):
        run(table=table.long())
    with pytest.raises(TypeError, match="block_table: expected an int32 tensor, got list"):
        run(table=[[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match=r"block_table: expected shape \(B, max_num_blocks_per_seq\) with B = 2, "
                                         r"got \(3, 2\)"):
        run(table=table.view(3, 2))
    with pytest.raises(ValueError, match=r"block_table: expected shape .* got \(6,\)"):
        run(table=table.view(-1))
    with pytest.raises(ValueError, match=r"k_cache: expected paged shape \(num_blocks, page_block_size >= 1, "
                                         r"H=2, D=8\)"):
        run(kc=torch.randn(6, 4, 3, 8), vc=torch.randn(6, 4, 3, 8))
    with pytest.raises(ValueError, match=r"k_cache: expected paged shape"):
        run(kc=torch.randn(6, 0, 2, 8), vc=torch.randn(6, 0, 2, 8))
    with pytest.raises(ValueError, match=r"block_table: too few pages: cache_seqlens.max\(\) \+ Lq_new = 12 \+ 1 > "
                                         r"max_num_blocks_per_seq \* page_block_size = 3 \* 4 = 12"):
        run(lens=torch.tensor([3, 12], dtype=torch.int32))
    # the plain cache's shape rule is the paged one's without block_table: (B, Lmax, H, D)
    with pytest.raises(ValueError, match=r"k_cache: expected shape \(B=2, Lmax"):
        fl.attention_with_kvcache(q, kc, vc, lens, kn, vn)


@pytest.mark.parametrize("path", ["torch"] + TRITON_CPU)
def test_block_table_views(path):
    """A non-contiguous block_table (a transposed view, a column slice) reads the same entries."""
    c = _make(True, 3, 2, 6, 2, 8, 1, True, lens=[5, 9, 3], pads=[0, 2, 1])
    for view in (c["table"].t().contiguous().t(), torch.stack([c["table"], -c["table"]], 2)[:, :, 0]):
        assert not view.is_contiguous() and torch.equal(view, c["table"])
        o, kc, vc = _run(path, c, True, table=view)
        _check(o, kc, vc, c)


def test_paged_opcheck():
    c = _make(True, 3, 2, 6, 2, 8, 2, True, lens=[5, 9, 3], pads=[0, 2, 1])
    torch.library.opcheck(torch.ops.fastlayers.attention_with_kvcache.default,
                          (c["q"], c["kc"].clone(), c["vc"].clone(), c["lens"], c["kn"], c["vn"], SCALE, True,
                           "torch", c["pads"], c["table"]))


def test_paged_autocast_with_fp32_caches():
    """CPU autocast (bfloat16) with float32 pages: the new rows land in the fp32 pages, attention at bf16."""
    c = _make(True, 3, 4, 5, 2, 8, 1, True, lens=[4, 9, 6], pads=[0, 2, 5])
    kc, vc = c["kc"].clone(), c["vc"].clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = fl.attention_with_kvcache(c["q"], kc, vc, c["lens"], c["kn"], c["vn"], cache_leftpad=c["pads"],
                                      block_table=c["table"], softmax_scale=SCALE, backend="torch")
    assert o.dtype == torch.bfloat16
    assert_close_rule(o, c["expect"], None, factor=0, floor=FLOOR[torch.bfloat16])
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, c["vc_e"], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_paged_autocast_compiles_without_a_graph_break(compiled):
    """Autocast with caches of another dtype writes the new rows outside the custom op (torch code
    that torch.compile traces): fullgraph must hold, with the eager results."""
    c = _make(True, 3, 2, 6, 2, 8, 1, True, lens=[5, 9, 3], pads=[0, 2, 1])

    def step(q, kc, vc, lens, kn, vn, pads, bt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, cache_leftpad=pads, block_table=bt,
                                             softmax_scale=SCALE, backend="torch")
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc, vc = c["kc"].clone(), c["vc"].clone()
    with torch.no_grad():
        o = step(c["q"], kc, vc, c["lens"], c["kn"], c["vn"], c["pads"], c["table"])
    assert_close_rule(o, c["expect"], None, factor=0, floor=FLOOR[torch.bfloat16])
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)


def test_paged_device_path_reads_nothing_on_the_host():
    """The pieces CUDA tensors run (the write at the pages, the entry check, the gather) on meta
    tensors: any host read (.item(), a 0-dim index, .tolist()) raises there."""
    B, P, nblk, H, D = 3, 2, 4, 2, 8
    meta = dict(device="meta")
    kc, vc = torch.empty(B * nblk, P, H, D, **meta), torch.empty(B * nblk, P, H, D, **meta)
    q, kn, vn = (torch.empty(B, 1, H, D, **meta) for _ in range(3))
    lens = torch.empty(B, dtype=torch.int32, **meta)
    table = torch.empty(B, nblk, dtype=torch.int32, **meta)
    A._paged_write(kc, vc, table, lens, kn, vn, torch.empty(B, dtype=torch.bool, **meta))
    A._paged_entries_ok(table, B * nblk, P, lens, 1, lens)
    A._paged_logical(kc, table)
    o = A._paged_step(A._kvcache_torch_device, q, kc, vc, lens, kn, vn, SCALE, True, lens, table)  # all of it
    assert o.shape == q.shape


def test_paged_autocast_bad_entry_contract_without_the_host_check(monkeypatch):
    """Autocast with fp32 pages where no host check runs (CUDA tensors): the same contract as the plain
    path -- a row attending a bad entry is NaN, and its new row on a good page is still written."""
    monkeypatch.setattr(A, "_check_lengths", lambda *a, **k: None)
    c = _make(True, 3, 2, 6, 2, 8, 1, True, lens=[5, 9, 3], pads=[0, 2, 0], share=False)
    table = c["table"].clone()
    table[0, 1] = c["kc"].shape[0]                    # row 0 attends slots 2, 3: bad; it writes slot 5 (page 2)
    kc, vc = c["kc"].clone(), c["vc"].clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = fl.attention_with_kvcache(c["q"], kc, vc, c["lens"], c["kn"], c["vn"], cache_leftpad=c["pads"],
                                      block_table=table, softmax_scale=SCALE, backend="torch")
    assert torch.isnan(o[0]).all()
    assert_close_rule(o[1:], c["expect"][1:], None, factor=0, floor=FLOOR[torch.bfloat16])
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)   # row 0's write landed
    torch.testing.assert_close(vc, c["vc_e"], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------- the beam search cache
def test_static_cache_reorder_moves_the_table_not_the_caches():
    """Paged StaticKVCache.reorder: each row reads its parent's history (what copying the caches'
    rows would give), the caches are untouched, and the next token lands on the row's own page."""
    B, L, H, D = 4, 7, 2, 8
    cache = StaticKVCache(2, B, L, H, D, torch.float32, "cpu")
    plain = StaticKVCache(2, B, L, H, D, torch.float32, "cpu")
    cache.use_pages()
    for t in cache.k + cache.v:
        t.copy_(torch.randn_like(t))
    for a, b in zip(plain.k + plain.v, cache.k + cache.v):
        a.copy_(b)
    for step, rows in enumerate(([1, 1, 3, 0], [2, 0, 0, 3], [0, 0, 1, 1])):
        n = step + 3                                  # slots filled; the step wrote slot n - 1 of each row
        for layer in range(2):
            new_k, new_v = torch.randn(B, H, D), torch.randn(B, H, D)
            kp, vp = cache.kv(layer)
            page = cache.block_table[:, n - 1].long()
            assert torch.equal(page, torch.arange(B) * L + n - 1), "a new token goes to the row's own page"
            kp[page, 0], vp[page, 0] = new_k, new_v
            plain.k[layer][:, n - 1], plain.v[layer][:, n - 1] = new_k, new_v
        cache.seqlens.fill_(n)
        plain.seqlens.fill_(n)
        rows = torch.tensor(rows)
        before = [t.clone() for t in cache.k + cache.v]
        cache.reorder(rows)
        plain.reorder(rows)
        assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v)), "paged reorder copied a cache"
        for layer in range(2):
            kp, vp = cache.kv(layer)                                           # (B * L, 1, H, D) pages
            logical = kp[cache.block_table.long()].reshape(B, L, H, D)
            torch.testing.assert_close(logical[:, :n], plain.k[layer][:, :n], rtol=0, atol=0)
            assert torch.equal(vp[cache.block_table.long()].reshape(B, L, H, D)[:, :n], plain.v[layer][:, :n])
        own = torch.arange(B * L, dtype=torch.int32).view(B, L)
        assert torch.equal(cache.block_table[:, n:], own[:, n:]), "the slots to come stay the row's own pages"
    cache.reset_pages()
    assert torch.equal(cache.block_table, torch.arange(B * L, dtype=torch.int32).view(B, L))


def test_beam_search_reads_a_page_table_and_matches_the_copying_cache(monkeypatch):
    """GPT-2 and BART beam search with the paged cache (CUDA's choice) pass block_table to every decode
    step and give the same sequences and scores as the cache-copying reorder (CPU's choice), which the
    beam search tests compare with transformers."""
    import transformers
    from fastlayers.models import BartForConditionalGeneration, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=61, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=61, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=48,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()
    ids = torch.randint(3, 61, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                  # GPT-2: left padding; BART: encoder padding on the left
    ours = {}
    from pathlib import Path
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for name, m, cls in (("gpt2", gpt2, GPT2LMHeadModel), ("bart", bart, BartForConditionalGeneration)):
            m.save_pretrained(Path(d) / name)
            ours[name] = cls.from_pretrained(Path(d) / name)
    tables = []
    real = fl.attention_with_kvcache

    def spy(*args, **kw):
        tables.append(kw.get("block_table"))
        return real(*args, **kw)

    kw = dict(num_beams=3, max_new_tokens=8, num_return_sequences=2, return_dict_in_generate=True,
              output_scores=True, early_stopping=True, length_penalty=1.3)
    assert not G._page_beams(torch.device("cpu")) and G._page_beams(torch.device("cuda"))
    for name, model in ours.items():
        monkeypatch.setattr(fl, "attention_with_kvcache", spy)
        monkeypatch.setattr(G, "_page_beams", lambda device: True)   # as on CUDA
        tables.clear()
        paged = model.generate(ids, attention_mask=mask, **kw)
        assert tables and all(t is not None and t.shape == (6, tables[0].shape[1]) for t in tables), name
        with monkeypatch.context() as m:
            m.setattr(G, "_page_beams", lambda device: False)        # as on CPU
            tables.clear()
            copied = model.generate(ids, attention_mask=mask, **kw)
            assert tables and all(t is None for t in tables), name
        assert torch.equal(paged.sequences, copied.sequences), name
        torch.testing.assert_close(paged.sequences_scores, copied.sequences_scores, rtol=0, atol=1e-6)
        monkeypatch.undo()


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 16, 256], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("Lq,with_new", STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_paged_matches_float64_windows(backend, Lq, with_new, P, dtype):
    """CUDA tensors (no host check): ~1000-slot logical caches on shuffled pages (several splits)."""
    _gpu(backend)
    c = _make(True, 6, P, -(-1024 // P), 4, 64, Lq, with_new, dtype=dtype, device="cuda")
    o, kc, vc = _run(backend, c, True)
    _check(o, kc, vc, c, floor=FLOOR[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_out_of_range_entries_are_nan_and_unwritten(backend, monkeypatch):
    _gpu(backend)
    monkeypatch.delenv(A.CHECK_LENGTHS_ENV, raising=False)
    c = _make(True, 4, 16, 8, 2, 64, 1, True, dtype=torch.float16, device="cuda", lens=[50, 90, 30, 60],
              pads=[0, 2, 0, 0], share=False)
    table = c["table"].clone()
    nb = c["kc"].shape[0]
    table[0, 1] = nb                                   # read by row 0
    table[1, 5] = -1                                   # written by row 1 (slot 90)
    table[2, 7] = 10**6                                # never reached by row 2
    o, kc, vc = _run(backend, c, True, table=table)
    assert torch.isnan(o[0]).all() and torch.isnan(o[1]).all()
    assert_close_rule(o[2:], c["expect"][2:], None, factor=0, floor=FLOOR[torch.float16])
    kc_e = c["kc_e"].clone()
    e1 = int(c["table"][1, 5])
    kc_e[e1, 90 % 16] = c["kc"][e1, 90 % 16]
    torch.testing.assert_close(kc, kc_e, rtol=0, atol=0, equal_nan=True)
    monkeypatch.setenv(A.CHECK_LENGTHS_ENV, "1")
    with pytest.raises(ValueError, match="block_table"):
        _run(backend, c, True, table=table)
