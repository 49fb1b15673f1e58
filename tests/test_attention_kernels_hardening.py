"""Hardening of the attention kernels (issue 8), both backends, at the launcher contract:

    attention_fwd(q, k, v, key_padding_mask, softmax_scale, causal, dropout_p, rng_state) -> (o, lse)
    attention_bwd(do, q, k, v, o, lse, key_padding_mask, softmax_scale, causal, dropout_p, rng_state,
                  deterministic) -> (dq, dk, dv)
    attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal) -> o

1. grid limits: every launch (Triton grid functions, the library's fl_attention_grid) stays within
   (2^31 - 1, 65535, 65535) at extreme shapes, the launchers use exactly those grids, and the
   kernels decode (b, h) from axes 1 and 2 (checked on CPU by shrinking the Triton limits);
2. dropout state: rng_state is a tensor the kernels read, so the mask follows in-place redraws
   (and CUDA-graph replays, GPU); the spec computes from the tensor without a host read;
3. kv cache: slots past a row's length never matter (NaN / inf poison), lengths 0 and Lmax - Lq,
   bad lengths (NaN rows, caches untouched), strided cache views;
4. keys masked by key_padding_mask holding NaN / inf: o and every gradient finite and equal to a
   float64 reference on clean data, dk / dv of masked keys exactly 0;
5. key_padding_mask / cache_seqlens must be contiguous (the launchers check);
6. CUDA: misaligned q / k / v / caches are copied by the bridge, never read wrong.
CPU: the Triton kernels in the interpreter (tiny shapes, fp32). GPU (marker gpu): Triton compiled
and the CUDA library, fp16.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from fastlayers import _cuda  # noqa: E402
from fastlayers.kernels import attention as TA  # noqa: E402
from fastlayers.kernels import philox  # noqa: E402
from helpers import assert_close_rule  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LIMITS = (2**31 - 1, 65535, 65535)  # CUDA grid axes x, y, z


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def _env(name):
    """(launcher module, device, dtype, head dim) for a backend, or skip."""
    if name == "triton-cpu":
        if not INTERPRET:
            pytest.skip("CPU tests need TRITON_INTERPRET=1")
        return TA, "cpu", torch.float32, 16
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "triton-gpu":
        if INTERPRET:
            pytest.skip("GPU tests need compiled kernels: TRITON_INTERPRET=0")
        return TA, "cuda", torch.float16, 32
    err = _cuda.load_error()
    if err is not None:
        pytest.skip(err)
    from fastlayers.cuda_ops import attention as CA
    return CA, "cuda", torch.float16, 32


BACKENDS = ["triton-cpu", pytest.param("triton-gpu", marks=pytest.mark.gpu),
            pytest.param("cuda", marks=pytest.mark.gpu)]
GPU_BACKENDS = [pytest.param("triton-gpu", marks=pytest.mark.gpu), pytest.param("cuda", marks=pytest.mark.gpu)]


def rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------------
# float64 reference (and the same formula at the kernel's dtype: torch's own error for the rule)
# ----------------------------------------------------------------------------------------------
def reference(q, k, v, kpm, scale, causal, keep=None, p=0.0, dtype=torch.float64, kv_lens=None):
    """o (B, Lq, H, D) in `dtype`; differentiable; rows with no key give 0. kv_lens (B,): per-row
    key counts (decode: bottom-right causal against each row's own length)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    i = torch.arange(Lq, device=q.device).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=q.device).view(1, 1, 1, Lk)
    lens = torch.full((B,), Lk, device=q.device) if kv_lens is None else kv_lens.to(q.device).long()
    lens = lens.view(B, 1, 1, 1)
    allowed = j < lens
    if causal:
        allowed = allowed & (j <= i + lens - Lq)
    if kpm is not None:
        allowed = allowed & kpm.view(B, 1, 1, Lk)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    P = torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), -1) * allowed
    if keep is not None:
        P = P * keep.to(dtype) / (1.0 - p)
    return torch.einsum("bhij,bjhd->bihd", P, v)


def check(out, q, k, v, kpm, scale, causal, what, **kw):
    ref = reference(q, k, v, kpm, scale, causal, **kw)
    same = reference(q, k, v, kpm, scale, causal, dtype=out.dtype, **kw)
    assert_close_rule(out, ref, same, what=what)


