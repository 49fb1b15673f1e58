"""fl.attention_with_kvcache(..., cache_leftpad=...) (issue 10): left-padded prompt batches.

Semantics under test (every backend): row b attends cache slots [cache_leftpad[b], cache_seqlens[b]
+ Lq_new); new k / v are written at the absolute slots cache_seqlens[b] ..; with causal=True query i
attends slots j with cache_leftpad[b] <= j <= cache_seqlens[b] + Lq_new - Lq + i. Slots of the left
padding (and past the row's length) hold NaN / inf here and must never matter. A row whose window is
empty gets zeros; a bad row (cache_leftpad[b] < 0 or > cache_seqlens[b] + Lq_new) gets NaN rows and
no write where no host check runs, and a ValueError where one does (CPU tensors).
Expected values: tests/helpers.attention_f64 on each row's own window of the clean caches, float64.
Paths: the reference, the torch backend's host path (its three variants) and device path, the
Triton kernels (interpreter on CPU; forced split counts, so splits with no key run), the custom op
under torch.compile(fullgraph=True); GPU (marker gpu): Triton compiled, the CUDA library and the
torch device path on CUDA tensors, fp16, tile-crossing windows, CUDA-graph replay.
(No GQA: k_cache must have q's head count, fl.attention_with_kvcache has no grouped heads.)
"""
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers import _cuda
from fastlayers.ops import attention as A
from backends_matrix import kernel_backend_cases
from conftest import HAS_CUDA, INTERPRET
from helpers import assert_close_rule, attention_f64

POISON = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38)
FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TRITON_CPU = [pytest.param(c.values[0], marks=c.marks, id="triton-interp")
              for c in kernel_backend_cases() if c.values[1] == "cpu"]


# ----------------------------------------------------------------------------------------------- cases
def _rows(B, Lmax, n_new, tile=16):
    """(lens, pads) per row, drawn from the test's seed: pad 0; a pad inside the window; pad == len
    + n_new (empty window); a pad past the first key tile (the key loop must start at its tile);
    then random rows."""
    rnd = random.Random(torch.randint(0, 2**31, ()).item())
    top = Lmax - n_new                                  # the longest valid cache_seqlens
    lens, pads = [], []
    for b in range(B):
        kind = b if b < 4 else rnd.randrange(4)
        if kind == 3 and top + n_new > tile + 1:
            n = rnd.randint(max(0, tile + 2 - n_new), top)
            p = rnd.randint(tile + 1, n + n_new)
        else:
            n = rnd.randint(min(3, top), top)
            p = (0, rnd.randint(1, n + n_new) if n + n_new else 0, n + n_new, 0)[kind]
        lens.append(n)
        pads.append(p)
    return lens, pads


def _poison(t, hide):
    """t (B, L, H, D) with the slots where hide (B, L) is True holding NaN / inf / overflowing values."""
    t = t.clone()
    b, j = hide.nonzero(as_tuple=True)
    vals = torch.tensor(POISON, dtype=t.dtype, device=t.device)[torch.arange(b.numel(), device=t.device) % len(POISON)]
    t[b, j] = vals[:, None, None].expand(-1, *t.shape[2:])
    return t


