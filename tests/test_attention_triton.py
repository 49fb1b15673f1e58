"""Triton attention launchers (kernels/attention.py) against a float64 plain-softmax reference.

Without a GPU the CPU tests run the kernels in the Triton interpreter (TRITON_INTERPRET=1, set by
conftest -- and below when this file runs alone -- before triton is imported); tiny shapes,
fp32/fp16. With a GPU the interpreter stays off and the GPU tests (marker `gpu`) run compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastlayers.kernels import attention as A  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests need TRITON_INTERPRET=1")


def gpu_test(fn):
    """marker `gpu`; skipped without CUDA or when the kernels are interpreted."""
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
                 pytest.mark.skipif(INTERPRET, reason="GPU tests need compiled kernels: TRITON_INTERPRET=0")):
        fn = mark(fn)
    return fn


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def attend_mask(B, Lq, Lk, causal, kpm, device="cpu"):
    """(B, 1, Lq, Lk) bool: key j visible to query i (bottom-right causal, key padding)."""
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        mask = mask & (j <= i + (Lk - Lq))
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    return mask


def reference(q, k, v, kpm, scale, causal, keep=None, p=0.0, dtype=torch.float64):
    """-> (o (B, Lq, H, D), lse (B, H, Lq)) in `dtype`; differentiable, NaN-free for empty rows."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    mask = attend_mask(B, Lq, Lk, causal, kpm, q.device)  # (B, 1, Lq, Lk)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # (B, H, Lq, Lk)
    s = s.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)  # (B, 1, Lq, 1)
    lse = torch.logsumexp(s, -1)  # -inf for empty rows; the kernels write +inf there
    lse = torch.where(has_key[..., 0], lse, torch.full_like(lse, float("inf")))
    P = torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), -1) * mask
    if keep is not None:
        P = P * keep.to(dtype) / (1.0 - p)
    o = torch.einsum("bhij,bjhd->bihd", P, v)
    return o, lse


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def rng(seed, offset, device="cpu"):
    """The dropout state the launchers take: int64 [seed, offset] on the inputs' device."""
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def strided(x):
    """Same values, non-contiguous b/l/h strides (a slice of a packed (B, L, 3, H, D) tensor)."""
    B, L, H, D = x.shape
    packed = torch.randn(B, L, 3, H, D, dtype=x.dtype, device=x.device)
    packed[:, :, 1] = x
    return packed[:, :, 1]


def check_close(out, ref64, same_dtype_ref, what, floor):
    """|out - ref| <= 2 * |torch same-dtype - ref| + floor, elementwise max; NaN never passes."""
    assert not torch.isnan(out).any(), f"{what}: NaN"
    err = (out.double() - ref64).abs().max().item()
    torch_err = (same_dtype_ref.double() - ref64).abs().max().item()
    assert err <= 2 * torch_err + floor, f"{what}: err {err:.3g} > 2 * torch {torch_err:.3g} + {floor}"


FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, Lq, Lk, H, D, causal, key padding, dtype): non-power-of-two lengths, Lq != Lk both ways
# (causal Lq > Lk leaves the first Lq - Lk rows with no key), padded head dims (40 -> 64).
FWD_CASES = [
    (2, 7, 13, 2, 16, False, False, torch.float32),
    (2, 7, 13, 1, 40, True, True, torch.float16),
    (1, 13, 7, 2, 64, True, False, torch.float32),
    (2, 20, 33, 2, 40, False, True, torch.float32),
    (2, 33, 20, 1, 16, True, True, torch.float16),
    (1, 1, 17, 2, 64, True, False, torch.float16),
    (2, 40, 40, 2, 16, True, False, torch.float32),
    (1, 20, 37, 2, 16, True, False, torch.float32),  # several key and query tiles around the diagonal
    (1, 37, 25, 1, 16, True, False, torch.float16),
]
BWD_CASES = FWD_CASES[:5] + FWD_CASES[-2:]


def make_inputs(B, Lq, Lk, H, D, kpm, dtype, device="cpu"):
    q = strided(rand(B, Lq, H, D, dtype=dtype, device=device))
    k = rand(B, Lk, H, D, dtype=dtype, device=device)
    v = strided(rand(B, Lk, H, D, dtype=dtype, device=device))
    mask = None
    if kpm:
        mask = torch.rand(B, Lk, device=device) > 0.3
        mask[-1] = False  # a batch row with every key padded: its o is 0, lse +inf
    return q, k, v, mask


