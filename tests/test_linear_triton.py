"""Tests of the Triton linear launchers (fastlayers.kernels.linear) against float64 / fp32 torch.

Without a CUDA device the small tests run the kernels under the Triton CPU interpreter
(TRITON_INTERPRET=1 is set below, before triton or fastlayers is imported); with one they run the
same small cases compiled on the GPU. Tests marked `gpu` check large fp16/bf16 problems: error at
most 2x torch's own same-dtype error against an fp32 reference. They need the module imported
WITHOUT the interpreter, so in a process where another test file already set TRITON_INTERPRET=1
they skip and say so (run `pytest -m gpu tests/test_linear_triton.py` on its own).
The Hopper TMA variant (host tensor descriptors) is forced by the tests named *tma* (the
interpreter runs desc.load on CPU tensors); on a GPU they need compute capability >= 9.
"""
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

triton = pytest.importorskip("triton")
from fastlayers.kernels import linear as L  # noqa: E402

DEVICE = "cpu" if L._INTERPRET else "cuda"
ACTS = [None, "gelu", "gelu_tanh", "relu"]
# Absolute floors (times max(1, |ref|max)) on top of "2x torch's own error at the same dtype".
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
if not L._INTERPRET:
    FLOOR[torch.float32] = 5e-3   # TF32 dots on the GPU (10-bit mantissa)