def bits(t):
    """Bit pattern of t (NaN payloads included) for exact "untouched" comparisons."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ----------------------------------------------------------------------------------------------
# 1. grid limits
# ----------------------------------------------------------------------------------------------
# (B, H, Lq, Lk): the embedding batch, B*H just past 65535 either way, 10^6 heads, 10^6
# rows, the largest int32 length, the most heads the grids can carry (65535^2).
EXTREME = [(4096, 16, 128, 128), (65540, 1, 1, 1), (1, 65540, 3, 5), (10**6, 1, 2, 2), (1000, 1000, 1, 1),
           (1, 1, 10**6, 10**6), (2, 3, 2**31 - 1, 2**31 - 1), (65535, 65535, 1, 1), (3, 2, 1, 0)]


def _within(grid):
    assert len(grid) == 3 and all(1 <= g <= lim for g, lim in zip(grid, LIMITS)), grid


def _covers_heads(grid, heads):
    # every (b, h) has a program; the rectangle overhangs by less than one z-slice of y
    assert grid[1] * grid[2] >= heads and grid[1] * grid[2] - heads < grid[2], (grid, heads)


@pytest.mark.parametrize("B,H,Lq,Lk", EXTREME)
def test_triton_grids_within_limits(B, H, Lq, Lk):
    for bm in (16, 32, 64, 128):
        for grid, tiles in ((TA.fwd_grid(B, H, Lq, bm), Lq), (TA.bwd_preprocess_grid(B, H, Lq, bm), Lq),
                            (TA.bwd_dkdv_grid(B, H, Lk, bm), Lk), (TA.bwd_dq_grid(B, H, Lq, bm), Lq)):
            _within(grid)
            _covers_heads(grid, B * H)
            assert grid[0] == max(1, triton.cdiv(tiles, bm))
        for splits in (1, 7, 128):
            if B * H * splits > 65535 ** 2:  # the launcher caps the split count there
                continue
            grid = TA.decode_split_grid(B, H, Lq, bm, splits)
            _within(grid)
            _covers_heads(grid, B * H * splits)
            assert grid[0] == triton.cdiv(Lq, bm)
    for grid in (TA.decode_append_grid(B, H, Lq), TA.decode_combine_grid(B, H, Lq)):
        _within(grid)
        _covers_heads(grid, B * H)
        assert grid[0] == max(1, Lq)


def test_triton_grid_beyond_limits_raises():
    with pytest.raises(ValueError, match="heads"):
        TA.fwd_grid(65535 * 65535 + 1, 1, 1, 16)
    if INTERPRET:  # the launcher's capability check says so first (an expanded view: no storage)
        big = torch.empty(1, 1, 1, 16).expand(65535 * 65535 + 1, 1, 1, 16)
        assert "B*H" in TA.unsupported_reason(big, big, big, False, None, 0.0)


class _Recorder:
    """Stands in for a Triton kernel: kernel[grid](...) records the grid and launches nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid))


@pytest.mark.skipif(not INTERPRET, reason="the launchers pick GPU configs off the interpreter (meta tensors)")
@pytest.mark.parametrize("B,H,Lq,Lk", EXTREME[:-1])
def test_triton_launchers_use_the_grids(monkeypatch, B, H, Lq, Lk):
    """The real launchers, on meta tensors (no storage), launch within the limits at extreme shapes."""
    log = []
    for name in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                 "_decode_append_kernel", "_decode_split_kernel", "_decode_combine_kernel"):
        monkeypatch.setattr(TA, name, _Recorder(name, log))
    D = 16
    meta = dict(device="meta", dtype=torch.float16)
    q, k = torch.empty(B, Lq, H, D, **meta), torch.empty(B, Lk, H, D, **meta)
    lse = torch.empty(B, H, Lq, device="meta")
    st = torch.empty(2, dtype=torch.int64, device="meta")
    kpm = torch.empty(B, Lk, dtype=torch.bool, device="meta")
    TA.attention_fwd(q, k, k, kpm, 0.1, True, 0.1, st)
    TA.attention_bwd(q, q, k, k, q, lse, kpm, 0.1, True, 0.1, st, True)
    lens = torch.empty(B, dtype=torch.int32, device="meta")
    TA.attention_with_kvcache(q, k, k, lens, q, q, 0.1, True)
    names = {n for n, _ in log}
    assert names == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                     "_decode_append_kernel", "_decode_split_kernel", "_decode_combine_kernel"}, names
    for name, grid in log:
        _within(grid)
        if name == "_decode_split_kernel":  # axes 1, 2 carry (b, h, split)
            assert grid[1] * grid[2] >= B * H
        else:
            _covers_heads(grid, B * H)


