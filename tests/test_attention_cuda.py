"""CUDA backend of attention (csrc/attention/, pytorch_ext/cuda_ops/attention.py), tested at the launchers.

CPU tests: the built library exports the attention entry points of _cuda.SIGNATURES with the argument
counts of fastlayers.h, and fl_build_info() publishes the head dims the launchers read.
GPU tests (marker gpu; skipped without CUDA or without the library): forward / backward against an
fp32 torch reference with the tolerance "<= 2x PyTorch's own error at the same dtype" (tests/helpers),
every claimed head dim, Lq != Lk (both ways), tails that are not tile multiples (1, 7, 67, 129, 257),
bottom-right causal, key padding with a fully masked row, the dropout mask against the torch
re-implementation of the philox spec, a deterministic backward that is bitwise equal run to run, and
the KV-cache decode path (split-KV and not) with the caches untouched outside the written rows.
"""
import ctypes
import math
import re
from pathlib import Path

import pytest
import torch

from fastlayers import _cuda
from helpers import assert_close_rule

DTYPES = (torch.float16, torch.bfloat16)
ATTN_SYMBOLS = [n for n in _cuda.SIGNATURES if n.startswith("fl_attention")]
HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastlayers.h"


# ------------------------------------------------------------------------------------------ CPU
def _built_lib():
    path = _cuda.library_path()
    if not path.exists():
        pytest.skip(f"{path} is not built")
    return ctypes.CDLL(str(path))


def test_library_exports_attention_symbols():
    lib = _built_lib()
    assert ATTN_SYMBOLS == ["fl_attention_fwd", "fl_attention_bwd_workspace_size", "fl_attention_bwd",
                            "fl_attention_kvcache_workspace_size", "fl_attention_kvcache_fwd", "fl_attention_grid"]
    missing = [n for n in ATTN_SYMBOLS if not hasattr(lib, n)]
    assert not missing, f"{_cuda.library_path()} lacks {missing}"


def _ctype_of(decl: str):
    decl = decl.strip()
    if decl.startswith("size_t*") or decl.startswith("size_t *"):
        return _cuda.c_size_p
    if "*" in decl:
        return _cuda.c_ptr
    for prefix, ct in (("int64_t", _cuda.c_i64), ("int32_t", _cuda.c_i32), ("uint64_t", _cuda.c_u64),
                       ("float", _cuda.c_f32), ("size_t", ctypes.c_size_t)):
        if decl.startswith(prefix):
            return ct
    raise AssertionError(f"unexpected C parameter {decl!r}")


def test_signature_table_matches_header():
    # The ctypes table and the C declarations must agree argument by argument (a shifted argument
    # would pass a stride as a pointer without any error at call time).
    text = HEADER.read_text()
    for name in ATTN_SYMBOLS:
        m = re.search(r"\b" + name + r"\s*\(([^;]*)\)\s*;", text)
        assert m, f"{name} is not declared in {HEADER}"
        params = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S).split(",")
        want = [_ctype_of(a) for a in params if a.strip()]
        got = _cuda.SIGNATURES[name][1]
        assert len(want) == len(got), f"{name}: header has {len(want)} arguments, SIGNATURES has {len(got)}"
        for i, (w, g) in enumerate(zip(want, got)):
            assert w == g, f"{name}: argument {i} is {w.__name__} in the header, {g.__name__} in SIGNATURES"


def test_build_info_lists_head_dims():
    _built_lib()
    dims = _cuda.build_info().get("attention_head_dims")
    assert isinstance(dims, list) and {32, 64, 96, 128} <= set(dims), dims
    from fastlayers.cuda_ops import attention
    assert attention.supported_head_dims() == tuple(dims)


def test_bwd_workspace_size():
    _built_lib()
    det = _cuda.workspace_size("fl_attention_bwd_workspace_size", 2, 3, 4, 64, 1)
    nondet = _cuda.workspace_size("fl_attention_bwd_workspace_size", 2, 3, 4, 64, 0)
    assert det >= 2 * 3 * 4 * 4 and nondet >= det + 2 * 3 * 4 * 64 * 4


# ------------------------------------------------------------------------------------------ GPU
def _ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    err = _cuda.load_error()
    if err is not None:
        pytest.skip(err)
    from fastlayers.cuda_ops import attention
    return attention


def _rng(seed, offset):
    """The dropout state the launchers take: device int64 [seed, offset] (read by the kernels)."""
    return torch.tensor([seed, offset], dtype=torch.int64, device="cuda")