# ----------------------------------------------------------------------------------------------
# CPU (interpreter) tests
# ----------------------------------------------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("B,Lq,Lk,H,D,causal,kpm,dtype", FWD_CASES)
def test_fwd_matches_reference(B, Lq, Lk, H, D, causal, kpm, dtype):
    torch.manual_seed(1)
    q, k, v, mask = make_inputs(B, Lq, Lk, H, D, kpm, dtype)
    scale = D ** -0.5
    o, lse = A.attention_fwd(q, k, v, mask, scale, causal, 0.0, None)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    ro, rlse = reference(q, k, v, mask, scale, causal)
    so, _ = reference(q, k, v, mask, scale, causal, dtype=torch.float32 if dtype == torch.float32 else dtype)
    check_close(o, ro, so, "o", FLOOR[dtype])
    empty = torch.isinf(rlse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all()
    assert torch.allclose(lse[~empty].double(), rlse[~empty], atol=1e-4, rtol=1e-5)
    assert (o.transpose(1, 2)[empty] == 0).all()


@cpu_only
@pytest.mark.parametrize("B,Lq,Lk,H,D,causal,kpm,dtype", BWD_CASES)
def test_bwd_matches_autograd(B, Lq, Lk, H, D, causal, kpm, dtype):
    torch.manual_seed(2)
    q, k, v, mask = make_inputs(B, Lq, Lk, H, D, kpm, dtype)
    scale = D ** -0.5
    o, lse = A.attention_fwd(q, k, v, mask, scale, causal, 0.0, None)
    do = strided(rand(B, Lq, H, D, dtype=dtype))
    dq, dk, dv = A.attention_bwd(do, q, k, v, o, lse, mask, scale, causal, 0.0, None, True)
    for ref_dtype in (torch.float64, torch.float32 if dtype == torch.float32 else dtype):
        qr, kr, vr = (t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v))
        ro, _ = reference(qr, kr, vr, mask, scale, causal, dtype=ref_dtype)
        ro.backward(do.to(ref_dtype))
        if ref_dtype == torch.float64:
            g64 = (qr.grad, kr.grad, vr.grad)
        else:
            gsame = (qr.grad, kr.grad, vr.grad)
    for name, g, r, s in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gsame):
        assert g.dtype == dtype
        check_close(g, r, s, name, 2 * FLOOR[dtype])
    # deterministic: a second run is bitwise identical
    again = A.attention_bwd(do, q, k, v, o, lse, mask, scale, causal, 0.0, None, True)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), again))


@cpu_only
def test_dropout_mask_is_triton_randint():
    """The torch philox equals tl.randint(seed, int64 c) (the spec of kernels/philox.py), hi words included."""
    @triton.jit
    def randint_kernel(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        c = base + offs.to(tl.int64)
        r = tl.randint(seed, c)
        tl.store(out_ptr + offs, (r.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0),
                 mask=offs < n)

    seed, offset = (7 << 32) + 12345, (3 << 32) - 50  # counters cross a 2**32 boundary
    u = A.dropout_uniform(rng(seed, offset), 1, 1, 1, 128, "cpu").flatten()
    out = torch.empty(128)
    randint_kernel[(1,)](out, seed, offset, 128, BLOCK=128)
    assert torch.equal(out, u)
    keep = A.dropout_keep_mask(rng(seed, offset), 1, 1, 1, 128, "cpu", 0.3).flatten()
    assert torch.equal(keep, u >= 0.3)
    assert ((u >= 0) & (u < 1)).all()


@cpu_only
@pytest.mark.parametrize("causal,kpm,dtype", [(False, True, torch.float32), (True, False, torch.float16)])
def test_dropout_fwd_matches_masked_reference(causal, kpm, dtype):
    torch.manual_seed(3)
    B, Lq, Lk, H, D, p = 2, 9, 21, 2, 40, 0.3
    q, k, v, mask = make_inputs(B, Lq, Lk, H, D, kpm, dtype)
    scale = D ** -0.5
    seed, offset = 2 ** 40 + 99, 12345
    o1, lse1 = A.attention_fwd(q, k, v, mask, scale, causal, p, rng(seed, offset))
    o2, lse2 = A.attention_fwd(q, k, v, mask, scale, causal, p, rng(seed, offset))
    o3, _ = A.attention_fwd(q, k, v, mask, scale, causal, p, rng(seed + 1, offset))
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)
    assert not torch.equal(o1, o3)
    keep = A.dropout_keep_mask(rng(seed, offset), B, H, Lq, Lk, "cpu", p)
    ro, rlse = reference(q, k, v, mask, scale, causal, keep=keep, p=p)
    so, _ = reference(q, k, v, mask, scale, causal, keep=keep, p=p,
                      dtype=torch.float32 if dtype == torch.float32 else dtype)
    check_close(o1, ro, so, "o", FLOOR[dtype])
    _, lse_nodrop = A.attention_fwd(q, k, v, mask, scale, causal, 0.0, None)
    assert torch.equal(lse1, lse_nodrop)  # lse is of the undropped scores