@pytest.mark.skipif(not INTERPRET, reason="CPU tests need TRITON_INTERPRET=1")
def test_triton_kernels_decode_heads_from_axes_1_and_2(monkeypatch):
    """With the axis-1/2 limits shrunk to 4, B*H = 7 heads spread over a 4 x 2 rectangle (1 program
    overhangs; the decode split pass spreads 7 x 2 splits over 4 x 4): every kernel must find its
    (b, h[, split]) from both axes and skip the overhang. Results are bitwise those of the one-row grid."""
    torch.manual_seed(0)
    B, H, Lq, Lk, D, p = 7, 1, 5, 11, 16, 0.25
    q, k, v = (torch.randn(B, L, H, D) for L in (Lq, Lk, Lk))
    kpm = torch.rand(B, Lk) > 0.3
    st = rng(99, 5, "cpu")
    do = torch.randn(B, Lq, H, D)
    kc, vc = torch.randn(B, 20, H, D), torch.randn(B, 20, H, D)
    lens = torch.tensor([0, 3, 9, 15, 17, -1, 4], dtype=torch.int32)

    def run():
        o, lse = TA.attention_fwd(q, k, v, kpm, 0.3, True, p, st)
        grads = TA.attention_bwd(do, q, k, v, o, lse, kpm, 0.3, True, p, st, True)
        kc2, vc2 = kc.clone(), vc.clone()
        od = TA.attention_with_kvcache(q[:, :3], kc2, vc2, lens, k[:, :3], v[:, :3], 0.3, True, num_splits=2)
        return (o, lse, *grads, od, kc2, vc2)

    want = run()
    monkeypatch.setattr(TA, "GRID_LIMITS", (2**31 - 1, 4, 4))
    assert TA.fwd_grid(B, H, Lq, 16) == (1, 4, 2) and TA.decode_split_grid(B, H, 3, 16, 2) == (1, 4, 4)
    got = run()
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv", "decode o", "k_cache", "v_cache"), want, got):
        assert torch.equal(bits(a), bits(b)), name


CUDA_KERNELS = ("fwd", "fwd_sm90", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_dq_convert", "kvcache_append",
                "kvcache_combine")


def _cuda_grid_fn():
    err = _cuda.load_error()
    if err is not None:
        pytest.skip(err)
    from fastlayers.cuda_ops import attention as CA
    return CA.launch_grid


@pytest.mark.parametrize("B,H,Lq,Lk", EXTREME)
def test_cuda_grids_within_limits(B, H, Lq, Lk):
    """fl_attention_grid answers what the entry points launch (they call the same function)."""
    launch_grid = _cuda_grid_fn()
    for D in (32, 64, 96, 128):
        for kernel in CUDA_KERNELS:
            for splits in ((1, 2, 128) if kernel == "fwd" else (1,)):
                if B * H * splits > 65535 ** 2:  # splits > 1 only run for few heads (kvcache_splits)
                    continue
                grid = launch_grid(kernel, B, Lq, Lk, H, D, splits)
                _within(grid)
                if kernel in ("fwd", "fwd_sm90", "bwd_dkdv", "bwd_dq"):
                    _covers_heads(grid, B * H * splits)
                else:  # 1-D, grid-stride kernels
                    assert grid[1] == grid[2] == 1