def _keep_mask(seed, offset, B, H, Lq, Lk, device, p):
    """keep (B, H, Lq, Lk) from kernels/philox.py, the torch implementation of the spec."""
    from fastlayers.kernels.philox import dropout_keep_mask
    return dropout_keep_mask(_rng(seed, offset), B, H, Lq, Lk, device, p)


def _philox_keep(seed, offset, B, H, Lq, Lk, device, p):
    """Own torch re-implementation of the philox4x32-10 spec (kernels/philox.py) (int64 arithmetic, masked)."""
    M = 0xFFFFFFFF
    c = torch.arange(B * H * Lq * Lk, dtype=torch.int64, device=device).view(B, H, Lq, Lk) + offset
    c0, c1 = c & M, (c >> 32) & M
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & M, (seed >> 32) & M
    for _ in range(10):
        pa, pb = c0 * 0xD2511F53, c2 * 0xCD9E8D57  # wraps mod 2^64: the halves are still exact
        c0, c1, c2, c3 = ((pb >> 32) & M) ^ c1 ^ k0, pb & M, ((pa >> 32) & M) ^ c3 ^ k1, pa & M
        k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
    u = (c0 >> 8).to(torch.float32) * 2.0 ** -24
    return u >= torch.tensor(p, dtype=torch.float32, device=device)


def _reference(q, k, v, kpm, scale, causal, keep=None, p=0.0, dtype=torch.float32):
    """o (B, Lq, H, D), lse (B, H, Lq) with the math in `dtype` (softmax always in fp32)."""
    Lq, Lk = q.shape[1], k.shape[1]
    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    s = (qh @ kh.transpose(-1, -2)).float() * scale  # (B, H, Lq, Lk)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        allowed = j <= i + (Lk - Lq)
    allowed = allowed[None, None].expand(s.shape)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    s = s.masked_fill(~allowed, -1e30)  # finite: a fully masked row stays NaN-free in the backward
    any_key = allowed.any(-1, keepdim=True)
    lse = torch.where(any_key[..., 0], torch.logsumexp(s, -1), torch.full_like(s[..., 0], math.inf))
    pr = torch.where(any_key, torch.softmax(s, -1), torch.zeros_like(s))
    if keep is not None:
        pr = pr * keep / (1.0 - p)
    o = (pr.to(dtype) @ vh).transpose(1, 2)  # (B, Lq, H, D)
    return o, lse


def _inputs(B, Lq, Lk, H, D, dtype, requires_grad=False):
    q = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype)  # (B, Lq, H, D)
    k = torch.randn(B, Lk, H, D, device="cuda", dtype=dtype)  # (B, Lk, H, D)
    v = torch.randn(B, Lk, H, D, device="cuda", dtype=dtype)  # (B, Lk, H, D)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _padding_mask(B, Lk, fully_masked_batch=None):
    kpm = torch.rand(B, Lk, device="cuda") > 0.3  # (B, Lk) True = attend
    kpm[:, 0] = True
    if fully_masked_batch is not None:
        kpm[fully_masked_batch] = False
    return kpm