def _make(causal, B, Lmax, H, D, Lq, with_new, dtype=torch.float32, device="cpu", lens=None, pads=None,
          poison=True):
    """Inputs with the slots outside each row's window [pad, len) poisoned (the slots the step writes
    too), and the float64 expectation: output and caches after the step."""
    n_new = Lq if with_new else 0
    if lens is None:
        lens, pads = _rows(B, Lmax, n_new)
    kc, vc = (torch.randn(B, Lmax, H, D, dtype=dtype, device=device) for _ in range(2))
    q, kn, vn = (torch.randn(B, Lq, H, D, dtype=dtype, device=device) for _ in range(3))
    if not with_new:
        kn = vn = None
    j = torch.arange(Lmax)[None, :]
    lens_t, pads_t = (torch.tensor(x, dtype=torch.int32) for x in (lens, pads))
    # What this step may find there: slots before the pad, and from the length before the append on
    hide = ((j < pads_t[:, None]) | (j >= lens_t[:, None])).to(device)
    if poison:
        kc_p, vc_p = _poison(kc, hide), _poison(vc, hide)
    else:  # finite garbage: the host path may then run one masked SDPA
        kc_p, vc_p = (torch.where(hide[:, :, None, None], torch.randn_like(t) * 50, t) for t in (kc, vc))
    expect = torch.zeros(q.shape, dtype=torch.float64, device=device)
    kc_e, vc_e = kc_p.clone(), vc_p.clone()
    for b, (n, p) in enumerate(zip(lens, pads)):
        ek, ev = kc[b].clone(), vc[b].clone()
        if with_new and 0 <= n and n + n_new <= Lmax:
            ek[n:n + n_new], ev[n:n + n_new] = kn[b], vn[b]
            kc_e[b, n:n + n_new], vc_e[b, n:n + n_new] = kn[b], vn[b]
        end = n + n_new
        if 0 <= p <= end:  # a good row: its own window, bottom-right causal against its last slot
            expect[b:b + 1] = attention_f64(q[b:b + 1], ek[None, p:end], ev[None, p:end], causal=causal,
                                            scale=0.3)
    return dict(q=q, kc=kc_p, vc=vc_p, lens=lens_t.to(device), pads=pads_t.to(device), kn=kn, vn=vn,
                expect=expect, kc_e=kc_e, vc_e=vc_e, lens_l=lens, pads_l=pads)


def _run(path, c, causal, num_splits=None):
    """One decode step through `path` on copies of the caches -> (o, k_cache, v_cache)."""
    kc, vc = c["kc"].clone(), c["vc"].clone()
    args = (c["q"], kc, vc, c["lens"], c["kn"], c["vn"])
    with torch.no_grad():
        if path == "ref":
            o = A.attention_with_kvcache_ref(*args, 0.3, causal, c["pads"])
        elif path == "torch_device":  # the no-host-read composition CUDA tensors run
            o = A._kvcache_torch_device(*args, 0.3, causal, c["pads"])
        elif path == "triton_launcher":
            from fastlayers.kernels import attention as TA
            o = TA.attention_with_kvcache(*args, 0.3, causal, cache_leftpad=c["pads"], num_splits=num_splits)
        elif path.endswith("_compiled"):
            torch._dynamo.reset()
            backend = path.split("_")[0]
            f = torch.compile(lambda q, kc, vc, lens, kn, vn, pads: fl.attention_with_kvcache(
                q, kc, vc, lens, kn, vn, cache_leftpad=pads, causal=causal, softmax_scale=0.3, backend=backend),
                fullgraph=True, backend="aot_eager")
            o = f(*args, c["pads"])
        else:
            o = fl.attention_with_kvcache(*args, cache_leftpad=c["pads"], causal=causal, softmax_scale=0.3,
                                          backend=path)
            assert fl.last_backend("attention_with_kvcache") == path
    return o, kc, vc


def _check(o, kc, vc, c, floor=1e-5):
    assert_close_rule(o, c["expect"], None, factor=0, floor=floor)
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, c["vc_e"], rtol=0, atol=0, equal_nan=True)


STEPS = [(1, True), (3, True), (1, False), (3, False)]  # (Lq, with k_new): Lq_new = 0 without k_new
STEP_IDS = ["new1", "new3", "q1-nonew", "q3-nonew"]


