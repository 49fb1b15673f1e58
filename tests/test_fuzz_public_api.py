"""Randomized differential tests of the public API (fl.layer_norm, fl.attention,
fl.attention_with_kvcache, fl.linear, fl.nn) against independent float64 references written here
from the documented semantics (README "Semantics", DESIGN.md "Numerics").

Each case draws its shape/config from a seeded generator. The reference is a plain torch
composition run in float64; the same composition run at the case's dtype gives "PyTorch's own
error", and a backend passes when its error is <= 2x that + a small floor (relative to the
reference's magnitude). The "torch" backend runs hundreds of cases (fp64/fp32/fp16/bf16), the
"triton" backend (CPU interpreter without a GPU) dozens of tiny ones (fp32/fp16).
Also: error handling (argument named in the message), torch.compile(fullgraph) and opcheck.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers.kernels.philox import dropout_keep_mask

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton needs a GPU or TRITON_INTERPRET=1")

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES_TORCH = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES_TRITON = [torch.float32, torch.float16]
# FASTLAYERS_TEST_SEED shifts every seed (fresh cases), FASTLAYERS_FUZZ_MULT multiplies the case counts.
_SEED = int(os.environ.get("FASTLAYERS_TEST_SEED", "0"))
_MULT = int(os.environ.get("FASTLAYERS_FUZZ_MULT", "1"))


def _rngs(seed):
    return random.Random(seed + 7919 * _SEED), torch.Generator().manual_seed(seed + 104729 * _SEED)


def _close(name, out, ref64, low, dtype, extra_floor=0.0, abs_extra=0.0):
    """out (backend), ref64 (fp64 reference), low (torch composition at `dtype`) -> assert."""
    if ref64 is None:
        assert out is None or (out == 0).all(), name
        return
    assert out is not None, f"{name}: missing"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64 = out.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: NaN"
    if out64.numel() == 0:
        return
    err = (out64 - ref64).abs().max().item()
    terr = (low.detach().double().cpu() - ref64).abs().nan_to_num(0.0).max().item() if low is not None else 0.0
    scale = max(1.0, ref64.abs().max().item())
    tol = 2 * terr + (FLOOR[dtype] + extra_floor) * scale + abs_extra
    assert err <= tol, f"{name}: err {err:.3e} > tol {tol:.3e} (torch's own {terr:.3e}, |ref| {scale:.2e})"


def _tensor(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _base_shape(shape, layout):
    """Shape of the leaf tensor behind a `layout` view of `shape` (expanded: a size-1 dim -2)."""
    if layout == "expanded" and len(shape) >= 2:
        return (*shape[:-2], 1, shape[-1])
    return tuple(shape)


def _view(t, shape, layout):
    """A differentiable view of the leaf t with `shape` and a chosen memory layout."""
    if t is None or layout == "contig":
        return t
    if layout == "strided":  # last dim contiguous, row stride > cols (a padded buffer)
        return F.pad(t, (1, 2))[..., 1:1 + shape[-1]]
    if layout == "transposed" and len(shape) >= 2:  # last dim NOT contiguous
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and len(shape) >= 2:  # row stride 0
        return t.expand(shape)
    return t


def _leaf(t, rg):
    return t.detach().clone().requires_grad_(rg) if t is not None else None


def _grads(ts):
    return [t.grad if (t is not None and t.requires_grad) else None for t in ts]


# ====================================================================================== layer norm
def _ln_compose(x, w, b, res, dres, dy, eps, rms, xv, rv, round_to=None):
    """Torch composition at x's dtype on views xv(x), rv(res): (y, s, grads of (x, w, b, res)).
    round_to: round the residual sum to that dtype first (the documented forward)."""
    leaves = [_leaf(t, True) for t in (x, w, b, res)]
    xl, wl, bl, rl = leaves
    s = xv(xl) + rv(rl) if rl is not None else xv(xl)
    if round_to is not None and rl is not None:
        s = s + (s.detach().to(round_to).to(s.dtype) - s.detach())  # rounded value, identity gradient
    n = s.shape[-1]
    if rms:
        y = F.rms_norm(s, (n,), wl, eps)
        if bl is not None:
            y = y + bl
    else:
        y = F.layer_norm(s, (n,), wl, bl, eps)
    loss = (y * dy).sum() + ((s * dres).sum() if rl is not None else 0)
    loss.backward()
    return y, (s if rl is not None else None), _grads(leaves)


def _ln_case(rng, gen, dtype, small):
    nd = rng.choice([1, 2, 2, 3, 4])
    cols = rng.choice([1, 2, 3, 7, 8, 16, 33, 64, 100] if small else [1, 2, 3, 5, 8, 17, 31, 64, 127, 256, 1000])
    lead = [rng.choice([0, 1]) if rng.random() < 0.1 else rng.randint(1, 4 if small else 6) for _ in range(nd - 1)]
    shape = (*lead, cols)
    layout = rng.choice(["contig", "contig", "strided", "transposed", "expanded"])
    has_w, has_b, has_r = rng.random() < 0.7, rng.random() < 0.5, rng.random() < 0.5
    x = _tensor(_base_shape(shape, layout), dtype, gen)
    if rng.random() < 0.2:
        x = (x.double() + 3.0).to(dtype)  # a mean offset (cancellation in the variance)
    return dict(
        x=x, w=_tensor((cols,), dtype, gen) if has_w else None, b=_tensor((cols,), dtype, gen) if has_b else None,
        r=_tensor(shape, dtype, gen) if has_r else None, dy=_tensor(shape, dtype, gen),
        dres=_tensor(shape, dtype, gen), eps=rng.choice([1e-5, 1e-6, 1e-12, 0.1, 1.0]), rms=rng.random() < 0.5,
        grad=rng.random() < 0.7, gmask=[rng.random() < 0.8 for _ in range(4)], shape=shape, layout=layout, rlayout=rng.choice(["contig", "strided"]),
        desc=(shape, layout, has_w, has_b, has_r))


def _ln_check(c, dtype, backend):
    x, w, b, r, dy, dres, eps, rms = (c[k] for k in ("x", "w", "b", "r", "dy", "dres", "eps", "rms"))
    xv = lambda t: _view(t, c["shape"], c["layout"])  # noqa: E731
    rv = lambda t: _view(t, c["shape"], c["rlayout"])  # noqa: E731
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    desc = (*c["desc"], rms, eps, c["grad"], backend)
    y64, s64, g64 = _ln_compose(d64(x), d64(w), d64(b), d64(r), dres.double(), dy.double(), eps, rms, xv, rv,
                                round_to=dtype)
    ylow, _, glow = _ln_compose(x, w, b, r, dres, dy, eps, rms, xv, rv)
    gmask = c["gmask"]
    ins = [_leaf(t, c["grad"] and g) for t, g in zip((x, w, b, r), gmask)]
    out = fl.layer_norm(xv(ins[0]), ins[1], ins[2], eps, residual=rv(ins[3]), rms=rms, backend=backend)
    if r is not None:
        y, s = out
        assert s.dtype == dtype and s.shape == c["shape"]
        # the sum is x + r rounded to the dtype: bitwise equal to the rounded fp64 sum
        assert torch.equal(s.detach().cpu(), s64.detach().to(dtype).cpu()), desc
    else:
        y, s = out, None
    assert y.dtype == dtype and y.shape == c["shape"], desc
    _close(f"y {desc}", y, y64, ylow, dtype)
    if y.requires_grad:
        loss = (y.double() * dy.double()).sum() + ((s.double() * dres.double()).sum() if s is not None else 0)
        loss.backward()
        # tiny eps on near-constant rows: rstd up to 1/sqrt(eps) amplifies fp64 rounding too
        ex = FLOOR[dtype] * 10 if eps < 1e-8 else 0.0
        for name, got, ref, low, g in zip(("dx", "dw", "db", "dres"), _grads(ins), g64, glow, gmask):
            if g:
                _close(f"{name} {desc}", got, ref, low, dtype, extra_floor=ex)


@pytest.mark.parametrize("dtype", DTYPES_TORCH)
def test_layer_norm_fuzz_torch(dtype):
    rng, gen = _rngs(1000 + DTYPES_TORCH.index(dtype))
    for _ in range(60 * _MULT):
        _ln_check(_ln_case(rng, gen, dtype, False), dtype, "torch")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES_TRITON)
def test_layer_norm_fuzz_triton(dtype):
    rng, gen = _rngs(2000 + DTYPES_TRITON.index(dtype))
    for _ in range(20 * _MULT):
        _ln_check(_ln_case(rng, gen, dtype, True), dtype, "triton")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_norm_modules_fuzz(dtype):
    rng, gen = _rngs(3000)
    for _ in range(30):
        rms = rng.random() < 0.5
        nshape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3)))
        affine, bias = rng.random() < 0.7, rng.random() < 0.6
        eps = rng.choice([1e-5, 0.1]) if (not rms or rng.random() < 0.5) else None
        kw = dict(elementwise_affine=affine, dtype=torch.float64, device=DEV)
        if rms:
            ref, ours = torch.nn.RMSNorm(nshape, eps=eps, **kw), fl.nn.RMSNorm(nshape, eps=eps, **kw)
        else:
            ref, ours = (torch.nn.LayerNorm(nshape, eps=eps, bias=bias, **kw),
                         fl.nn.LayerNorm(nshape, eps=eps, bias=bias, **kw))
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        ours.load_state_dict(ref.state_dict())
        assert list(ours.state_dict()) == list(ref.state_dict())
        x = _tensor((rng.randint(1, 3), rng.randint(1, 4), *nshape), torch.float64, gen)
        dy = _tensor(x.shape, torch.float64, gen)
        xr, xo = _leaf(x, True), _leaf(x.to(dtype), True)
        yr = ref(xr)
        (yr * dy).sum().backward()
        low = ref.to(dtype)
        ylow = low(x.to(dtype))
        ours = ours.to(dtype)
        yo = ours(xo)
        (yo.double() * dy).sum().backward()
        desc = (rms, nshape, affine, bias, eps)
        _close(f"y {desc}", yo, yr, ylow, dtype)
        _close(f"dx {desc}", xo.grad, xr.grad, None, dtype, extra_floor=FLOOR[dtype] * 20)
        for (n, p), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
            _close(f"d{n} {desc}", p.grad, pr.grad, None, dtype, extra_floor=FLOOR[dtype] * 20)


# ====================================================================================== attention
def _attn_compose(q, k, v, causal, scale, mask, keep=None, p=0.0):
    """softmax(q k^T * scale) v with bottom-right causal, key padding, empty rows -> 0, at q's dtype."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if Lk == 0:  # no key at all: every row is empty -> zeros
        return q * 0
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale                            # (B, H, Lq, Lk)
    allowed = torch.ones((B, 1, Lq, Lk), dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        allowed = allowed & (j <= i + (Lk - Lq))
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m) * allowed
    den = e.sum(-1, keepdim=True)
    pr = e / torch.where(den == 0, torch.ones_like(den), den)
    if keep is not None:
        pr = pr * keep.to(pr.dtype) / (1.0 - p)
    return torch.einsum("bhqk,bkhd->bqhd", pr, v)