FWD_CASES = [  # (B, Lq, Lk, H) -- tails of every tile size, Lq > Lk and Lq < Lk, single rows
    (2, 128, 128, 3), (1, 1, 67, 2), (2, 67, 1, 2), (1, 7, 257, 2), (2, 129, 64, 1), (1, 257, 129, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", FWD_CASES)
def test_fwd_matches_reference(dtype, D, causal, shape):
    ops = _ops()
    B, Lq, Lk, H = shape
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    scale = D ** -0.5
    o, lse = ops.attention_fwd(q, k, v, None, scale, causal, 0.0, None)
    o_ref, lse_ref = _reference(q, k, v, None, scale, causal)
    o_same, _ = _reference(q, k, v, None, scale, causal, dtype=dtype)
    assert_close_rule(o, o_ref, o_same, what="o")
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[~fin] == math.inf).all(), "lse of keyless rows"
    assert_close_rule(lse[fin], lse_ref[fin], floor=1e-4, what="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_padding_mask_and_strides(dtype, causal):
    ops = _ops()
    B, Lq, Lk, H, D = 3, 70, 90, 2, 64
    # q as a strided view of a packed (B, L, 3, H, D) qkv buffer: (b, l, h) strides pass through.
    qkv = torch.randn(B, Lq, 3, H, D, device="cuda", dtype=dtype)
    q = qkv[:, :, 0]  # (B, Lq, H, D), non-contiguous
    _, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    kpm = _padding_mask(B, Lk, fully_masked_batch=1)
    o, lse = ops.attention_fwd(q, k, v, kpm, 0.125, causal, 0.0, None)
    o_ref, lse_ref = _reference(q, k, v, kpm, 0.125, causal)
    o_same, _ = _reference(q, k, v, kpm, 0.125, causal, dtype=dtype)
    assert_close_rule(o, o_ref, o_same, what="o")
    assert (o[1] == 0).all() and (lse[1] == math.inf).all(), "fully masked batch: o = 0, lse = +inf"
    fin = torch.isfinite(lse_ref)
    assert_close_rule(lse[fin], lse_ref[fin], floor=1e-4, what="lse")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_matches_spec(dtype):
    # One-hot V (Lk == D) makes o[b, i, h, j] = P_ij * keep_ij / (1 - p): the mask reads off o exactly.
    ops = _ops()
    B, Lq, H, D = 2, 77, 3, 64
    Lk = D
    q, k, _ = _inputs(B, Lq, Lk, H, D, dtype)
    v = torch.eye(D, device="cuda", dtype=dtype)[None, :, None, :].expand(B, Lk, H, D).contiguous()
    p, seed, offset = 0.3, 0x1234_5678_9ABC, 12345
    o, _ = ops.attention_fwd(q, k, v, None, D ** -0.5, False, p, _rng(seed, offset))
    kept = (o != 0).permute(0, 2, 1, 3)  # (B, H, Lq, Lk)
    keep = _keep_mask(seed, offset, B, H, Lq, Lk, q.device, p)
    assert torch.equal(kept, keep)
    assert torch.equal(keep, _philox_keep(seed, offset, B, H, Lq, Lk, q.device, p))
    o_ref, _ = _reference(q, k, v, None, D ** -0.5, False, keep=keep, p=p)
    o_same, _ = _reference(q, k, v, None, D ** -0.5, False, keep=keep, p=p, dtype=dtype)
    assert_close_rule(o, o_ref, o_same, what="o with dropout")


def _grads(q, k, v, kpm, scale, causal, do, keep=None, p=0.0, dtype=torch.float32):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o, _ = _reference(qq, kk, vv, kpm, scale, causal, keep=keep, p=p, dtype=dtype)
    o.backward(do.to(dtype))
    return qq.grad, kk.grad, vv.grad


BWD_CASES = [(2, 128, 128, 2), (1, 67, 131, 2), (2, 131, 67, 1), (1, 1, 65, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", BWD_CASES)
def test_bwd_matches_reference(dtype, D, causal, deterministic, shape):
    ops = _ops()
    B, Lq, Lk, H = shape
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    scale = D ** -0.5
    o, lse = ops.attention_fwd(q, k, v, None, scale, causal, 0.0, None)
    do = torch.randn_like(o)  # (B, Lq, H, D)
    grads = ops.attention_bwd(do, q, k, v, o, lse, None, scale, causal, 0.0, None, deterministic)
    refs = _grads(q, k, v, None, scale, causal, do)
    sames = _grads(q, k, v, None, scale, causal, do, dtype=dtype)
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, refs, sames):
        assert_close_rule(g, r, s, what=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_padding_dropout(dtype, deterministic):
    ops = _ops()
    B, Lq, Lk, H, D = 3, 90, 70, 2, 64
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    kpm = _padding_mask(B, Lk, fully_masked_batch=2)
    p, seed, offset = 0.2, 987654321, 77
    o, lse = ops.attention_fwd(q, k, v, kpm, 0.1, True, p, _rng(seed, offset))
    do = torch.randn_like(o)
    grads = ops.attention_bwd(do, q, k, v, o, lse, kpm, 0.1, True, p, _rng(seed, offset), deterministic)
    keep = _keep_mask(seed, offset, B, H, Lq, Lk, q.device, p)
    refs = _grads(q, k, v, kpm, 0.1, True, do, keep=keep, p=p)
    sames = _grads(q, k, v, kpm, 0.1, True, do, keep=keep, p=p, dtype=dtype)
    for name, g, r, s in zip(("dq", "dk", "dv"), grads, refs, sames):
        assert_close_rule(g, r, s, what=name)
    assert (grads[0][2] == 0).all(), "rows with no key give zero dq"
    assert (grads[1][2] == 0).all() and (grads[2][2] == 0).all(), "keys nobody attends give zero dk, dv"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_deterministic_is_bitwise_reproducible(dtype):
    ops = _ops()
    B, Lq, Lk, H, D = 2, 300, 200, 4, 64
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    o, lse = ops.attention_fwd(q, k, v, None, 0.125, False, 0.1, _rng(3, 0))
    do = torch.randn_like(o)
    first = ops.attention_bwd(do, q, k, v, o, lse, None, 0.125, False, 0.1, _rng(3, 0), True)
    second = ops.attention_bwd(do, q, k, v, o, lse, None, 0.125, False, 0.1, _rng(3, 0), True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


KV_CASES = [  # (B, Lq, Lmax, H, D, with_new)
    (2, 1, 4097, 2, 128, True),   # one query over a long cache: split-KV + combine
    (3, 1, 300, 4, 64, False),
    (2, 5, 130, 2, 96, True),     # a block of new queries, causal within it
    (1, 1, 64, 1, 32, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", KV_CASES)
def test_kvcache_matches_reference(dtype, causal, case):
    ops = _ops()
    B, Lq, Lmax, H, D, with_new = case
    q = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype)  # (B, Lq, H, D)
    k_cache = torch.randn(B, Lmax, H, D, device="cuda", dtype=dtype)  # (B, Lmax, H, D)
    v_cache = torch.randn(B, Lmax, H, D, device="cuda", dtype=dtype)
    new = Lq if with_new else 0
    seqlens = torch.randint(1, Lmax - new + 1, (B,), device="cuda", dtype=torch.int32)  # (B,)
    seqlens[0] = Lmax - new  # one batch at the very end of its cache
    k_new = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype) if with_new else None
    v_new = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype) if with_new else None
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for b in range(B):
        if with_new:
            n = int(seqlens[b])
            k_expect[b, n:n + Lq] = k_new[b]
            v_expect[b, n:n + Lq] = v_new[b]
    scale = D ** -0.5
    o = ops.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new, v_new, scale, causal)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect), "cache rows outside the step"
    for b in range(B):
        n = int(seqlens[b]) + new
        args = (q[b:b + 1], k_expect[b:b + 1, :n], v_expect[b:b + 1, :n], None, scale, causal)
        o_ref, _ = _reference(*args)
        o_same, _ = _reference(*args, dtype=dtype)
        assert_close_rule(o[b:b + 1], o_ref, o_same, what=f"o[{b}]")


@pytest.mark.gpu
def test_unsupported_reason():
    ops = _ops()
    q = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.float16)
    assert ops.unsupported_reason(q, q, q, False, None, 0.0) is None
    bad = torch.randn(1, 4, 2, 48, device="cuda", dtype=torch.float16)
    assert "head dim" in ops.unsupported_reason(bad, bad, bad, False, None, 0.0)
    f32 = q.float()
    assert "float16" in ops.unsupported_reason(f32, f32, f32, False, None, 0.0)
    assert ops.kvcache_unsupported_reason(q, q) is None


# ------------------------------------------------------------------ Hopper wgmma/TMA forward
# FASTLAYERS_CUDA_ATTENTION picks the forward kernel (auto | mma | wgmma); "wgmma" runs
# csrc/attention/attention_fwd_sm90.cu or raises, so these tests prove which kernel they measured.
def test_forward_impl_env(monkeypatch):
    from fastlayers.cuda_ops import attention
    monkeypatch.delenv(attention.IMPL_ENV, raising=False)
    assert attention.forward_impl() == 1  # default "mma" until the wgmma kernel is GPU-verified
    for name, code in (("auto", 0), ("mma", 1), ("WGMMA", 2)):
        monkeypatch.setenv(attention.IMPL_ENV, name)
        assert attention.forward_impl() == code
    monkeypatch.setenv(attention.IMPL_ENV, "fa3")
    with pytest.raises(ValueError, match="FASTLAYERS_CUDA_ATTENTION"):
        attention.forward_impl()


def _hopper_ops():
    ops = _ops()
    if "wgmma" not in _cuda.build_info().get("attention_fwd_impls", []):
        pytest.skip("the library was built without sm_90a")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma forward needs an sm_90 device")
    return ops


def _check_fwd(o, lse, q, k, v, kpm, scale, causal, dtype):
    o_ref, lse_ref = _reference(q, k, v, kpm, scale, causal)
    o_same, _ = _reference(q, k, v, kpm, scale, causal, dtype=dtype)
    assert_close_rule(o, o_ref, o_same, what="o")
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[~fin] == math.inf).all(), "lse of keyless rows"
    assert (o.float().permute(0, 2, 1, 3)[~fin] == 0).all(), "o of keyless rows"
    assert_close_rule(lse[fin], lse_ref[fin], floor=1e-4, what="lse")


