"""Layer-norm launchers of both backends against a float64 torch computation.

CPU part: the Triton launchers under TRITON_INTERPRET=1 (fp32, fp16; tiny grids), with every
tensor the launchers allocate pre-filled with NaN so an unwritten element fails. GPU part (marker
`gpu`): Triton and CUDA launchers, fp32/fp16/bf16, up to 16384 x 8192 and 65536 columns, error at
most 2x torch's own same-dtype error (F.layer_norm / F.rms_norm) plus a small floor, and bitwise
reproducible dweight/dbias. Without a GPU the interpreter is switched on here, before triton is
imported; with one, kernels compile for real and the interpreter tests skip.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest does the same; kept so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytest.importorskip("triton")
import torch.nn.functional as F  # noqa: E402

from fastlayers.kernels import layer_norm as tri  # noqa: E402

EPS = 1e-5
# (residual, weight, bias, rms): every combination the launchers distinguish, cycled over cases.
VARIANTS = [(True, True, True, False), (False, True, False, True), (True, False, False, True),
            (False, False, True, False), (True, True, False, True), (False, True, True, False)]
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def torch_norm(x, residual, weight, bias, dy, dres, rms, dtype):
    """(y, s, ds, dweight, dbias) by torch autograd with every input cast to `dtype`.

    s = x + residual is rounded to x's dtype first (the launchers' definition), then upcast."""
    s = (x + residual) if residual is not None else x  # (rows, cols) in x.dtype
    s = s.to(dtype).detach().requires_grad_()
    w = weight.to(dtype).detach().requires_grad_() if weight is not None else None
    b = bias.to(dtype).detach().requires_grad_() if bias is not None else None
    cols = x.shape[1]
    if rms:
        y = F.rms_norm(s, (cols,), w, EPS)
        if b is not None:
            y = y + b
    else:
        y = F.layer_norm(s, (cols,), w, b, EPS)
    y.backward(dy.to(dtype))
    ds = s.grad + dres.to(dtype) if dres is not None else s.grad
    return (y.detach(), s.detach(), ds, w.grad if w is not None else None, b.grad if b is not None else None)


def make_case(rows, cols, dtype, variant, device="cpu"):
    """Fresh inputs from torch's global generator (conftest seeds it per test)."""
    has_res, has_w, has_b, rms = variant

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

    x = rnd(rows, cols + 5)[:, 2:cols + 2]  # strided rows; start not 16-byte aligned for 2-byte types
    residual = rnd(rows, cols) if has_res else None
    weight = (1 + 0.5 * rnd(cols)) if has_w else None
    bias = rnd(cols) if has_b else None
    dy = rnd(rows, cols)
    dres = rnd(rows, cols) if has_res else None
    return x, residual, weight, bias, dy, dres, rms


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_close(name, got, ref, own, dtype):
    """got vs ref within 2x torch's own error `own` (same dtype) plus a floor scaled by |ref|."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or poisoned element)"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    tol = 2 * max_err(own, ref) + FLOOR[dtype] * scale
    err = max_err(got, ref)
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g}"


def run_and_check(mod, rows, cols, dtype, variant, device="cpu"):
    x, residual, weight, bias, dy, dres, rms = make_case(rows, cols, dtype, variant, device)
    y, residual_out, mean, rstd = mod.layer_norm_fwd(x, residual, weight, bias, EPS, rms)
    assert y.dtype == dtype and y.shape == (rows, cols) and rstd.dtype == torch.float32
    assert (mean is None) == rms and (residual_out is None) == (residual is None)
    s = residual_out if residual is not None else x
    ds, dweight, dbias = mod.layer_norm_bwd(dy, s, weight, mean, rstd, dres, bias is not None, rms)
    assert (dweight is None) == (weight is None) and (dbias is None) == (bias is None)

    ref = torch_norm(x, residual, weight, bias, dy, dres, rms, torch.float64)
    own = torch_norm(x, residual, weight, bias, dy, dres, rms, dtype)
    if residual is not None:
        assert torch.equal(residual_out, ref[1].to(dtype)), "residual_out is not x + residual rounded"
    check_close("y", y, ref[0], own[0], dtype)
    check_close("ds", ds, ref[2], own[2], dtype)
    if weight is not None:
        assert dweight.dtype == weight.dtype
        check_close("dweight", dweight, ref[3], own[3], dtype)
    if bias is not None:
        check_close("dbias", dbias, ref[4], own[4], dtype)
    if rows:
        s64 = ref[1].double()
        rstd_ref = 1 / torch.sqrt(((s64 * s64).mean(1) if rms else s64.var(1, unbiased=False)) + EPS)
        assert torch.allclose(rstd.double(), rstd_ref, rtol=1e-4, atol=1e-5)
        if not rms:
            assert torch.allclose(mean.double(), s64.mean(1), rtol=1e-4, atol=1e-5)
    return dweight, dbias


# ------------------------------------------------------------------ CPU: Triton interpreter
interp = pytest.mark.skipif(not INTERPRET, reason="Triton interpreter tests run without a GPU "
                                                  "(or with TRITON_INTERPRET=1)")


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every floating tensor torch.empty / empty_like makes during the test starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 3, 17])
@pytest.mark.parametrize("cols", [1, 7, 1000, 4097])
def test_triton_interpreter_matches_fp64(cols, rows, dtype, nan_outputs):
    idx = [1, 7, 1000, 4097].index(cols) + 4 * [0, 1, 3, 17].index(rows) + (dtype == torch.float16)
    run_and_check(tri, rows, cols, dtype, VARIANTS[idx % len(VARIANTS)])


@interp
@pytest.mark.parametrize("variant", VARIANTS[:4])
def test_triton_interpreter_long_rows_path(variant, monkeypatch, nan_outputs):
    # Shrink the register budget so 4097 columns take the chunked forward and column-tiled backward.
    monkeypatch.setattr(tri, "_MAX_BLOCK", 1024)
    monkeypatch.setattr(tri, "_MAX_BLOCK_BWD", 1024)
    monkeypatch.setattr(tri, "_COL_TILE", 256)
    monkeypatch.setattr(tri, "_CHUNK", 512)
    run_and_check(tri, 5, 4097, torch.float32, variant)


@interp
def test_triton_interpreter_dweight_deterministic():
    torch.manual_seed(1234)
    a = run_and_check(tri, 17, 1000, torch.float32, VARIANTS[0])
    torch.manual_seed(1234)
    b = run_and_check(tri, 17, 1000, torch.float32, VARIANTS[0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_triton_unsupported_reason():
    x = torch.randn(2, 3)
    assert tri.unsupported_reason(x.to(torch.int32)) is not None
    assert (tri.unsupported_reason(x) is None) == INTERPRET
    assert tri.unsupported_reason(torch.randn(2, 0)) is not None


def test_cuda_unsupported_reason_on_cpu_tensor():
    from fastlayers.cuda_ops import layer_norm as cuda_ln
    assert "CUDA tensors" in cuda_ln.unsupported_reason(torch.randn(2, 3))


# ------------------------------------------------------------------ GPU: both backends
def _backend(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "triton":
        if INTERPRET:
            pytest.skip("TRITON_INTERPRET=1: the GPU Triton tests need compiled kernels")
        return tri
    from fastlayers.cuda_ops import layer_norm as cuda_ln
    reason = cuda_ln.unsupported_reason(torch.empty(1, device="cuda"))
    if reason is not None:
        pytest.skip(f"CUDA backend unavailable: {reason}")
    return cuda_ln


# Each CUDA kernel variant (warp / block / loop forward; warp / block / column-tiled backward) and
# each Triton path (several rows, one row, chunked) is hit by at least one shape.
GPU_SHAPES = [(1, 1), (3, 7), (17, 1000), (64, 4097), (1000, 768), (257, 2048), (33, 12288),
              (9, 20000), (4, 65536)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[1], VARIANTS[3]])
def test_gpu_matches_fp64(backend, dtype, shape, variant):
    mod = _backend(backend)
    run_and_check(mod, *shape, dtype, variant, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_large_matches_fp64(backend, dtype):
    mod = _backend(backend)
    run_and_check(mod, 16384, 8192, dtype, VARIANTS[0], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("aligned", [True, False])
def test_gpu_vector_and_scalar_paths(backend, aligned):
    # Aligned contiguous rows take 16-byte vectors; an odd row stride forces the scalar path.
    mod = _backend(backend)
    cols = 1024 if aligned else 1023
    for dtype in DTYPES:
        x, residual, weight, bias, dy, dres, rms = make_case(300, cols, dtype, VARIANTS[0], "cuda")
        x = x.contiguous()
        y, ro, mean, rstd = mod.layer_norm_fwd(x, residual, weight, bias, EPS, rms)
        ref = torch_norm(x, residual, weight, bias, dy, dres, rms, torch.float64)
        own = torch_norm(x, residual, weight, bias, dy, dres, rms, dtype)
        check_close("y", y, ref[0], own[0], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(16384, 8192), (4096, 512), (64, 65536)])
def test_gpu_dweight_bitwise_deterministic(backend, shape):
    mod = _backend(backend)
    x, residual, weight, bias, dy, dres, rms = make_case(*shape, torch.bfloat16, VARIANTS[0], "cuda")
    y, ro, mean, rstd = mod.layer_norm_fwd(x, residual, weight, bias, EPS, rms)
    first = mod.layer_norm_bwd(dy, ro, weight, mean, rstd, dres, True, rms)
    for _ in range(3):
        again = mod.layer_norm_bwd(dy, ro, weight, mean, rstd, dres, True, rms)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ C ABI checks that need no GPU
def _lib_or_skip():
    from fastlayers import _cuda
    if _cuda.load_error() is not None:
        pytest.skip(f"libfastlayers_cuda not loadable: {_cuda.load_error()}")
    return _cuda


def test_cuda_abi_validation_without_gpu():
    # Argument checks run before any CUDA call; fake non-NULL pointers are never dereferenced.
    import ctypes
    _cuda = _lib_or_skip()
    lib = _cuda.lib()
    assert _cuda.workspace_size("fl_layer_norm_bwd_workspace_size", 0, 1000) == 0
    small = _cuda.workspace_size("fl_layer_norm_bwd_workspace_size", 17, 1000)
    large = _cuda.workspace_size("fl_layer_norm_bwd_workspace_size", 17, 65536)
    assert 0 < small < large
    p = 4096  # a fake, aligned device address
    # rows == 0: nothing to launch.
    assert lib.fl_layer_norm_fwd(p, 8, None, 0, None, None, p, 8, None, 0, p, p, 0, 8,
                                 ctypes.c_float(1e-5), 0, 0, 0, None) == 0
    # (..., rows, cols, eps, rms, dtype, param_dtype)
    cases = [
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 65537, 1e-5, 0, 0, 0), b"cols"),
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 8, -1.0, 0, 0, 0), b"eps"),
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 8, 1e-5, 2, 0, 0), b"rms"),
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 8, 1e-5, 0, 7, 7), b"dtype"),
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 8, 1e-5, 0, 0, 2), b"param_dtype"),  # f32 x, bf16 params
        ((p, 8, None, 0, None, None, p, 8, None, 0, p, p, 4, 8, 1e-5, 0, 2, 1), b"param_dtype"),  # bf16 x, f16 params
        ((p, 8, p, 8, None, None, p, 8, None, 0, p, p, 4, 8, 1e-5, 0, 0, 0), b"residual_out"),
        ((p, 8, None, 0, None, None, p, 4, None, 0, p, p, 4, 8, 1e-5, 0, 0, 0), b"y_row_stride"),
    ]
    for args, word in cases:
        assert lib.fl_layer_norm_fwd(*args[:14], ctypes.c_float(args[14]), *args[15:], None) != 0
        assert word in lib.fl_last_error(), lib.fl_last_error()
    # Backward: a workspace one byte short is refused, naming the argument; so is a param_dtype that
    # is neither dtype nor f32.
    assert lib.fl_layer_norm_bwd(p, 1000, p, 1000, p, p, p, None, 0, p, 1000, p, None, p, small - 1,
                                 17, 1000, 0, 0, 0, None) != 0
    assert b"workspace_bytes" in lib.fl_last_error()
    assert lib.fl_layer_norm_bwd(p, 1000, p, 1000, p, None, p, None, 0, p, 1000, p, None, p, small,
                                 17, 1000, 0, 0, 0, None) != 0
    assert b"mean" in lib.fl_last_error()
    assert lib.fl_layer_norm_bwd(p, 1000, p, 1000, p, p, p, None, 0, p, 1000, p, None, p, small,
                                 17, 1000, 0, 1, 2, None) != 0
    assert b"param_dtype" in lib.fl_last_error()


# ------------------------------------------------------------------ mixed dtypes: half x, fp32 parameters
def check_mixed(mod, rows, cols, dtype, has_w, has_b, rms, device="cpu"):
    """Launchers with float32 weight/bias beside `dtype` activations, against float64 (and torch's
    own F.layer_norm / F.rms_norm at the same dtypes). dweight/dbias come back float32."""
    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device=device).to(dt)

    x = rnd(rows, cols + 3)[:, 1:cols + 1]  # strided rows, misaligned start
    residual = rnd(rows, cols)
    weight = (1 + 0.5 * rnd(cols, dt=torch.float32)) if has_w else None
    bias = rnd(cols, dt=torch.float32) if has_b else None
    dy = rnd(rows, cols)
    y, ro, mean, rstd = mod.layer_norm_fwd(x, residual, weight, bias, EPS, rms)
    assert y.dtype == dtype and ro.dtype == dtype
    ds, dw, db = mod.layer_norm_bwd(dy, ro, weight, mean, rstd, None, has_b, rms, param_dtype=torch.float32)
    assert (dw is None or dw.dtype == torch.float32) and (db is None or db.dtype == torch.float32)
    s64 = ro.double().requires_grad_()
    w64 = weight.double().requires_grad_() if has_w else None
    b64 = bias.double().requires_grad_() if has_b else None
    leaves = [t for t in (s64, w64, b64) if t is not None]

    def norm(s, w, b):
        if rms:
            out = F.rms_norm(s, (cols,), w, EPS)
            return out + b if b is not None else out
        return F.layer_norm(s, (cols,), w, b, EPS)

    y64 = norm(s64, w64, b64)
    g64 = torch.autograd.grad((y64 * dy.double()).sum(), leaves)
    own = norm(ro, weight, bias).to(dtype)  # torch's own, at these dtypes
    check_close("y", y, y64, own, dtype)
    check_close("ds", ds, g64[0], g64[0].to(dtype), dtype)
    for got, ref in zip([t for t in (dw, db) if t is not None], g64[1:]):
        scale = max(1.0, ref.abs().max().item())
        err = max_err(got, ref)
        assert err <= FLOOR[dtype] * scale * max(1, rows) ** 0.5, f"param grad: error {err:.3g}"


@interp
@pytest.mark.parametrize("cols", [7, 1000])
@pytest.mark.parametrize("has_w,has_b,rms", [(True, True, False), (False, True, False), (True, False, True),
                                              (False, False, True)])
def test_triton_interpreter_mixed_dtypes(cols, has_w, has_b, rms, nan_outputs):
    check_mixed(tri, 5, cols, torch.float16, has_w, has_b, rms)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (257, 1024), (64, 4097), (33, 12288), (4, 65536)])
@pytest.mark.parametrize("has_w,has_b,rms", [(True, True, False), (False, True, False), (True, False, True)])
def test_gpu_mixed_dtypes(backend, dtype, shape, has_w, has_b, rms):
    # Each CUDA kernel path (warp / block / loop forward; warp / block / column-tiled backward) with
    # P = float beside T = half, on the scalar (misaligned x) path; the aligned path below.
    check_mixed(_backend(backend), *shape, dtype, has_w, has_b, rms, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cols", [768, 4096, 20000])
def test_gpu_mixed_dtypes_vector_path(backend, cols):
    mod = _backend(backend)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(300, cols, device="cuda").to(dtype)
        w, b = 1 + 0.5 * torch.randn(cols, device="cuda"), torch.randn(cols, device="cuda")
        y, _, mean, rstd = mod.layer_norm_fwd(x, None, w, b, EPS, False)
        ref = F.layer_norm(x.double(), (cols,), w.double(), b.double(), EPS)
        check_close("y", y, ref, F.layer_norm(x.float(), (cols,), w, b, EPS).to(dtype), dtype)
        dy = torch.randn_like(x)
        ds, dw, db = mod.layer_norm_bwd(dy, x, w, mean, rstd, None, True, False)
        assert dw.dtype == torch.float32 and db.dtype == torch.float32
        torch.testing.assert_close(db, dy.float().sum(0), rtol=1e-4, atol=1e-2)