def _attn_case(rng, gen, dtype, small):
    B = rng.randint(1, 2 if small else 3)
    H = rng.randint(1, 2 if small else 3)
    Lq = rng.choice([1, 2, 5, 16, 17] if small else [1, 2, 3, 7, 16, 31, 40])
    Lk = rng.choice([1, Lq, 3, 18, 20] if small else [1, Lq, 2, 5, 17, 33, 64])
    packed = rng.random() < 0.4  # q, k, v as views into one (B, L, 3, H, D) buffer (Lq == Lk)
    if packed:
        Lk = Lq
    D = rng.choice([8, 16, 24] if small else [1, 3, 8, 16, 40, 64])
    causal = rng.random() < 0.5
    mask, mode = None, None
    if rng.random() < 0.5:
        mode = rng.choice(["rand", "all", "rows_empty"])
        mask = torch.rand((B, Lk), generator=gen) < 0.7
        if mode == "all":
            mask[:] = True
        elif mode == "rows_empty":
            mask[0] = False
        mask = mask.to(DEV)
        if rng.random() < 0.3:  # a strided view of a bigger mask (column stride 2)
            mask = torch.stack([mask, ~mask], -1).reshape(B, 2 * Lk)[:, ::2]
    scale = rng.choice([None, None, 0.05, 1.0, 2.5])
    q = _tensor((B, Lq, H, D), dtype, gen)
    k = _tensor((B, Lk, H, D), dtype, gen)
    v = _tensor((B, Lk, H, D), dtype, gen)
    do = _tensor((B, Lq, H, D), dtype, gen)
    p = rng.choice([0.0, 0.0, 0.0, 0.1, 0.5])
    return dict(q=q, k=k, v=v, do=do, causal=causal, mask=mask, scale=scale, packed=packed, p=p,
                grad=rng.random() < 0.7, gmask=[rng.random() < 0.8 for _ in range(3)],
                desc=(B, Lq, Lk, H, D, causal, mode, scale, packed, p))