def test_cuda_grid_beyond_limits_raises():
    launch_grid = _cuda_grid_fn()
    with pytest.raises(RuntimeError, match="limits"):
        launch_grid("fwd", 65536, 1, 1, 65536, 64, 1)
    with pytest.raises(RuntimeError, match="2\\^31"):
        launch_grid("fwd", 1, 2**31, 1, 1, 64, 1)
    with pytest.raises(RuntimeError, match="head dim"):
        launch_grid("fwd", 1, 1, 1, 1, 48, 1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_many_heads(backend):
    """B*H = 65540 > 65535: forward, backward and decode launch and match the reference."""
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(20)
    B, H, L = 16385, 4, 8
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(3))
    kpm = torch.rand(B, L, device=dev) > 0.2
    o, lse = mod.attention_fwd(q, k, v, kpm, D ** -0.5, True, 0.0, None)
    check(o, q, k, v, kpm, D ** -0.5, True, "o")
    do = torch.randn_like(o)
    for det in (True, False):
        grads = mod.attention_bwd(do, q, k, v, o, lse, kpm, D ** -0.5, True, 0.0, None, det)
        qs, ks, vs = (t.detach().double().requires_grad_() for t in (q, k, v))
        reference(qs, ks, vs, kpm, D ** -0.5, True).backward(do.double())
        qh, kh, vh = (t.detach().clone().requires_grad_() for t in (q, k, v))
        reference(qh, kh, vh, kpm, D ** -0.5, True, dtype=dtype).backward(do)
        for name, g, r, s in zip(("dq", "dk", "dv"), grads, (qs.grad, ks.grad, vs.grad), (qh.grad, kh.grad, vh.grad)):
            assert_close_rule(g, r, s, what=f"{name} (deterministic={det})")
    Lmax = 24
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dtype) for _ in range(2))
    lens = torch.randint(0, Lmax, (B,), device=dev, dtype=torch.int32)
    od = mod.attention_with_kvcache(q[:, :1], kc, vc, lens, k[:, :1], v[:, :1], D ** -0.5, True)
    rows = torch.arange(B, device=dev)
    assert torch.equal(kc[rows, lens.long()], k[:, 0])
    check(od, q[:, :1], kc, vc, None, D ** -0.5, True, "decode o", kv_lens=lens + 1)


# ----------------------------------------------------------------------------------------------
# 2. dropout state
# ----------------------------------------------------------------------------------------------
def test_spec_reads_the_state_tensor_without_a_host_read():
    """The spec is tensor ops only: it runs on 'meta' (where any host read would raise) and equals
    the (seed, offset) pair of Python ints."""
    st = torch.empty(2, dtype=torch.int64, device="meta")
    keep = philox.dropout_keep_mask(st, 2, 3, 4, 5, "meta", 0.5)
    assert keep.shape == (2, 3, 4, 5) and keep.dtype == torch.bool
    seed, offset = (5 << 32) + 17, (1 << 32) - 7
    a = philox.dropout_uniform(rng(seed, offset, "cpu"), 2, 2, 3, 9, "cpu")
    assert torch.equal(a, philox.dropout_uniform((seed, offset), 2, 2, 3, 9, "cpu"))
    assert torch.equal(a[:, :, 1:], philox.dropout_uniform(rng(seed, offset, "cpu"), 2, 2, 3, 9, "cpu", 1, 3))
    assert not torch.equal(a, philox.dropout_uniform(rng(seed, offset + 1, "cpu"), 2, 2, 3, 9, "cpu"))
    with pytest.raises(ValueError, match="rng_state"):
        philox.dropout_uniform(torch.tensor([1, 2, 3]), 1, 1, 1, 1, "cpu")


def _one_hot_inputs(dev, dtype, D):
    """q, k, and a one-hot V (Lk == D): o[b, i, h, j] = P_ij keep_ij / (1 - p), so (o != 0) is the mask."""
    B, Lq, H = 2, 5, 2
    q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype) * 0.3
    k = torch.randn(B, D, H, D, device=dev, dtype=dtype) * 0.3
    v = torch.eye(D, device=dev, dtype=dtype)[None, :, None, :].expand(B, D, H, D).contiguous()
    return q, k, v


def _kept(mod, qkv, st, p):
    o, _ = mod.attention_fwd(*qkv, None, 0.5, False, p, st)
    B, Lq, H, D = o.shape
    return (o != 0).permute(0, 2, 1, 3), (B, H, Lq, D)  # (B, H, Lq, Lk)