@cpu_only
def test_dropout_mean_over_seeds_approaches_no_dropout():
    torch.manual_seed(4)
    B, Lq, Lk, H, D, p, n = 1, 16, 16, 1, 16, 0.5, 48
    q, k, v, _ = make_inputs(B, Lq, Lk, H, D, False, torch.float32)
    outs = torch.stack([A.attention_fwd(q, k, v, None, 0.5, False, p, rng(s, 0))[0] for s in range(n)])
    ref, _ = A.attention_fwd(q, k, v, None, 0.5, False, 0.0, None)
    sigma = outs.std(0) / math.sqrt(n)
    assert ((outs.mean(0) - ref).abs() <= 5 * sigma + 1e-5).all()


@cpu_only
def test_dropout_bwd_matches_autograd_and_finite_difference():
    torch.manual_seed(5)
    B, Lq, Lk, H, D, p, causal = 1, 11, 18, 2, 16, 0.25, True
    q, k, v, mask = make_inputs(B, Lq, Lk, H, D, True, torch.float32)
    mask[-1] = torch.rand(Lk) > 0.3  # keep some keys in the only batch row
    scale, seed, offset = 0.3, 2024, 777
    st = rng(seed, offset)
    o, lse = A.attention_fwd(q, k, v, mask, scale, causal, p, st)
    do = rand(B, Lq, H, D)
    dq, dk, dv = A.attention_bwd(do, q, k, v, o, lse, mask, scale, causal, p, st, False)
    keep = A.dropout_keep_mask(st, B, H, Lq, Lk, "cpu", p)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = reference(qr, kr, vr, mask, scale, causal, keep=keep, p=p)
    ro.backward(do.double())
    for name, g, r in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert torch.allclose(g.double(), r, atol=1e-4, rtol=1e-4), name
    # finite difference of the seeded Triton forward along one random direction per input
    eps = 1e-2
    for x, g in ((q, dq), (k, dk), (v, dv)):
        dirn = torch.randn_like(x)
        x_c = x.contiguous()
        plus = [t if t is not x else (x_c + eps * dirn) for t in (q, k, v)]
        minus = [t if t is not x else (x_c - eps * dirn) for t in (q, k, v)]
        fp = (A.attention_fwd(*plus, mask, scale, causal, p, st)[0].double() * do).sum()
        fm = (A.attention_fwd(*minus, mask, scale, causal, p, st)[0].double() * do).sum()
        fd = ((fp - fm) / (2 * eps)).item()
        an = (g.double() * dirn).sum().item()
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), (fd, an)


def kvcache_reference(q, k_cache, v_cache, lens, scale, causal):
    """Per batch row: q attends keys 0..lens[b]-1 of the (already written) cache."""
    outs = []
    for b in range(q.shape[0]):
        L = int(lens[b])
        o, _ = reference(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], None, scale, causal)
        outs.append(o)
    return torch.cat(outs)