def _attn_views(q, k, v, packed):
    if not packed:
        return q, k, v
    qkv = torch.stack([q, k, v], dim=2)                                               # (B, L, 3, H, D)
    return qkv.unbind(2)


def _rng_get():
    """torch's generator state of DEV (where the op draws its dropout rng_state)."""
    return torch.cuda.get_rng_state() if torch.device(DEV).type == "cuda" else torch.get_rng_state()


def _rng_set(state):
    (torch.cuda.set_rng_state if torch.device(DEV).type == "cuda" else torch.set_rng_state)(state)


def _attn_check(c, dtype, backend):
    q, k, v, do, causal, mask, p = (c[n] for n in ("q", "k", "v", "do", "causal", "mask", "p"))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = c["scale"] if c["scale"] is not None else 1.0 / math.sqrt(D)
    desc = (*c["desc"], backend)
    keep = None
    seed_state = _rng_get()
    if p > 0:  # the op draws its rng_state from torch's generator of q's device: replay that draw
        from fastlayers.ops.attention import _draw_rng_state
        keep = dropout_keep_mask(_draw_rng_state(q.device), B, H, Lq, Lk, DEV, p)
        _rng_set(seed_state)

    def run_ref(dt):
        ls = [_leaf(t.to(dt), True) for t in (q, k, v)]
        o = _attn_compose(*_attn_views(*ls, c["packed"]), causal, scale, mask, keep, p)
        (o * do.to(dt)).sum().backward()
        return o, _grads(ls)

    o64, g64 = run_ref(torch.float64)
    olow, glow = run_ref(dtype)
    gmask = c["gmask"]
    ins = [_leaf(t, c["grad"] and g) for t, g in zip((q, k, v), gmask)]
    o = fl.attention(*_attn_views(*ins, c["packed"]), causal=causal, softmax_scale=c["scale"],
                     key_padding_mask=mask, dropout_p=p, backend=backend)
    assert o.dtype == dtype and o.shape == q.shape
    _close(f"o {desc}", o, o64, olow, dtype)
    if p > 0:  # same torch seed => same output
        _rng_set(seed_state)
        o2 = fl.attention(*_attn_views(*[t.detach() for t in ins], c["packed"]), causal=causal,
                          softmax_scale=c["scale"], key_padding_mask=mask, dropout_p=p, backend=backend)
        assert torch.equal(o2, o.detach()), desc
    if o.requires_grad:
        (o.double() * do.double()).sum().backward()
        # The FlashAttention backward forms delta = rowsum(dO * O) from the forward's O (its error
        # and its rounding to the dtype), where the naive composition uses rowsum(P * dP): allow
        # twice that delta error's effect on dq (through |k|, sum_j P_ij <= 1/(1-p)) and dk (|q|).
        u = {torch.float64: 2**-53, torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
        o_err = (o.detach().double() - o64.detach()).abs() + u * o64.detach().abs()
        ddelta = scale * (do.double().abs() * o_err).sum(-1).max().item() / (1.0 - p) if o.numel() else 0.0
        extras = (2 * ddelta * k.double().abs().max().item() if k.numel() else 0.0,
                  2 * ddelta * q.double().abs().max().item() * max(1, Lq) if q.numel() else 0.0, 0.0)
        for name, got, ref, low, ex, g in zip(("dq", "dk", "dv"), _grads(ins), g64, glow, extras, gmask):
            if g:
                _close(f"{name} {desc}", got, ref, low, dtype, abs_extra=ex)
    # SDPA where its semantics coincide: no empty rows, no dropout
    if p == 0 and (mask is None or mask.any(1).all()) and (not causal or Lk >= Lq):
        allowed = torch.ones((B, 1, Lq, Lk), dtype=torch.bool, device=DEV)
        if causal:
            allowed = allowed & (torch.arange(Lk, device=DEV)[None, :] <= torch.arange(Lq, device=DEV)[:, None]
                                 + (Lk - Lq))
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        if allowed.any(-1).all():
            tr = lambda t: t.double().transpose(1, 2)  # noqa: E731
            sd = F.scaled_dot_product_attention(tr(q), tr(k), tr(v), attn_mask=allowed, scale=scale)
            _close(f"o vs sdpa {desc}", o, sd.transpose(1, 2), olow, dtype)


@pytest.mark.parametrize("dtype", DTYPES_TORCH)
def test_attention_fuzz_torch(dtype):
    rng, gen = _rngs(4000 + DTYPES_TORCH.index(dtype))
    for _ in range(50 * _MULT):
        _attn_check(_attn_case(rng, gen, dtype, False), dtype, "torch")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES_TRITON)