def _one_hot_dropout(mod, dev, dtype, D, st, p):
    torch.manual_seed(3)
    return _kept(mod, _one_hot_inputs(dev, dtype, D), st, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_equals_spec_and_follows_the_state_in_place(backend):
    mod, dev, dtype, D = _env(backend)
    p = 0.4
    st = rng((7 << 32) + 12345, (3 << 32) - 50, dev)  # seed hi word and a counter crossing 2^32
    kept1, shape = _one_hot_dropout(mod, dev, dtype, D, st, p)
    assert torch.equal(kept1, philox.dropout_keep_mask(st, *shape, dev, p))
    st.copy_(rng(2024, 0, dev))  # redraw in place: same Python arguments, same tensor object
    kept2, _ = _one_hot_dropout(mod, dev, dtype, D, st, p)
    assert not torch.equal(kept1, kept2), "the mask must depend on the state, not on the host call"
    assert torch.equal(kept2, philox.dropout_keep_mask(st, *shape, dev, p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_follows_the_state_in_place(backend, deterministic):
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(4)
    B, Lq, Lk, H, p = 1, 6, 10, 2, 0.3
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for L in (Lq, Lk, Lk))
    do = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    st = rng(11, 3, dev)
    o, lse = mod.attention_fwd(q, k, v, None, 0.3, True, p, st)
    g1 = mod.attention_bwd(do, q, k, v, o, lse, None, 0.3, True, p, st, deterministic)
    st.copy_(rng(12, 3, dev))
    g2 = mod.attention_bwd(do, q, k, v, o, lse, None, 0.3, True, p, st, deterministic)
    g3 = mod.attention_bwd(do, q, k, v, o, lse, None, 0.3, True, p, rng(12, 3, dev), deterministic)
    assert not torch.equal(g1[2], g2[2])  # dv = (P * keep)^T dO / (1 - p) sees the new mask
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(g2, g3))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_graph_replay_draws_a_fresh_mask(backend):
    """A captured dropout forward, replayed after the state was redrawn in place, draws the new mask."""
    mod, dev, dtype, D = _env(backend)
    p = 0.3
    st = rng(1, 0, dev)
    qkv = _one_hot_inputs(dev, dtype, D)  # outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        _kept(mod, qkv, st, p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kept, shape = _kept(mod, qkv, st, p)
    masks = []
    for seed, offset in ((123, 0), (456, 1 << 33)):
        st.copy_(torch.tensor([seed, offset], dtype=torch.int64))
        graph.replay()
        torch.cuda.synchronize()
        masks.append(kept.clone())
        assert torch.equal(kept, philox.dropout_keep_mask(st, *shape, dev, p)), (seed, offset)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rng_state_is_checked(backend):
    mod, dev, dtype, D = _env(backend)
    q = torch.randn(1, 3, 1, D, device=dev, dtype=dtype)
    for bad in (None, torch.tensor([1, 2], dtype=torch.int32, device=dev), torch.zeros(4, dtype=torch.int64,
                                                                                       device=dev)[::2]):
        with pytest.raises(ValueError, match="rng_state"):
            mod.attention_fwd(q, q, q, None, 0.1, False, 0.2, bad)
    mod.attention_fwd(q, q, q, None, 0.1, False, 0.0, None)  # no dropout: no state needed


# ----------------------------------------------------------------------------------------------
# 3. kv cache
# ----------------------------------------------------------------------------------------------
def _poisoned_cache(B, Lmax, H, D, dev, dtype, valid):
    """(B, Lmax, H, D) cache: random rows below valid[b], NaN / +inf / -inf at and past it."""
    c = torch.randn(B, Lmax, H, D, device=dev, dtype=dtype)
    for b in range(B):
        n = max(0, min(int(valid[b]), Lmax))
        tail = c[b, n:]
        tail.fill_(float("nan"))
        tail[1::3] = float("inf")
        tail[2::3] = float("-inf")
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_new", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_unused_slots_never_matter(backend, with_new, causal):
    """NaN / inf at and past every row's length (what torch.empty may leave) never reach o; lengths 0
    and Lmax - Lq included; cache rows outside the step untouched bit for bit."""
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(5)
    B, Lq, H = 4, 3, 2
    Lmax = 37 if dev == "cpu" else 300  # GPU: long enough for the CUDA split-KV + combine path
    n_new = Lq if with_new else 0
    lens = torch.tensor([0, 5, Lmax - n_new, Lmax // 2 + 1], dtype=torch.int32, device=dev)
    total = lens + n_new
    q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    kc = _poisoned_cache(B, Lmax, H, D, dev, dtype, lens)
    vc = _poisoned_cache(B, Lmax, H, D, dev, dtype, lens)
    kn = torch.randn(B, Lq, H, D, device=dev, dtype=dtype) if with_new else None
    vn = torch.randn(B, Lq, H, D, device=dev, dtype=dtype) if with_new else None
    k_expect, v_expect = kc.clone(), vc.clone()
    if with_new:
        for b in range(B):
            s = int(lens[b])
            k_expect[b, s:s + Lq], v_expect[b, s:s + Lq] = kn[b], vn[b]
    kw = dict(num_splits=3) if mod is TA else {}  # split boundaries inside the poisoned tail
    o = mod.attention_with_kvcache(q, kc, vc, lens, kn, vn, D ** -0.5, causal, **kw)
    assert torch.equal(bits(kc), bits(k_expect)) and torch.equal(bits(vc), bits(v_expect))
    clean_k = torch.where(torch.isfinite(k_expect), k_expect, 0)
    clean_v = torch.where(torch.isfinite(v_expect), v_expect, 0)
    check(o, q, clean_k, clean_v, None, D ** -0.5, causal, "o", kv_lens=total)
    if not with_new:
        assert (o[0] == 0).all(), "a row with no key is 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_new", [True, False])
def test_kvcache_bad_lengths_are_nan_and_write_nothing(backend, with_new):
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(6)
    B, Lq, H = 5, 2, 2
    Lmax = 16 if dev == "cpu" else 200  # GPU: the CUDA split-KV path, where the combine writes the NaN rows
    n_new = Lq if with_new else 0
    # bad: negative, one past the end, far past; good: the last fitting length, a short one
    lens = torch.tensor([-1, Lmax - n_new + 1, 2**31 - 1, Lmax - n_new, 3], dtype=torch.int32, device=dev)
    good = torch.tensor([False, False, False, True, True])
    q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dtype) for _ in range(2))
    kn, vn = ((torch.randn(B, Lq, H, D, device=dev, dtype=dtype) for _ in range(2)) if with_new else (None, None))
    k0, v0 = kc.clone(), vc.clone()
    o = mod.attention_with_kvcache(q, kc, vc, lens, kn, vn, D ** -0.5, True)
    assert torch.isnan(o[~good.to(dev)]).all(), "a bad length must be loud: NaN rows"
    assert torch.equal(kc[~good.to(dev)], k0[~good.to(dev)]) and torch.equal(vc[~good.to(dev)], v0[~good.to(dev)])
    for b in (3, 4):
        s = int(lens[b])
        if with_new:
            k0[b, s:s + Lq], v0[b, s:s + Lq] = kn[b], vn[b]
        check(o[b:b + 1], q[b:b + 1], k0[b:b + 1], v0[b:b + 1], None, D ** -0.5, True, f"o[{b}]",
              kv_lens=(lens[b:b + 1] + n_new))
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_strided_cache_views(backend):
    """Caches as views: a slice of a wider buffer (storage offset, padded l and h strides) and a
    (B, H, Lmax, D) buffer transposed; writes land in the view only."""
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(7)
    B, Lq, H, Lmax = 2, 2, 3, 19
    kbuf = torch.randn(B, Lmax + 2, H + 1, D + 8, device=dev, dtype=dtype)
    kc = kbuf[:, 1:Lmax + 1, 1:, 8:]  # storage offset, l / h strides of the wider buffer
    vbuf = torch.randn(B, H, Lmax, D, device=dev, dtype=dtype)
    vc = vbuf.transpose(1, 2)  # (B, Lmax, H, D), h stride > l stride
    q = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    kn = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    vn = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    lens = torch.tensor([4, Lmax - Lq], dtype=torch.int32, device=dev)
    kb_expect, vb_expect = kbuf.clone(), vbuf.clone()
    for b in range(B):
        s = int(lens[b])
        kb_expect[b, 1 + s:1 + s + Lq, 1:, 8:] = kn[b]
        vb_expect[b, :, s:s + Lq] = vn[b].transpose(0, 1)
    o = mod.attention_with_kvcache(q, kc, vc, lens, kn, vn, D ** -0.5, True)
    assert torch.equal(kbuf, kb_expect) and torch.equal(vbuf, vb_expect)
    check(o, q, kc, vc, None, D ** -0.5, True, "o", kv_lens=lens + Lq)