WGMMA_CASES = [  # (B, Lq, Lk, H): one tile, tails of the 128-row / 128-key tiles, Lq > Lk, Lq < Lk
    (2, 128, 128, 3), (1, 1, 67, 2), (2, 67, 1, 2), (1, 7, 257, 2), (2, 129, 64, 1), (1, 257, 129, 2),
    (1, 300, 520, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", WGMMA_CASES)
def test_fwd_wgmma_matches_reference(monkeypatch, dtype, D, causal, shape):
    ops = _hopper_ops()
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "wgmma")
    B, Lq, Lk, H = shape
    q, k, v = _inputs(B, Lq, Lk, H, D, dtype)
    o, lse = ops.attention_fwd(q, k, v, None, D ** -0.5, causal, 0.0, None)
    _check_fwd(o, lse, q, k, v, None, D ** -0.5, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_wgmma_strides_and_auto_padding(monkeypatch, dtype, D, causal):
    ops = _hopper_ops()
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "wgmma")
    B, Lq, Lk, H = 3, 150, 200, 2
    qkv = torch.randn(B, Lq, 3, H, D, device="cuda", dtype=dtype)
    q = qkv[:, :, 0]  # (B, Lq, H, D) view of a packed qkv buffer
    k = torch.randn(B, H, Lk, D, device="cuda", dtype=dtype).transpose(1, 2)  # (B, Lk, H, D), h stride > l stride
    v = torch.randn(B, Lk, H, D, device="cuda", dtype=dtype)  # (B, Lk, H, D)
    o, lse = ops.attention_fwd(q, k, v, None, 0.1, causal, 0.0, None)
    _check_fwd(o, lse, q, k, v, None, 0.1, causal, dtype)
    # key_padding_mask: TMA would copy masked V rows (NaN there would poison P V): auto runs mma
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "auto")
    kpm = _padding_mask(B, Lk, fully_masked_batch=1)  # batch 1: every row attends no key
    o, lse = ops.attention_fwd(q, k, v, kpm, 0.1, causal, 0.0, None)
    assert (lse[1] == math.inf).all() and (o[1] == 0).all()
    _check_fwd(o, lse, q, k, v, kpm, 0.1, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_wgmma_agrees_with_mma(monkeypatch, dtype):
    ops = _hopper_ops()
    q, k, v = _inputs(2, 333, 333, 4, 128, dtype)
    out = {}
    for impl in ("mma", "wgmma", "auto"):
        monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", impl)
        out[impl] = ops.attention_fwd(q, k, v, None, 0.09, True, 0.0, None)
    assert torch.equal(out["auto"][0], out["wgmma"][0]), "auto must pick the wgmma kernel on sm_90"
    atol = 1e-2 if dtype == torch.float16 else 4e-2  # two kernels, different P roundings
    torch.testing.assert_close(out["wgmma"][0], out["mma"][0], atol=atol, rtol=0)
    torch.testing.assert_close(out["wgmma"][1], out["mma"][1], atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_fwd_wgmma_explicit_unsupported_raises(monkeypatch):
    ops = _ops()  # any GPU: off sm_90 (or without sm_90a code) every explicit "wgmma" case raises
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "wgmma")
    q, k, v = _inputs(1, 64, 64, 2, 64, torch.float16)
    with pytest.raises(RuntimeError, match="wgmma"):
        ops.attention_fwd(q, k, v, None, 0.125, False, 0.1, _rng(0, 0))  # dropout runs the mma kernel only
    q32, k32, v32 = _inputs(1, 64, 64, 2, 32, torch.float16)
    with pytest.raises(RuntimeError, match="wgmma"):
        ops.attention_fwd(q32, k32, v32, None, 0.125, False, 0.0, None)
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "auto")  # auto runs both on the mma kernel
    o, _ = ops.attention_fwd(q, k, v, None, 0.125, False, 0.1, _rng(0, 0))
    assert torch.isfinite(o.float()).all()
    kpm = torch.ones(1, 64, dtype=torch.bool, device="cuda")
    monkeypatch.setenv("FASTLAYERS_CUDA_ATTENTION", "wgmma")  # key_padding_mask runs the mma kernel only
    with pytest.raises(RuntimeError, match="wgmma"):  # on sm_90 the reason names key_padding_mask
        ops.attention_fwd(q, k, v, kpm, 0.125, False, 0.0, None)