def test_attention_fuzz_triton(dtype):
    rng, gen = _rngs(5000 + DTYPES_TRITON.index(dtype))
    for _ in range(20 * _MULT):
        _attn_check(_attn_case(rng, gen, dtype, True), dtype, "triton")


def _kv_check(rng, gen, dtype, backend, small):
    B = rng.randint(1, 3)
    H = rng.randint(1, 2)
    D = rng.choice([8, 16] if small else [1, 4, 8, 32])
    Lq = rng.choice([1, 1, 2, 3, 5])
    Lmax = rng.choice([Lq, 8, 20, 33] if small else [Lq, 8, 20, 64, 70])
    with_new = rng.random() < 0.6
    causal = rng.random() < 0.5
    hi = Lmax - (Lq if with_new else 0)
    lens = [rng.choice([0, hi, rng.randint(0, hi)]) for _ in range(B)]
    scale = rng.choice([None, 0.3])
    kc, vc = _tensor((B, Lmax, H, D), dtype, gen), _tensor((B, Lmax, H, D), dtype, gen)
    q = _tensor((B, Lq, H, D), dtype, gen)
    kn = _tensor((B, Lq, H, D), dtype, gen) if with_new else None
    vn = _tensor((B, Lq, H, D), dtype, gen) if with_new else None
    if rng.random() < 0.3:  # q as a strided view (last dim contiguous)
        q = F.pad(q, (0, 8))[..., :D]
    kc0, vc0 = kc.clone(), vc.clone()
    cl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    o = fl.attention_with_kvcache(q, kc, vc, cl, kn, vn, causal=causal, softmax_scale=scale, backend=backend)
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    desc = (B, Lq, H, D, Lmax, lens, with_new, causal, scale, backend)
    assert o.shape == q.shape and o.dtype == dtype
    for b in range(B):
        n = lens[b]
        ek, ev = kc0[b].clone(), vc0[b].clone()
        if with_new:
            ek[n:n + Lq], ev[n:n + Lq] = kn[b], vn[b]
            n += Lq
        # the caches: the written rows hold k_new/v_new, every other row is unchanged (bitwise)
        assert torch.equal(kc[b], ek) and torch.equal(vc[b], ev), desc
        ref = _attn_compose(q[b:b + 1].double(), ek[None, :n].double(), ev[None, :n].double(), causal, sc, None)
        low = _attn_compose(q[b:b + 1], ek[None, :n], ev[None, :n], causal, sc, None)
        _close(f"o[{b}] {desc}", o[b:b + 1], ref, low, dtype)


@pytest.mark.parametrize("dtype", DTYPES_TORCH)
def test_kvcache_fuzz_torch(dtype):
    rng, gen = _rngs(6000 + DTYPES_TORCH.index(dtype))
    for _ in range(40 * _MULT):
        _kv_check(rng, gen, dtype, "torch", False)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES_TRITON)
def test_kvcache_fuzz_triton(dtype):
    rng, gen = _rngs(7000 + DTYPES_TRITON.index(dtype))
    for _ in range(12 * _MULT):
        _kv_check(rng, gen, dtype, "triton", True)


# ====================================================================================== linear
def _lin_compose(x, w, b, r, act, dy, xv, bv):
    ls = [_leaf(t, True) for t in (x, w, b, r)]
    z = F.linear(xv(ls[0]), ls[1], bv(ls[2]) if ls[2] is not None else None)
    y = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu,
         "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](z)
    if ls[3] is not None:
        y = y + ls[3]
    (y * dy).sum().backward()
    return y, _grads(ls)