# ----------------------------------------------------------------------------------------------
# 4. masked keys holding NaN / inf
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,p", [(False, 0.0), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_masked_keys_with_nan_inf_affect_nothing(backend, causal, p, deterministic):
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(8)
    B, Lq, Lk, H, scale = 3, 9, 21, 2, 0.3
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for L in (Lq, Lk, Lk))
    kpm = torch.rand(B, Lk, device=dev) > 0.4
    kpm[0, -5:] = False  # masked keys at the tail, in the last tile
    kpm[1, :3] = False
    kpm[2] = False  # a batch row with no key at all: zeros, zero grads
    kp, vp = k.clone(), v.clone()
    kp[~kpm] = float("nan")
    vp[~kpm] = float("inf")
    vp[0, -1] = float("-inf")
    kp[1, 0] = float("inf")
    st = rng(77, 1000, dev)
    keep = philox.dropout_keep_mask(st, B, H, Lq, Lk, dev, p) if p else None
    o, lse = mod.attention_fwd(q, kp, vp, kpm, scale, causal, p, st if p else None)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    check(o, q, k, v, kpm, scale, causal, "o", keep=keep, p=p)
    assert (o[2] == 0).all() and (lse[2] == math.inf).all()
    do = torch.randn_like(o)
    dq, dk, dv = mod.attention_bwd(do, q, kp, vp, o, lse, kpm, scale, causal, p, st if p else None, deterministic)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name}: NaN / inf from a masked key"
    masked = ~kpm[:, :, None, None].expand_as(dk)
    assert (dk[masked] == 0).all() and (dv[masked] == 0).all(), "dk, dv of masked keys are 0"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, kpm, scale, causal, keep=keep, p=p).backward(do.double())
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference(qs, ks, vs, kpm, scale, causal, keep=keep, p=p, dtype=dtype).backward(do)
    for name, g, r, s in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad), ("dv", dv, v64.grad, vs.grad)):
        assert_close_rule(g, r, s, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_and_offset_views(backend):
    """Outer strides pass through, 0 included: k shared by every batch row (stride 0), v shared by
    every head (stride 0), q at a storage offset inside a packed buffer."""
    mod, dev, dtype, D = _env(backend)
    torch.manual_seed(11)
    B, Lq, Lk, H, scale = 3, 7, 12, 2, 0.4
    packed = torch.randn(B, Lq, 3, H, D, device=dev, dtype=dtype)
    q = packed[:, :, 2]  # storage offset 2*H*D, l stride 3*H*D
    k = torch.randn(1, Lk, H, D, device=dev, dtype=dtype).expand(B, Lk, H, D)  # b stride 0
    v = torch.randn(B, Lk, 1, D, device=dev, dtype=dtype).expand(B, Lk, H, D)  # h stride 0
    assert k.stride(0) == 0 and v.stride(2) == 0
    kpm = torch.rand(B, Lk, device=dev) > 0.2
    o, lse = mod.attention_fwd(q, k, v, kpm, scale, True, 0.0, None)
    check(o, q, k, v, kpm, scale, True, "o")
    do = torch.randn_like(o)
    dq, dk, dv = mod.attention_bwd(do, q, k, v, o, lse, kpm, scale, True, 0.0, None, True)
    assert dk.shape == k.shape and dv.shape == v.shape  # per (b, l, h): the gradient of the materialised view
    q64, k64, v64 = (t.detach().double().contiguous().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, kpm, scale, True).backward(do.double())
    qs, ks, vs = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    reference(qs, ks, vs, kpm, scale, True, dtype=dtype).backward(do)
    for name, g, r, s in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad), ("dv", dv, v64.grad, vs.grad)):
        assert_close_rule(g, r, s, what=name)