# ----------------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Lq,with_new", STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("path", ["ref", "torch", "torch_device"] + TRITON_CPU)
def test_leftpad_matches_float64_windows(path, Lq, with_new, causal):
    """Random lengths and left padding per row (0, inside, == length: empty, past the first key
    tile), NaN / inf in every slot outside the windows: output = float64 attention over each row's
    window; the caches change exactly at the new rows."""
    c = _make(causal, 6, 40, 2, 16, Lq, with_new)
    assert c["pads_l"][0] == 0 and c["pads_l"][2] == c["lens_l"][2] + (Lq if with_new else 0)
    o, kc, vc = _run(path, c, causal)
    _check(o, kc, vc, c)
    assert (o[2] == 0).all(), "an empty window gives zeros"


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_leftpad_triton_split_kv(num_splits):
    """Forced split counts: the splits divide each row's own key tiles from its pad's tile, so short
    windows leave splits with no key (lse -inf), which the combine must weigh 0 (never NaN)."""
    if not TRITON_CPU:
        pytest.skip("no Triton interpreter here")
    c = _make(True, 5, 40, 2, 16, 2, True)
    o, kc, vc = _run("triton_launcher", c, True, num_splits=num_splits)
    _check(o, kc, vc, c)


@pytest.mark.parametrize("poison,calls", [(False, 1), (True, None)], ids=["masked-sdpa", "per-row"])
def test_torch_host_path_variants(poison, calls):
    """The CPU host path: one masked SDPA over the slots some row needs when the unused slots in
    that window are finite, one SDPA per good row when they are not; both exact."""
    c = _make(True, 4, 24, 2, 8, 2, True, poison=poison)
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        o, kc, vc = _run("torch", c, True)
    _check(o, kc, vc, c)
    if calls is None:  # one per row with a key (an empty window needs no SDPA)
        calls = sum(n + 2 > p for n, p in zip(c["lens_l"], c["pads_l"]))
        assert calls >= 2
    assert sdpa.call_count == calls


@pytest.mark.parametrize("pad", [0, 3, 7], ids=["pad0", "pad3", "pad-all"])
@pytest.mark.parametrize("path", ["torch", "torch_device"] + TRITON_CPU)
def test_leftpad_equal_rows(path, pad):
    """Every row with the same length and padding (the host path slices the caches once); pad-all:
    no key at all, zero rows."""
    B, Lmax, Lq = 3, 12, 2
    n = 7 - Lq  # length before the step; 7 slots after it
    c = _make(True, B, Lmax, 2, 8, Lq, True, lens=[n] * B, pads=[pad] * B)
    o, kc, vc = _run(path, c, True)
    _check(o, kc, vc, c)
    if pad == 7:
        assert (o == 0).all()


@pytest.mark.parametrize("path", ["torch"] + TRITON_CPU)
def test_leftpad_none_equals_zero_pad(path):
    """cache_leftpad=None and an all-zero cache_leftpad are the same step."""
    c = _make(True, 3, 16, 2, 8, 1, True, lens=[4, 9, 0], pads=[0, 0, 0])
    o, kc, vc = _run(path, c, True)
    _check(o, kc, vc, c)
    kc2, vc2 = c["kc"].clone(), c["vc"].clone()
    with torch.no_grad():
        o2 = fl.attention_with_kvcache(c["q"], kc2, vc2, c["lens"], c["kn"], c["vn"], causal=True,
                                       softmax_scale=0.3, backend=path)
    torch.testing.assert_close(o2, o, rtol=0, atol=1e-6)
    torch.testing.assert_close(kc2, kc, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["ref", "torch_device", "triton_launcher"])
def test_bad_leftpad_rows_are_nan_and_unwritten(path):
    """Where no host check runs (the launchers, the device path, the reference): a row with
    cache_leftpad < 0 or > cache_seqlens + Lq_new gets NaN rows and no write; the other rows --
    pad == len + Lq_new included (an empty window: zeros) -- are exact."""
    if path == "triton_launcher" and not TRITON_CPU:
        pytest.skip("no Triton interpreter here")
    B, Lmax, Lq = 5, 16, 2
    lens, pads = [4, 6, 3, 8, 5], [-1, 2, 6, 10, 3]  # bad (< 0), good, bad (6 > 3 + 2), good (== 8 + 2), good
    c = _make(True, B, Lmax, 2, 8, Lq, True, lens=lens, pads=pads)
    for b in (0, 2):  # the expectation of a bad row: NaN output, caches untouched
        c["kc_e"][b], c["vc_e"][b] = c["kc"][b], c["vc"][b]
    o, kc, vc = _run(path, c, True)
    for b in (0, 2):
        assert torch.isnan(o[b]).all(), f"row {b}"
    good = [1, 3, 4]
    assert_close_rule(o[good], c["expect"][good], None, factor=0, floor=1e-5)
    assert (o[3] == 0).all()
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, c["vc_e"], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pads,match", [([-1, 0], "cache_leftpad.*>= 0"),
                                        ([0, 5], r"cache_leftpad\[b\] <= cache_seqlens\[b\] \+ Lq_new.*5 > 2 \+ 2")])