def _lin_check(rng, gen, dtype, backend, small):
    lead = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.choice([0, 1, 1, 2]))]
    if rng.random() < 0.1:
        lead = [rng.choice([0, 1])]
    K = rng.choice([1, 3, 8, 17, 32] if small else [1, 2, 3, 7, 16, 33, 64, 100])
    N = rng.choice([1, 5, 8, 16, 19] if small else [1, 2, 5, 8, 31, 64, 130])
    act = rng.choice([None, "relu", "gelu", "gelu_tanh"])
    has_b, has_r = rng.random() < 0.6, rng.random() < 0.4
    layout = rng.choice(["contig", "contig", "strided", "transposed", "expanded"])
    shape = (*lead, K)
    x = _tensor(_base_shape(shape, layout), dtype, gen, scale=rng.choice([1.0, 1.0, 8.0]))
    if act == "gelu_tanh" and rng.random() < 0.4:
        x = (x.double() - 6.0).to(dtype)  # very negative pre-activations
    w = _tensor((N, K), dtype, gen, scale=1.0 / math.sqrt(K))
    # bias views (issue 8): stride 2, stride 0 (expanded), or contiguous
    b_layout = rng.choice(["contig", "contig", "stride2", "expanded"])
    b = _tensor({"contig": (N,), "stride2": (2 * N,), "expanded": (1,)}[b_layout], dtype, gen) if has_b else None
    bv = {"contig": lambda t: t, "stride2": lambda t: t[::2], "expanded": lambda t: t.expand(N)}[b_layout]
    r = _tensor((*lead, N), dtype, gen) if has_r else None
    dy = _tensor((*lead, N), dtype, gen)
    xv = lambda t: _view(t, shape, layout)  # noqa: E731
    grad_mask = [rng.random() < 0.6 for _ in range(4)]
    desc = (tuple(lead), K, N, act, has_b, b_layout, has_r, layout, grad_mask, backend)
    d64 = lambda t: t.double() if t is not None else None  # noqa: E731
    y64, g64 = _lin_compose(d64(x), d64(w), d64(b), d64(r), act, dy.double(), xv, bv)
    ylow, glow = _lin_compose(x, w, b, r, act, dy, xv, bv)
    ins = [_leaf(t, g) for t, g in zip((x, w, b, r), grad_mask)]
    y = fl.linear(xv(ins[0]), ins[1], bv(ins[2]) if ins[2] is not None else None, activation=act,
                  residual=ins[3], backend=backend)
    assert y.shape == (*lead, N) and y.dtype == dtype, desc
    # fp32 inputs may run TF32 dots (documented) -- only on a GPU, never under the interpreter
    ex = 2e-3 if (backend == "triton" and dtype == torch.float32 and HAS_CUDA) else 0.0
    _close(f"y {desc}", y, y64, ylow, dtype, extra_floor=ex)
    if y.requires_grad:
        (y.double() * dy.double()).sum().backward()
        for name, got, ref, low, g in zip(("dx", "dw", "db", "dres"), _grads(ins), g64, glow, grad_mask):
            if g:
                _close(f"{name} {desc}", got, ref, low, dtype, extra_floor=ex)


@pytest.mark.parametrize("dtype", DTYPES_TORCH)
def test_linear_fuzz_torch(dtype):
    rng, gen = _rngs(8000 + DTYPES_TORCH.index(dtype))
    for _ in range(60 * _MULT):
        _lin_check(rng, gen, dtype, "torch", False)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES_TRITON)
def test_linear_fuzz_triton(dtype):
    rng, gen = _rngs(9000 + DTYPES_TRITON.index(dtype))
    for _ in range(20 * _MULT):
        _lin_check(rng, gen, dtype, "triton", True)


# ====================================================================================== nn blocks
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_mlp_modules_fuzz(dtype):
    rng, gen = _rngs(10000)
    acts = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    for _ in range(10 * _MULT):
        E, I = rng.choice([1, 4, 9]), rng.choice([2, 16, 17])
        act, bias = rng.choice(list(acts)), rng.random() < 0.7
        lin = fl.nn.Linear(E, I, bias, act, dtype=dtype, device=DEV)
        ref = torch.nn.Linear(E, I, bias, dtype=dtype, device=DEV)
        assert list(lin.state_dict()) == list(ref.state_dict())
        lin.load_state_dict(ref.state_dict())
        x = _tensor((rng.randint(1, 3), rng.randint(1, 4), E), dtype, gen)
        res = _tensor((*x.shape[:-1], I), dtype, gen)
        _close("Linear", lin(x, res), acts[act](ref(x.double() if dtype == torch.float64 else x)) + res, None, dtype)
        mlp = fl.nn.MLP(E, I, act or "gelu", bias, dtype=dtype, device=DEV)
        f1, f2 = mlp.fc1, mlp.fc2
        want = F.linear(acts[act or "gelu"](F.linear(x, f1.weight, f1.bias)), f2.weight, f2.bias) + x
        _close("MLP", mlp(x, x), want, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mhsa_vs_torch_multihead_attention(dtype):
    rng, gen = _rngs(11000)
    for _ in range(12 * _MULT):
        H = rng.choice([1, 2, 4])
        E = H * rng.choice([1, 3, 8])
        B, L = rng.randint(1, 3), rng.randint(1, 9)
        causal, bias = rng.random() < 0.5, rng.random() < 0.7
        ours = fl.nn.MultiheadSelfAttention(E, H, bias=bias, causal=causal, dtype=dtype, device=DEV).eval()
        ref = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True, dtype=dtype, device=DEV).eval()
        with torch.no_grad():
            for p_ in ref.parameters():
                p_.copy_(torch.randn(p_.shape, generator=gen, dtype=torch.float64) * 0.5)
            ours.qkv_proj.weight.copy_(ref.in_proj_weight)        # [q; k; v] stacked in both
            ours.out_proj.weight.copy_(ref.out_proj.weight)
            if bias:
                ours.qkv_proj.bias.copy_(ref.in_proj_bias)
                ours.out_proj.bias.copy_(ref.out_proj.bias)
        x = _tensor((B, L, E), dtype, gen)
        kpm = None
        if rng.random() < 0.5:
            kpm = (torch.rand((B, L), generator=gen) < 0.7).to(DEV)
            kpm[:, -1] = True  # (torch gives NaN rows where everything is masked; ours gives 0)
        attn_mask = torch.ones((L, L), dtype=torch.bool, device=DEV).triu(1) if causal else None
        want, _ = ref(x, x, x, key_padding_mask=None if kpm is None else ~kpm, attn_mask=attn_mask,
                      need_weights=False)
        if causal and kpm is not None:  # rows whose every visible key is padded: ours gives 0 (+ bias)
            continue
        got = ours(x, key_padding_mask=kpm)
        _close(f"MHSA {(B, L, E, H, causal, bias)}", got, want, None, dtype, extra_floor=FLOOR[dtype] * 10)