# ----------------------------------------------------------------------------------------------
# 5. contiguity of the mask and the lengths
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_lengths_must_be_contiguous(backend):
    mod, dev, dtype, D = _env(backend)
    B, L, H = 2, 5, 1
    q = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    kpm = torch.ones(B, 2 * L, dtype=torch.bool, device=dev)[:, ::2]
    with pytest.raises(ValueError, match="key_padding_mask"):
        mod.attention_fwd(q, q, q, kpm, 0.1, False, 0.0, None)
    lens = torch.tensor([[3, 1], [2, 1]], dtype=torch.int32, device=dev)[:, 0]
    with pytest.raises(ValueError, match="cache_seqlens"):
        mod.attention_with_kvcache(q[:, :1], q, q.clone(), lens, None, None, 0.1, True)


# ----------------------------------------------------------------------------------------------
# 6. CUDA alignment
# ----------------------------------------------------------------------------------------------
def _misaligned(shape, dev, dtype, extra_last=0):
    """A (B, L, H, D) view that breaks 16-byte rows: a 1-element storage offset, and with
    extra_last > 0 a padded head stride (not a multiple of 8 elements)."""
    B, L, H, D = shape
    buf = torch.randn(B * L * H * (D + extra_last) + 1, device=dev, dtype=dtype)
    return buf[1:].view(B, L, H, D + extra_last)[..., :D]