@cpu_only
@pytest.mark.parametrize("Lq,with_new,causal,D,dtype,num_splits", [
    (1, True, True, 40, torch.float32, None),
    (3, True, True, 64, torch.float16, 3),
    (3, True, False, 16, torch.float32, 1),
    (2, False, True, 16, torch.float32, 4),
    (1, False, False, 40, torch.float16, None),
])
def test_kvcache(Lq, with_new, causal, D, dtype, num_splits):
    torch.manual_seed(6)
    B, H, Lmax = 3, 2, 40
    lens = torch.tensor([5, 30, 0 if not with_new else 17], dtype=torch.int32)
    if not with_new:
        lens[1] = 37
    q = strided(rand(B, Lq, H, D, dtype=dtype))
    k_cache = strided(rand(B, Lmax, H, D, dtype=dtype))
    v_cache = rand(B, Lmax, H, D, dtype=dtype)
    k_new = strided(rand(B, Lq, H, D, dtype=dtype)) if with_new else None
    v_new = rand(B, Lq, H, D, dtype=dtype) if with_new else None
    k_before, v_before = k_cache.clone(), v_cache.clone()
    scale = D ** -0.5
    o = A.attention_with_kvcache(q, k_cache, v_cache, lens, k_new, v_new, scale, causal,
                                 num_splits=num_splits)
    k_expect, v_expect = k_before.clone(), v_before.clone()
    if with_new:
        for b in range(B):
            s = int(lens[b])
            k_expect[b, s:s + Lq] = k_new[b]
            v_expect[b, s:s + Lq] = v_new[b]
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)  # bitwise, all else untouched
    total = lens + (Lq if with_new else 0)
    ro = kvcache_reference(q, k_cache, v_cache, total, scale, causal)
    so = kvcache_reference(q, k_cache, v_cache, total, scale, causal) if dtype == torch.float32 else \
        torch.cat([reference(q[b:b + 1], k_cache[b:b + 1, :int(total[b])], v_cache[b:b + 1, :int(total[b])],
                             None, scale, causal, dtype=dtype)[0] for b in range(B)])
    assert o.shape == q.shape and o.dtype == dtype
    check_close(o, ro, so, "o", FLOOR[dtype])
    for b in range(B):
        if int(total[b]) == 0:
            assert (o[b] == 0).all()  # no key at all: a zero row, not NaN


@cpu_only
def test_unsupported_reason():
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 5, 2, 16)
    assert A.unsupported_reason(q, k, k, False, None, 0.0) is None
    assert "head dim" in A.unsupported_reason(torch.randn(1, 4, 2, 12), torch.randn(1, 5, 2, 12),
                                              torch.randn(1, 5, 2, 12), False, None, 0.0)
    assert "k.dtype" in A.unsupported_reason(q, k.half(), k, False, None, 0.0)
    assert "key_padding_mask" in A.unsupported_reason(q, k, k, False, torch.ones(1, 4, dtype=torch.bool), 0.0)
    assert "dropout_p" in A.unsupported_reason(q, k, k, False, None, 1.0)
    assert "stride" in A.unsupported_reason(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, k,
                                            False, None, 0.0)
    assert A.kvcache_unsupported_reason(q, torch.randn(1, 40, 2, 16)) is None
    assert "q.dtype" in A.kvcache_unsupported_reason(q.double(), torch.randn(1, 40, 2, 16).double())


# ----------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------
def _gpu_check(B, Lq, Lk, H, D, causal, kpm, dtype, bwd):
    torch.manual_seed(10)
    q, k, v, mask = make_inputs(B, Lq, Lk, H, D, kpm, dtype, device="cuda")
    scale = D ** -0.5
    o, lse = A.attention_fwd(q, k, v, mask, scale, causal, 0.0, None)
    do = rand(B, Lq, H, D, dtype=dtype, device="cuda")
    if bwd:
        grads = A.attention_bwd(do, q, k, v, o, lse, mask, scale, causal, 0.0, None, True)
    # references per batch row in fp32 (oracle) and in dtype (torch's own error)
    for b in range(B):
        sl = slice(b, b + 1)
        mb = None if mask is None else mask[sl]
        ins32 = [t[sl].detach().float().requires_grad_() for t in (q, k, v)]
        insd = [t[sl].detach().clone().requires_grad_() for t in (q, k, v)]
        r32, _ = reference(*ins32, mb, scale, causal, dtype=torch.float32)
        rd, _ = reference(*insd, mb, scale, causal, dtype=dtype)
        check_close(o[sl], r32.double(), rd, f"o[{b}]", FLOOR[dtype])
        if bwd:
            r32.backward(do[sl].float())
            rd.backward(do[sl])
            for name, g, t32, td in zip(("dq", "dk", "dv"), grads, ins32, insd):
                check_close(g[sl], t32.grad.double(), td.grad, f"{name}[{b}]", 2 * FLOOR[dtype])