# ====================================================================================== regressions
def test_linear_3d_input_runs_on_triton():
    """Selection looked at x's leading dims: a 3-D x made the triton backend 'unavailable'."""
    if not TRITON_OK:
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
    x, w = torch.randn(2, 3, 8, device=DEV), torch.randn(5, 8, device=DEV)
    y = fl.linear(x, w, backend="triton")
    assert fl.last_backend("linear") == "triton"
    torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_OK else []))
def test_linear_grad_of_residual_only(backend):
    """Only residual needing a gradient with an activation: no preact is saved, and the backward
    must not ask for it (it crashed with AttributeError / ValueError)."""
    x, w, b = torch.randn(2, 3, 8, device=DEV), torch.randn(5, 8, device=DEV), torch.randn(5, device=DEV)
    r = torch.randn(2, 3, 5, device=DEV, requires_grad=True)
    dy = torch.randn(2, 3, 5, device=DEV)
    y = fl.linear(x, w, b, activation="gelu", residual=r, backend=backend)
    (y * dy).sum().backward()
    assert torch.equal(r.grad, dy)


def test_attention_dropout_backward_fp64_precision():
    """The reference backward scaled by (bool mask / (1 - p)), a float32 tensor: fp64 gradients
    with dropout were only float32-accurate."""
    q, k, v, do = (torch.randn(1, 16, 1, 4, dtype=torch.float64) for _ in range(4))
    state = torch.get_rng_state()
    from fastlayers.ops.attention import _draw_rng_state
    keep = dropout_keep_mask(_draw_rng_state("cpu"), 1, 1, 16, 16, "cpu", 0.1)
    torch.set_rng_state(state)
    ls = [t.clone().requires_grad_() for t in (q, k, v)]
    (_attn_compose(*ls, False, 0.5, None, keep, 0.1) * do).sum().backward()
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    (fl.attention(*ins, softmax_scale=0.5, dropout_p=0.1, backend="torch") * do).sum().backward()
    for a, b in zip(ls, ins):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_module_default_eps_matches_torch(dtype):
    """eps=None: torch.nn.RMSNorm uses float32's eps for fp16/bf16 inputs (its compute dtype), not
    finfo(x.dtype).eps (bf16: 0.0078, which changed small-magnitude rows by 80%)."""
    x = (torch.randn(4, 2, device=DEV) * 0.01).to(dtype)
    ref = torch.nn.RMSNorm(2, device=DEV, dtype=dtype)
    ours = fl.nn.RMSNorm(2, device=DEV, dtype=dtype)
    torch.testing.assert_close(ours(x).float(), ref(x).float(), atol=2e-2, rtol=1e-2)


def test_linear_zero_in_features():
    """K = 0 (torch.nn.Linear(0, N) is legal): y = act(bias) + residual, not a reshape error."""
    x, w, b = torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    torch.testing.assert_close(fl.linear(x, w, b, activation="relu", backend="torch"), F.relu(b).expand(3, 4))


def test_kvcache_meta_tensors_give_shapes():
    q = torch.empty(2, 1, 2, 8, device="meta")
    kc = torch.empty(2, 10, 2, 8, device="meta")
    cl = torch.empty(2, dtype=torch.int32, device="meta")
    assert fl.attention_with_kvcache(q, kc, kc.clone(), cl, q, q).shape == q.shape


# ====================================================================================== torch.compile / opcheck
def _compile_cases():
    return ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("backend", _compile_cases())