def test_bad_leftpad_raises_for_cpu_tensors(compiled, pads, match):
    """CPU tensors are checked on the host (eager, and inside the op under torch.compile): a
    ValueError naming cache_leftpad, raised before anything is written."""
    kc = torch.randn(2, 10, 2, 8)
    q = torch.randn(2, 2, 2, 8)
    f = fl.attention_with_kvcache
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(lambda *a, cache_leftpad: fl.attention_with_kvcache(*a, cache_leftpad=cache_leftpad),
                          backend="aot_eager", fullgraph=True)
    kc_w = kc.clone()
    with pytest.raises(ValueError, match=match):
        f(q, kc_w, kc_w.clone(), torch.tensor([3, 2], dtype=torch.int32), q, q,
          cache_leftpad=torch.tensor(pads, dtype=torch.int32))
    assert torch.equal(kc_w, kc), "nothing may be written before the error"


def test_leftpad_argument_checks():
    q, kc = torch.randn(2, 1, 2, 8), torch.randn(2, 6, 2, 8)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_leftpad: expected an int32 tensor, got torch.int64"):
        fl.attention_with_kvcache(q, kc, kc.clone(), lens, cache_leftpad=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="cache_leftpad: expected an int32 tensor, got list"):
        fl.attention_with_kvcache(q, kc, kc.clone(), lens, cache_leftpad=[0, 1])
    with pytest.raises(ValueError, match=r"cache_leftpad: expected shape \(B,\) = \(2,\), got \(3,\)"):
        fl.attention_with_kvcache(q, kc, kc.clone(), lens, cache_leftpad=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_leftpad: expected a tensor on q's device cpu, got meta"):
        fl.attention_with_kvcache(q, kc, kc.clone(), lens, cache_leftpad=torch.zeros(2, dtype=torch.int32,
                                                                                     device="meta"))


def _views(pads, device="cpu"):
    """cache_leftpad layouts the op must read right (made on `device`: .to() would copy them
    contiguous): stride 2, a matrix column, a storage offset."""
    B = len(pads)
    t = torch.tensor(pads, dtype=torch.int32, device=device)
    wide = torch.zeros(B, 2, dtype=torch.int32, device=device)
    wide[:, 1] = t
    spaced = torch.zeros(2 * B, dtype=torch.int32, device=device)
    spaced[::2] = t
    off = torch.cat([torch.tensor([99], dtype=torch.int32, device=device), t])
    return {"stride2": spaced[::2], "column": wide[:, 1], "offset": off[1:]}


@pytest.mark.parametrize("view", ["stride2", "column", "offset", "expand"])
@pytest.mark.parametrize("path", ["torch", "torch_compiled"] + TRITON_CPU)
def test_leftpad_views(path, view):
    lens = [5, 9, 7]
    pads = [4, 4, 4] if view == "expand" else [2, 6, 0]
    c = _make(True, 3, 16, 2, 8, 1, True, lens=lens, pads=pads)
    if view == "expand":
        c["pads"] = torch.tensor([4], dtype=torch.int32).expand(3)
    else:
        c["pads"] = _views(pads)[view]
        assert c["pads"].tolist() == pads and (c["pads"].stride(0) != 1 or c["pads"].storage_offset())
    o, kc, vc = _run(path, c, True)
    _check(o, kc, vc, c)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("path", ["torch_compiled"] + [pytest.param("triton_compiled", marks=p.marks)
                                                       for p in TRITON_CPU])
def test_leftpad_torch_compile_fullgraph(path, causal):
    if path == "triton_compiled" and not causal:
        pytest.skip("the interpreter is slow: one compiled Triton case (the custom op path) is enough")
    c = _make(causal, 4, 24, 2, 8, 3, True)
    o, kc, vc = _run(path, c, causal)
    _check(o, kc, vc, c)


def test_leftpad_opcheck():
    q, kn, vn = (torch.randn(2, 2, 2, 8) for _ in range(3))
    kc, vc = torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    lens, pads = torch.tensor([2, 7], dtype=torch.int32), torch.tensor([1, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastlayers.attention_with_kvcache.default,
                          (q, kc, vc, lens, kn, vn, 0.4, True, "torch", pads))


def test_leftpad_autocast_with_fp32_caches():
    """CPU autocast (bfloat16) with float32 caches: the mixed path writes the new rows into the
    caches in their dtype and attends each row's window at bfloat16."""
    c = _make(True, 3, 16, 2, 8, 1, True, lens=[4, 9, 6], pads=[2, 0, 7])
    kc, vc = c["kc"].clone(), c["vc"].clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = fl.attention_with_kvcache(c["q"], kc, vc, c["lens"], c["kn"], c["vn"], cache_leftpad=c["pads"],
                                      softmax_scale=0.3, backend="torch")
    assert o.dtype == torch.bfloat16
    assert_close_rule(o, c["expect"], None, factor=0, floor=FLOOR[torch.bfloat16])
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)


def test_cuda_bridge_refuses_a_library_without_leftpad():
    """The C entry point gained cache_leftpad after cache_seqlens: a library built before (no
    attention_kvcache_leftpad in its build info) would read every later argument shifted by one, so
    the bridge reports it unusable instead of calling it; a current build is accepted."""
    from fastlayers.cuda_ops import attention as CA
    with mock.patch.object(_cuda, "build_info", return_value={"attention_head_dims": [64]}):
        assert "cache_leftpad" in CA._kvcache_abi_reason()
        with pytest.raises(RuntimeError, match="stale build"):
            CA.attention_with_kvcache(*([None] * 6), 0.1, True)
    with mock.patch.object(_cuda, "build_info", return_value={"attention_kvcache_leftpad": True,
                                                                "attention_kvcache_paged": True}):
        assert CA._kvcache_abi_reason() is None
    sig = _cuda.SIGNATURES["fl_attention_kvcache_fwd"][1]
    assert sig[12:14] == [_cuda.c_ptr, _cuda.c_ptr], "cache_seqlens, cache_leftpad: two device pointers"


# ----------------------------------------------------------------------------------------------- GPU
def _gpu(backend):
    if not HAS_CUDA or INTERPRET:
        pytest.skip("needs a CUDA GPU and compiled kernels")
    if backend == "cuda":
        err = _cuda.load_error()
        if err is not None:
            pytest.skip(err)


GPU_BACKENDS = ["triton", "cuda", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Lq,with_new", STEPS, ids=STEP_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_leftpad_matches_float64_windows(backend, Lq, with_new, causal, dtype):
    """CUDA tensors (no host check, no host read): windows crossing 64- and 32-key tiles in caches
    of 1000 slots (several splits; short windows leave splits without keys), NaN / inf outside them."""
    _gpu(backend)
    B, Lmax, H, D = 8, 1000, 4, 64
    n_new = Lq if with_new else 0
    lens, pads = _rows(B, Lmax, n_new, tile=64)
    lens[4], pads[4] = 130, 65      # pad just past a tile edge
    lens[5], pads[5] = 900, 899     # one key
    c = _make(causal, B, Lmax, H, D, Lq, with_new, dtype=dtype, device="cuda", lens=lens, pads=pads)
    o, kc, vc = _run(backend, c, causal)
    _check(o, kc, vc, c, floor=FLOOR[dtype])
    assert (o[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7, 16])
def test_gpu_triton_leftpad_forced_splits(num_splits):
    _gpu("triton")
    c = _make(True, 6, 700, 2, 64, 1, True, dtype=torch.float16, device="cuda")
    o, kc, vc = _run("triton_launcher", c, True, num_splits=num_splits)
    _check(o, kc, vc, c, floor=FLOOR[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bad_leftpad_rows_are_nan_and_unwritten(backend, monkeypatch):
    _gpu(backend)
    monkeypatch.delenv(A.CHECK_LENGTHS_ENV, raising=False)
    lens, pads = [40, 60, 30, 80, 50], [-1, 20, 60, 82, 3]  # bad, good, bad (60 > 30 + 2), good (empty), good
    c = _make(True, 5, 200, 2, 64, 2, True, dtype=torch.float16, device="cuda", lens=lens, pads=pads)
    for b in (0, 2):
        c["kc_e"][b], c["vc_e"][b] = c["kc"][b], c["vc"][b]
    o, kc, vc = _run(backend, c, True)
    for b in (0, 2):
        assert torch.isnan(o[b]).all(), f"row {b}"
    good = [1, 3, 4]
    assert_close_rule(o[good], c["expect"][good], None, factor=0, floor=FLOOR[torch.float16])
    torch.testing.assert_close(kc, c["kc_e"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, c["vc_e"], rtol=0, atol=0, equal_nan=True)
    monkeypatch.setenv(A.CHECK_LENGTHS_ENV, "1")  # asked for: the host check raises, naming the argument
    with pytest.raises(ValueError, match="cache_leftpad"):
        _run(backend, c, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_leftpad_views_and_compile(backend):
    _gpu(backend)
    lens, pads = [50, 90, 70], [20, 66, 0]
    c = _make(True, 3, 128, 2, 64, 1, True, dtype=torch.float16, device="cuda", lens=lens, pads=pads)
    c["pads"] = _views(pads, "cuda")["stride2"]
    assert c["pads"].stride(0) == 2
    o, kc, vc = _run(backend, c, True)
    _check(o, kc, vc, c, floor=FLOOR[torch.float16])
    o, kc, vc = _run(f"{backend}_compiled", c, True)
    _check(o, kc, vc, c, floor=FLOOR[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_leftpad_decode_replays_in_a_cuda_graph(backend):
    """A left-padded batch decoding under one captured graph: lengths advance on the device between
    replays, the pads stay; each replay equals the float64 windows."""
    _gpu(backend)
    B, Lmax, H, D = 4, 512, 4, 64
    dev, dt = "cuda", torch.float16
    lens = torch.tensor([10, 100, 300, 64], dtype=torch.int32, device=dev)
    pads = torch.tensor([0, 37, 299, 64], dtype=torch.int32, device=dev)
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dt) for _ in range(2))
    q, kn, vn = (torch.randn(B, 1, H, D, device=dev, dtype=dt) for _ in range(3))
    with torch.no_grad():
        fl.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn, cache_leftpad=pads, backend=backend)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, cache_leftpad=pads, backend=backend)
        for _ in range(3):
            q.copy_(torch.randn_like(q))
            kn.copy_(torch.randn_like(kn))
            vn.copy_(torch.randn_like(vn))
            kc_before, vc_before = kc.clone(), vc.clone()
            graph.replay()
            torch.cuda.synchronize()
            for b in range(B):
                n, p = int(lens[b]), int(pads[b])
                ek, ev = kc_before[b].clone(), vc_before[b].clone()
                ek[n], ev[n] = kn[b, 0], vn[b, 0]
                want = attention_f64(q[b:b + 1], ek[None, p:n + 1], ev[None, p:n + 1], causal=True)
                assert_close_rule(out[b:b + 1], want, None, factor=0, floor=FLOOR[dt])
            lens += 1