@pytest.fixture(autouse=True)
def _nan_poisoned_outputs(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN, so an unwritten element fails."""
    real_empty = torch.empty

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


def _act(z, activation):
    if activation is None:
        return z
    if activation == "relu":
        return torch.relu(z)
    return torch.nn.functional.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def _reference(x, w, b, r, dy, activation, dtype):
    """(y, dx, dw, db) of act(x @ w.T + b) + r computed in `dtype` by torch autograd."""
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    bs = b.to(dtype).requires_grad_() if b is not None else None
    y = _act(torch.nn.functional.linear(xs, ws, bs), activation)
    if r is not None:
        y = y + r.to(dtype)
    y.backward(dy.to(dtype))
    return y.detach(), xs.grad, ws.grad, bs.grad if bs is not None else None


def _assert_close(name, out, ref, torch_out):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflow)"
    err = (out.double() - ref.double()).abs().max().item()
    torch_err = (torch_out.double() - ref.double()).abs().max().item()
    floor = FLOOR[out.dtype] * max(1.0, ref.abs().max().item())
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch {torch_err:.3g} + {floor:.3g}"


def _inputs(M, K, N, dtype, has_bias, has_residual, device=DEVICE, seed=0, aligned=False):
    g = torch.Generator().manual_seed(seed)
    if aligned:
        # TMA-compatible column slices: offset 0, row strides padded to a multiple of 16 elements
        # (and 16 more), so ragged K / N still give 16-byte aligned rows.
        def cols(rows, n, scale=1.0):
            wide = torch.randn(rows, (n + 31) // 16 * 16, generator=g) * scale
            return wide.to(device=device, dtype=dtype)[:, :n]
        x, w = cols(M, K), cols(N, K, K ** -0.5)                                   # (M, K), (N, K)
        b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if has_bias else None
        return x, w, b, cols(M, N) if has_residual else None, cols(M, N)          # r, dy (M, N)
    # x is a column slice of a wider tensor: row stride K + 7, offset 3 elements.
    wide = torch.randn(M, K + 7, generator=g)
    x = wide.to(device=device, dtype=dtype)[:, 3:3 + K]                           # (M, K)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device=device, dtype=dtype)  # (N, K)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if has_bias else None
    # residual and dy are column slices too (row strides N + 3 and N + 1).
    r = (torch.randn(M, N + 3, generator=g).to(device=device, dtype=dtype)[:, 2:2 + N]
         if has_residual else None)                                             # (M, N)
    dy = torch.randn(M, N + 1, generator=g).to(device=device, dtype=dtype)[:, 1:]  # (M, N)
    return x, w, b, r, dy


def _check(M, K, N, dtype, activation, has_bias, has_residual, cfg=None, split=None, aligned=False):
    x, w, b, r, dy = _inputs(M, K, N, dtype, has_bias, has_residual, aligned=aligned)
    y, z = L._linear_fwd(x, w, b, activation, r, True, cfg)
    dx, dw, db = L._linear_bwd(dy, x, w, z, activation, has_bias, True, True, cfg, cfg, split)
    ref = _reference(x.double(), w.double(), None if b is None else b.double(),
                     None if r is None else r.double(), dy.double(), activation, torch.float64)
    own = _reference(x, w, b, r, dy, activation, dtype)
    _assert_close("y", y, ref[0], own[0])
    if activation is None:
        assert z is None
    else:
        zref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        zown = torch.nn.functional.linear(x, w, b)
        _assert_close("preact", z, zref, zown)
    _assert_close("dx", dx, ref[1], own[1])
    _assert_close("dweight", dw, ref[2], own[2])
    if has_bias:
        _assert_close("dbias", db, ref[3], own[3])
    else:
        assert db is None


# Shapes: M in {1, 5, 37}; K, N include non-multiples of 16 (17, 33, 72, 136) so every tail mask
# of the (16, 32, 32) interpreter tiles is hit, and 136 > 4 tiles so the grouped order wraps.
SHAPES = [(1, 17, 33), (5, 64, 136), (37, 136, 17), (37, 33, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_linear_bias_residual(M, K, N, dtype, activation):
    _check(M, K, N, dtype, activation, has_bias=True, has_residual=True)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("has_bias,has_residual", [(False, False), (True, False), (False, True)])
def test_linear_optional_terms(activation, has_bias, has_residual):
    _check(37, 72, 33, torch.float16, activation, has_bias, has_residual)


@pytest.mark.parametrize("activation", ["gelu", None])
def test_linear_bf16(activation):
    # Under the interpreter the bf16 dot operands are upcast to fp32 (its bf16 dot is wrong).
    _check(5, 72, 33, torch.bfloat16, activation, has_bias=True, has_residual=True)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_linear_persistent(activation):
    # Persistent tile loop: fewer programs than tiles (4 "SMs" under the interpreter), every
    # program walks several tiles in grouped order, in all three kernels.
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=3, num_warps=4, num_stages=2,
               persistent=True)
    _check(37, 72, 136, torch.float32, activation, True, True, cfg=cfg)


@pytest.mark.parametrize("split", [2, 3])
def test_linear_dweight_split_m(split):
    # The dweight GEMM split over M into fp32 partials + the fixed-order sum (dbias too).
    _check(100, 33, 40, torch.float16, "gelu", True, False, split=split)


# TMA variant (host TensorDescriptor loads of the forward's x, W, residual and the dx GEMM's dy, z,
# W), forced through the private cfg["tma"] hook: the interpreter runs desc.load on CPU tensors.
# N is a multiple of 8 (the preact z is contiguous (M, N) and must have 16-byte rows) but not of
# the 32-wide tiles; K and M are ragged. Compiled, it needs a Hopper GPU.
_needs_tma = pytest.mark.skipif(
    not L._INTERPRET and (not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9),
    reason="TMA needs the interpreter or a GPU of compute capability >= 9")
TMA_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
               persistent=False, tma=True)
TMA_SHAPES = [(1, 17, 40), (37, 136, 24), (5, 33, 72)]


@_needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("M,K,N", TMA_SHAPES)
def test_linear_tma(M, K, N, dtype, activation):
    _check(M, K, N, dtype, activation, True, True, cfg=TMA_CFG, aligned=True)


@_needs_tma
@pytest.mark.parametrize("has_residual", [False, True])
def test_linear_tma_persistent(has_residual):
    cfg = dict(TMA_CFG, GROUP_M=3, num_stages=2, persistent=True)
    _check(37, 72, 136, torch.float16, "gelu_tanh", False, has_residual, cfg=cfg, aligned=True)


def test_linear_tma_selection(monkeypatch):
    x, w, b, r, dy = _inputs(5, 33, 24, torch.float16, True, True, aligned=True)
    xo = _inputs(5, 33, 24, torch.float16, True, True)[0]      # offset 3 elements: 6-byte aligned
    monkeypatch.delenv("FASTLAYERS_TRITON_TMA", raising=False)
    assert L._use_tma({}, 9, x, w, r) == (L.TensorDescriptor is not None)
    assert not L._use_tma({}, 8, x, w, r)                       # Ampere: pointer path
    assert not L._use_tma({}, 9, xo, w, r)                      # misaligned x: pointer path
    assert not L._use_tma({}, 9, torch.randn(5, 33, device=DEVICE).half(), w)  # 66-byte rows
    assert not L._use_tma(dict(tma=False), 9, x, w, r)
    monkeypatch.setenv("FASTLAYERS_TRITON_TMA", "0")
    assert not L._use_tma({}, 9, x, w, r)
    with pytest.raises(ValueError, match="TMA"):
        L._linear_fwd(xo, w, b, None, r, False, TMA_CFG)


def test_linear_flags_and_nones():
    x, w, b, r, dy = _inputs(5, 33, 17, torch.float32, True, False)
    y, z = L.linear_fwd(x, w, b, "relu", None, False)
    assert z is None and y.shape == (5, 17)
    y, z = L.linear_fwd(x, w, b, None, None, True)
    assert z is None
    y, z = L.linear_fwd(x, w, b, "gelu", None, True)
    dx, dw, db = L.linear_bwd(dy, x, w, z, "gelu", True, True, False)
    assert dx is not None and dw is None and db is not None
    full = L.linear_bwd(dy, x, w, z, "gelu", True, True, True)
    assert torch.equal(db, full[2]) and torch.equal(dx, full[0])
    dx, dw, db = L.linear_bwd(dy, x, w, z, "gelu", False, False, True)
    assert dx is None and dw is not None and db is None
    with pytest.raises(ValueError, match="preact"):
        L.linear_bwd(dy, x, w, None, "gelu", True, True, True)
    with pytest.raises(ValueError, match="activation"):
        L.linear_fwd(x, w, b, "silu", None, True)
    with pytest.raises(ValueError, match="residual"):
        L.linear_fwd(x, w, b, None, torch.randn(5, 18, device=DEVICE), True)


def test_linear_empty_rows():
    x, w, b, r, dy = _inputs(0, 33, 17, torch.float32, True, True)
    y, z = L.linear_fwd(x, w, b, "gelu", r, True)
    assert y.shape == (0, 17) and z.shape == (0, 17)
    dx, dw, db = L.linear_bwd(dy, x, w, z, "gelu", True, True, True)
    assert dx.shape == (0, 33) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_unsupported_reason():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(16, 8, device=DEVICE)
    assert L.unsupported_reason(x, w) is None
    assert "dtype" in L.unsupported_reason(x.double(), w.double())
    assert "weight.dtype" in L.unsupported_reason(x, w.half())
    assert "stride" in L.unsupported_reason(torch.randn(8, 4, device=DEVICE).t(), w)
    assert "shape" in L.unsupported_reason(x, torch.randn(16, 9, device=DEVICE))
    assert "in_features" in L.unsupported_reason(x[:, :0], w[:, :0])
    with pytest.raises(ValueError, match="dtype"):
        L.linear_fwd(x.double(), w.double(), None, None, None, False)


# ----------------------------------------------------------------------------------------------
# GPU: large fp16 / bf16 problems vs an fp32 reference, error <= 2x cuBLAS's own same-dtype error.
# ----------------------------------------------------------------------------------------------
_needs_compiled_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or L._INTERPRET,
    reason="needs CUDA and the module imported without TRITON_INTERPRET=1")

GPU_SHAPES = [
    (1, 4096, 11008),      # decode: one row, bandwidth bound, small-M config
    (33, 8191, 4097),      # odd tails on both K and N
    (4097, 4096, 1023),    # odd M tail, many tiles
    (32768, 768, 768),     # long M, few (N, K) tiles: dweight split over M
    (8192, 8192, 8192),    # big square: persistent forward
]


def _gpu_check(M, K, N, dtype, activation, aligned=False):
    x, w, b, r, dy = _inputs(M, K, N, dtype, True, True, device="cuda", seed=M + K + N, aligned=aligned)
    y, z = L.linear_fwd(x, w, b, activation, r, True)
    dx, dw, db = L.linear_bwd(dy, x, w, z, activation, True, True, True)
    ref = _reference(x.float(), w.float(), b.float(), r.float(), dy.float(), activation, torch.float32)
    own = _reference(x, w, b, r, dy, activation, dtype)
    for name, out, rf, ow in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db), ref, own):
        _assert_close(name, out, rf, ow)


@pytest.mark.gpu
@_needs_compiled_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_linear_gpu_large(M, K, N, dtype):
    _gpu_check(M, K, N, dtype, "gelu_tanh" if M % 2 else "gelu")


@pytest.mark.gpu
@_needs_compiled_gpu
@pytest.mark.parametrize("activation", ACTS)
def test_linear_gpu_activations(activation):
    _gpu_check(2049, 1535, 3073, torch.bfloat16, activation)


@pytest.mark.gpu
@_needs_compiled_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,K,N,activation", [
    (4097, 4095, 1032, "gelu"), (33, 8191, 4104, "gelu_tanh"), (8192, 8192, 8192, None)])
def test_linear_gpu_tma(M, K, N, activation, dtype, monkeypatch):
    # 16-byte aligned operands: on Hopper the default heuristics pick the TMA variant (forward and
    # dx); the other GPU tests use misaligned slices, i.e. the pointer path.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    monkeypatch.delenv("FASTLAYERS_TRITON_TMA", raising=False)
    x, w, b, r, dy = _inputs(M, K, N, dtype, True, True, device="cuda", aligned=True)
    assert L._use_tma({}, 9, x, w, r) and L._use_tma({}, 9, dy, w, r), "expected the TMA variant"
    _gpu_check(M, K, N, dtype, activation, aligned=True)


@pytest.mark.gpu
@_needs_compiled_gpu
def test_linear_gpu_fp32_tf32():
    x, w, b, r, dy = _inputs(1027, 1029, 515, torch.float32, True, True, device="cuda")
    y, z = L.linear_fwd(x, w, b, "gelu", r, True)
    dx, dw, db = L.linear_bwd(dy, x, w, z, "gelu", True, True, True)
    ref = _reference(x.double(), w.double(), b.double(), r.double(), dy.double(), "gelu", torch.float64)
    for name, out, rf in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db), ref):
        err = (out.double() - rf).abs().max().item()
        assert err <= 2e-2 * max(1.0, rf.abs().max().item()), f"{name}: TF32 error {err:.3g}"