def test_compile_fullgraph_all_ops_forward_backward(backend):
    """Each op under torch.compile(fullgraph=True, aot_eager), incl. backward, vs eager; with
    partial requires_grad (only residual / only bias) which eager and the custom op must agree on."""
    torch._dynamo.reset()
    rng, gen = _rngs(12000)
    dt = torch.float32
    for case in range(3):
        x = _tensor((2, 3, 16), dt, gen)
        w, b = _tensor((16,), dt, gen), _tensor((16,), dt, gen)
        r = _tensor((2, 3, 16), dt, gen)
        W, bb = _tensor((8, 16), dt, gen), _tensor((8,), dt, gen)
        q, k, v = (_tensor((1, 5, 2, 8), dt, gen) for _ in range(3))
        mask = torch.tensor([[True, False, True, True, False]], device=DEV)
        act = ["gelu", "gelu_tanh", None][case]
        grads_on = [(True, True, True, True), (False, False, False, True), (True, False, True, False)][case]

        def block(x, w, b, r, W, bb, q, k, v):
            y, s = fl.layer_norm(x, w, b, residual=r, rms=case == 1, backend=backend)
            z = fl.linear(y, W, bb, activation=act, residual=None, backend=backend)
            z2 = fl.linear(x, W, None, activation="relu", residual=z, backend=backend)
            o = fl.attention(q, k, v, causal=case == 0, key_padding_mask=mask, backend=backend)
            return z2.sum() + s.square().sum() + (o * o).sum()

        def run(f):
            leaves = [_leaf(t, g) for t, g in zip((x, w, b, r), grads_on)] + \
                     [_leaf(W, grads_on[0]), _leaf(bb, True)] + [_leaf(t, True) for t in (q, k, v)]
            out = f(*leaves)
            out.backward()
            return out, [t.grad for t in leaves]

        e_out, e_g = run(block)
        c_out, c_g = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
        torch.testing.assert_close(c_out, e_out, atol=1e-4, rtol=1e-4)
        for ge, gc in zip(e_g, c_g):
            assert (ge is None) == (gc is None)
            if ge is not None:
                torch.testing.assert_close(gc, ge, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", _compile_cases())
def test_opcheck_random_inputs(backend):
    rng, gen = _rngs(13000)
    dt = torch.float32
    ops = torch.ops.fastlayers
    for rms, has_r, has_b in ((False, True, True), (True, False, False)):
        x = _tensor((3, 2, 16), dt, gen)
        w = _tensor((16,), dt, gen)
        b = _tensor((16,), dt, gen) if has_b else None
        r = _tensor((3, 2, 16), dt, gen) if has_r else None
        torch.library.opcheck(ops.layer_norm_fwd.default, (x, w, b, r, 1e-5, rms, backend))
        y, ro, mean, rstd = ops.layer_norm_fwd(x, w, b, r, 1e-5, rms, backend)
        s = ro if has_r else x
        torch.library.opcheck(ops.layer_norm_bwd.default,
                              (_tensor(x.shape, dt, gen), s, w, mean, rstd, r, has_b, rms, backend))
    for act, res in ((None, True), ("gelu_tanh", False)):
        x, W, bb = _tensor((2, 3, 16), dt, gen), _tensor((5, 16), dt, gen), _tensor((5,), dt, gen)
        R = _tensor((2, 3, 5), dt, gen) if res else None
        torch.library.opcheck(ops.linear_fwd.default, (x, W, bb, R, act, act is not None, backend))
        _, pre = ops.linear_fwd(x, W, bb, R, act, act is not None, backend)
        torch.library.opcheck(ops.linear_bwd.default,
                              (_tensor((2, 3, 5), dt, gen), x, W, pre if act else None, act, True, backend))
    q, k, v = _tensor((2, 3, 2, 8), dt, gen), _tensor((2, 5, 2, 8), dt, gen), _tensor((2, 5, 2, 8), dt, gen)
    mask = torch.tensor([[True] * 5, [False, True, False, True, False]], device=DEV)
    rs = torch.tensor([12345, 0], dtype=torch.int64, device=DEV)  # dropout's rng_state [seed, offset]
    for p, state in ((0.0, None), (0.25, rs)):
        torch.library.opcheck(ops.attention_fwd.default, (q, k, v, mask, state, 0.3, True, p, False, backend))
        o, lse = ops.attention_fwd(q, k, v, mask, state, 0.3, True, p, False, backend)
        torch.library.opcheck(ops.attention_bwd.default,
                              (_tensor(q.shape, dt, gen), q, k, v, o, lse, mask, state, 0.3, True, p, False, backend))
    kc, vc = _tensor((2, 9, 2, 8), dt, gen), _tensor((2, 9, 2, 8), dt, gen)
    cl = torch.tensor([0, 6], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.attention_with_kvcache.default, (q, kc, vc, cl, k[:, :3], v[:, :3], 0.3, True, backend),
                          test_utils=("test_schema", "test_faketensor"))


# ====================================================================================== error handling
_x, _w, _b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
_q, _k = torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 8)
_kc = torch.randn(2, 10, 2, 8)
_L = torch.tensor([3, 9], dtype=torch.int32)
_X, _W = torch.randn(3, 8), torch.randn(5, 8)