@pytest.mark.gpu
@pytest.mark.parametrize("extra_last", [0, 4])
def test_cuda_misaligned_inputs_are_read_right(extra_last):
    mod, dev, dtype, D = _env("cuda")
    torch.manual_seed(9)
    B, Lq, Lk, H = 2, 33, 47, 2
    q = _misaligned((B, Lq, H, D), dev, dtype, extra_last)
    k = _misaligned((B, Lk, H, D), dev, dtype, extra_last)
    v = _misaligned((B, Lk, H, D), dev, dtype)
    assert q.data_ptr() % 16 and mod.unsupported_reason(q, k, v, True, None, 0.0) is None
    kpm = torch.rand(B, Lk, device=dev) > 0.2
    o, lse = mod.attention_fwd(q, k, v, kpm, 0.2, True, 0.0, None)
    check(o, q, k, v, kpm, 0.2, True, "o")
    do = _misaligned((B, Lq, H, D), dev, dtype)
    do.copy_(torch.randn_like(do))
    for det in (True, False):
        grads = mod.attention_bwd(do, q, k, v, o, lse, kpm, 0.2, True, 0.0, None, det)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        reference(q64, k64, v64, kpm, 0.2, True).backward(do.double())
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        reference(qs, ks, vs, kpm, 0.2, True, dtype=dtype).backward(do)
        for name, g, r, s in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad),
                                  (qs.grad, ks.grad, vs.grad)):
            assert_close_rule(g, r, s, what=name)


@pytest.mark.gpu
def test_cuda_misaligned_caches_are_written_in_place():
    mod, dev, dtype, D = _env("cuda")
    torch.manual_seed(10)
    B, Lq, H, Lmax = 3, 2, 2, 70
    kc = _misaligned((B, Lmax, H, D), dev, dtype, 4)
    vc = _misaligned((B, Lmax, H, D), dev, dtype)
    q = _misaligned((B, Lq, H, D), dev, dtype)
    kn = _misaligned((B, Lq, H, D), dev, dtype, 4)
    vn = torch.randn(B, Lq, H, D, device=dev, dtype=dtype)
    lens = torch.tensor([0, 30, Lmax - Lq], dtype=torch.int32, device=dev)
    k_expect, v_expect = kc.clone(), vc.clone()
    for b in range(B):
        s = int(lens[b])
        k_expect[b, s:s + Lq], v_expect[b, s:s + Lq] = kn[b], vn[b]
    o = mod.attention_with_kvcache(q, kc, vc, lens, kn, vn, D ** -0.5, True)
    assert torch.equal(kc, k_expect) and torch.equal(vc, v_expect)
    check(o, q, kc, vc, None, D ** -0.5, True, "o", kv_lens=lens + Lq)