@gpu_test
@pytest.mark.parametrize("D", [8, 40, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_head_dims(D, dtype, causal):
    _gpu_check(2, 1000, 1537, 2, D, causal, True, dtype, bwd=True)


@gpu_test
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long(D, dtype):
    _gpu_check(8, 4096, 4096, 2, D, True, False, dtype, bwd=True)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq,with_new", [(1, True), (4, True), (1, False)])
def test_gpu_kvcache_long(dtype, Lq, with_new):
    torch.manual_seed(11)
    B, H, D, Lmax = 4, 8, 128, 32768
    lens = torch.tensor([1, 1000, 20000, Lmax - Lq], dtype=torch.int32, device="cuda")
    q = rand(B, Lq, H, D, dtype=dtype, device="cuda")
    k_cache = rand(B, Lmax, H, D, dtype=dtype, device="cuda")
    v_cache = rand(B, Lmax, H, D, dtype=dtype, device="cuda")
    k_new = rand(B, Lq, H, D, dtype=dtype, device="cuda") if with_new else None
    v_new = rand(B, Lq, H, D, dtype=dtype, device="cuda") if with_new else None
    k_before = k_cache.clone()
    o = A.attention_with_kvcache(q, k_cache, v_cache, lens, k_new, v_new, D ** -0.5, True)
    total = (lens + (Lq if with_new else 0)).cpu()
    for b in range(B):
        L = int(total[b])
        if with_new:
            s = int(lens[b])
            assert torch.equal(k_cache[b, s:s + Lq], k_new[b])
            assert torch.equal(k_cache[b, :s], k_before[b, :s])
            assert torch.equal(k_cache[b, s + Lq:], k_before[b, s + Lq:])
        r32, _ = reference(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], None, D ** -0.5, True,
                           dtype=torch.float32)
        rd, _ = reference(q[b:b + 1], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], None, D ** -0.5, True, dtype=dtype)
        check_close(o[b:b + 1], r32.double(), rd, f"o[{b}]", FLOOR[dtype])


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dropout(dtype):
    torch.manual_seed(12)
    B, L, H, D, p = 2, 256, 4, 64, 0.2
    q, k, v, _ = make_inputs(B, L, L, H, D, False, dtype, device="cuda")
    st = rng(2 ** 35 + 3, 2 ** 33, "cuda")
    o, lse = A.attention_fwd(q, k, v, None, D ** -0.5, True, p, st)
    keep = A.dropout_keep_mask(st, B, H, L, L, "cuda", p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel())
    r32, _ = reference(q, k, v, None, D ** -0.5, True, keep=keep, p=p, dtype=torch.float32)
    rd, _ = reference(q, k, v, None, D ** -0.5, True, keep=keep, p=p, dtype=dtype)
    check_close(o, r32.double(), rd, "o", FLOOR[dtype])
    do = torch.randn_like(o)
    dq, dk, dv = A.attention_bwd(do, q, k, v, o, lse, None, D ** -0.5, True, p, st, False)
    ins32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    insd = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    reference(*ins32, None, D ** -0.5, True, keep=keep, p=p, dtype=torch.float32)[0].backward(do.float())
    reference(*insd, None, D ** -0.5, True, keep=keep, p=p, dtype=dtype)[0].backward(do)
    for name, g, t32, td in zip(("dq", "dk", "dv"), (dq, dk, dv), ins32, insd):
        check_close(g, t32.grad.double(), td.grad, name, 2 * FLOOR[dtype])


@gpu_test
def test_gpu_kvcache_cuda_graph():
    """The decode step captures in a CUDA graph; replays follow new device lengths (no host sync)."""
    torch.manual_seed(13)
    B, H, D, Lmax, Lq, dtype = 2, 4, 64, 4096, 1, torch.float16
    q = rand(B, Lq, H, D, dtype=dtype, device="cuda")
    k_new = rand(B, Lq, H, D, dtype=dtype, device="cuda")
    v_new = rand(B, Lq, H, D, dtype=dtype, device="cuda")
    kc = rand(B, Lmax, H, D, dtype=dtype, device="cuda")
    vc = rand(B, Lmax, H, D, dtype=dtype, device="cuda")
    lens = torch.tensor([100, 2000], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        A.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, k_new, v_new, D ** -0.5, True)
    torch.cuda.current_stream().wait_stream(side)
    kc_g, vc_g = kc.clone(), vc.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = A.attention_with_kvcache(q, kc_g, vc_g, lens, k_new, v_new, D ** -0.5, True)
    lens.copy_(torch.tensor([500, 3000], dtype=torch.int32))
    graph.replay()
    kc_e, vc_e = kc.clone(), vc.clone()
    eager = A.attention_with_kvcache(q, kc_e, vc_e, lens, k_new, v_new, D ** -0.5, True)
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(kc_g, kc_e) and torch.equal(vc_g, vc_e)