BAD_CALLS = [
    ("x", TypeError, lambda: fl.layer_norm(_x.int(), None)),
    ("x", ValueError, lambda: fl.layer_norm(torch.tensor(1.0), None)),
    ("x", ValueError, lambda: fl.layer_norm(_x[:, :0], None)),
    ("weight", TypeError, lambda: fl.layer_norm(_x, _w.int())),
    ("weight", ValueError, lambda: fl.layer_norm(_x, _w[:7])),
    ("weight", TypeError, lambda: fl.layer_norm(_x, _w.half())),
    ("weight", TypeError, lambda: fl.layer_norm(_x, [1.0] * 8)),
    ("bias", ValueError, lambda: fl.layer_norm(_x, _w, _b[None])),
    ("residual", ValueError, lambda: fl.layer_norm(_x, _w, residual=_x[0])),
    ("eps", ValueError, lambda: fl.layer_norm(_x, _w, eps=-1e-5)),
    ("eps", ValueError, lambda: fl.layer_norm(_x, _w, eps=float("nan"))),
    ("rms", TypeError, lambda: fl.layer_norm(_x, _w, rms=1)),
    ("backend", ValueError, lambda: fl.layer_norm(_x, _w, backend="cudnn")),
    ("q", TypeError, lambda: fl.attention(_q.int(), _k.int(), _k.int())),
    ("q", ValueError, lambda: fl.attention(_q[0], _k[0], _k[0])),
    ("k", ValueError, lambda: fl.attention(_q, _k[:, :, :1], _k[:, :, :1])),
    ("k", TypeError, lambda: fl.attention(_q, _k.half(), _k)),
    ("v", ValueError, lambda: fl.attention(_q, _k, _k[:, :5])),
    ("key_padding_mask", TypeError, lambda: fl.attention(_q, _k, _k, key_padding_mask=torch.ones(2, 6))),
    ("key_padding_mask", ValueError,
     lambda: fl.attention(_q, _k, _k, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))),
    ("key_padding_mask", ValueError,
     lambda: fl.attention(_q, _k, _k, key_padding_mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))),
    ("dropout_p", ValueError, lambda: fl.attention(_q, _k, _k, dropout_p=1.0)),
    ("dropout_p", ValueError, lambda: fl.attention(_q, _k, _k, dropout_p=-0.1)),
    ("dropout_p", ValueError, lambda: fl.attention(_q, _k, _k, dropout_p=float("nan"))),
    ("softmax_scale", ValueError, lambda: fl.attention(_q, _k, _k, softmax_scale=float("inf"))),
    ("causal", TypeError, lambda: fl.attention(_q, _k, _k, causal=1)),
    ("backend", ValueError, lambda: fl.attention(_q, _k, _k, backend="flash")),
    ("k_cache", ValueError, lambda: fl.attention_with_kvcache(_q[:, :2], _kc, _kc.clone(), _L, _q[:, :2], _q[:, :2])),
    ("k_cache", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(),
                                                              torch.tensor([11, 0], dtype=torch.int32))),
    ("cache_seqlens", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(),
                                                                    torch.tensor([-1, 0], dtype=torch.int32))),
    ("cache_seqlens", TypeError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(), _L.long())),
    ("cache_seqlens", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(), _L[:1])),
    ("k_new", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(), _L, _q[:, :1])),
    ("k_new", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc.clone(), _L, _q, _q)),
    ("v_cache", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc, _kc[:, :9].clone(), _L)),
    ("k_cache", ValueError, lambda: fl.attention_with_kvcache(_q[:, :1], _kc.transpose(-1, -2).contiguous()
                                                              .transpose(-1, -2), _kc.clone(), _L)),
    ("activation", ValueError, lambda: fl.linear(_X, _W, activation="silu")),
    ("x", ValueError, lambda: fl.linear(_X, _W[:, :7])),
    ("x", TypeError, lambda: fl.linear(_X.int(), _W.int())),
    ("weight", ValueError, lambda: fl.linear(_X, _W[0])),
    ("weight", TypeError, lambda: fl.linear(_X, _W.double())),
    ("bias", ValueError, lambda: fl.linear(_X, _W, torch.randn(4))),
    ("residual", ValueError, lambda: fl.linear(_X, _W, residual=torch.randn(3, 4))),
    ("residual", TypeError, lambda: fl.linear(_X, _W, residual=torch.randn(3, 5).bfloat16())),
    ("backend", ValueError, lambda: fl.linear(_X, _W, backend="cublas")),
    ("activation", ValueError, lambda: fl.nn.Linear(4, 4, activation="tanh")),
    ("embed_dim", ValueError, lambda: fl.nn.MultiheadSelfAttention(6, 4)),
    ("x", ValueError, lambda: fl.nn.LayerNorm((3, 4))(torch.randn(2, 4, 3))),
]


@pytest.mark.parametrize("arg,exc,call", BAD_CALLS, ids=[f"{i}-{a}" for i, (a, _, _) in enumerate(BAD_CALLS)])
def test_bad_inputs_raise_naming_the_argument(arg, exc, call):
    with pytest.raises(exc, match=arg):
        call()


UNAVAILABLE = [
    lambda: fl.layer_norm(_x.double(), None, backend="triton"),
    lambda: fl.layer_norm(_x, None, backend="cuda") if not HAS_CUDA else (_ for _ in ()).throw(
        fl.BackendUnavailableError("skip")),
    lambda: fl.attention(_q[..., :4], _k[..., :4], _k[..., :4], backend="triton"),  # D not a multiple of 8
    lambda: fl.attention(_q.double(), _k.double(), _k.double(), backend="triton"),
    lambda: fl.attention_with_kvcache(_q[..., :4], _kc[..., :4].contiguous(), _kc[..., :4].contiguous(), _L,
                                      backend="triton"),
    lambda: fl.linear(_X.double(), _W.double(), backend="triton"),
    lambda: fl.linear(_X[:, :0], _W[:, :0], backend="triton"),
    lambda: fl.linear(_X.to("meta"), _W.to("meta"), backend="triton"),
]


@pytest.mark.parametrize("i", range(len(UNAVAILABLE)))
def test_explicit_backend_that_cannot_run_raises(i):
    with pytest.raises(fl.BackendUnavailableError):
        UNAVAILABLE[i]()
    with fl.use_backend("triton"), pytest.raises(fl.BackendUnavailableError):
        fl.linear(_X.double(), _W.double())


def test_compile_dynamic_shapes_fullgraph():
    """Backend resolution took shapes as assume_constant_result arguments: with dynamic (symbolic)
    sizes -- dynamic=True, or a recompile after the sequence length changed -- fullgraph tracing failed
    ("assume_constant_result argument conversion failed"). Now every op traces and runs per length."""
    torch._dynamo.reset()

    def block(x, w, W, q, k, v, kc, vc, lens):
        y = fl.layer_norm(x, w, None)
        z = fl.linear(y, W, None, activation="gelu")
        o = fl.attention(q, k, v, causal=True)
        q1, k1, v1 = (t[:, :1].detach() for t in (q, k, v))  # the decode step is forward only
        o2 = fl.attention_with_kvcache(q1, kc, vc, lens, k1, v1)
        return z.sum() + o.sum() + o2.sum()

    f = torch.compile(block, dynamic=True, fullgraph=True, backend="aot_eager")
    for L in (3, 5):
        x, w, W = torch.randn(2, L, 16), torch.randn(16), torch.randn(8, 16)
        q, k, v = (torch.randn(1, L, 2, 8, requires_grad=True) for _ in range(3))
        kc, vc = torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
        lens = torch.tensor([L], dtype=torch.int32)
        want = block(x, w, W, q, k, v, kc.clone(), vc.clone(), lens)
        got = f(x, w, W, q, k, v, kc, vc, lens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        got.backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
