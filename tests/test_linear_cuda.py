"""CUDA backend of linear (csrc/linear/, pytorch_ext/cuda_ops/linear.py), tested at the launchers.

CPU tests: the built library exports the linear entry points of _cuda.SIGNATURES, whose arities match
fastlayers.h, and the C ABI rejects bad arguments (named in fl_last_error) before touching a device.
GPU tests (marker gpu; skipped without CUDA or without the library): forward and backward against an
fp32 reference (TF32 off), tolerance "<= 2x PyTorch's own error at the same dtype" (tests/helpers).
The sm_90a wgmma/TMA forward (FASTLAYERS_CUDA_GEMM=wgmma, sm_90 GPUs only) is checked on the same
reference (every activation, both dtypes, ragged M/N/K, both tile widths) and against its TMA rules
(misaligned x runs mma.sync under "auto", raises under "wgmma"); CPU tests check the selector.
Shapes are chosen to hit every kernel variant: M = 1 / 7 (64x64 tiles, mostly-masked rows), 4096 and
32768 (128x128 tiles), K or N not a multiple of 8 (element-wise-load variant, unpaired stores), K not
a multiple of the 32-wide k tile, strided rows, and (K, N) up to 8192.
"""
import ctypes
import re

import pytest
import torch
import torch.nn.functional as F

from fastlayers import _cuda
from helpers import assert_close_rule

ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
DTYPES = (torch.float16, torch.bfloat16)
LINEAR_SYMBOLS = [n for n in _cuda.SIGNATURES if n.startswith("fl_linear")]


def test_library_exports_linear_symbols():
    path = _cuda.library_path()
    if not path.exists():
        pytest.skip(f"{path} is not built")
    lib = ctypes.CDLL(str(path))
    assert LINEAR_SYMBOLS == ["fl_linear_fwd", "fl_linear_bwd_dx", "fl_linear_bwd_dw", "fl_linear_grid"]
    missing = [n for n in LINEAR_SYMBOLS if not hasattr(lib, n)]
    assert not missing, f"{path} lacks {missing}"


def test_linear_signatures_match_header():
    import re
    from pathlib import Path
    header = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastlayers.h").read_text()
    for name in LINEAR_SYMBOLS:
        m = re.search(r"FL_API fl_status " + name + r"\(([^)]*)\);", header)
        assert m, f"{name} not declared in fastlayers.h"
        n_params = len([a for a in m.group(1).split(",") if a.strip()])
        assert n_params == len(_cuda.SIGNATURES[name][1]), name


def _raw_lib():
    """The built library with the linear signatures bound (no GPU and no other op needed)."""
    path = _cuda.library_path()
    if not path.exists():
        pytest.skip(f"{path} is not built")
    lib = ctypes.CDLL(str(path))
    for name in LINEAR_SYMBOLS + ["fl_last_error"]:
        restype, argtypes = _cuda.SIGNATURES[name]
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


FAKE = 4096  # a non-null "device pointer" for checks that fail before any launch (never dereferenced)


def test_linear_abi_checks_arguments_before_launch():
    lib = _raw_lib()
    # Empty problems succeed without touching a device.
    assert lib.fl_linear_fwd(None, 0, None, 0, None, None, 0, None, 0, None, 0, 0, 16, 16, 1, 0, 1, None) == 0
    assert lib.fl_linear_bwd_dx(None, 0, None, 0, None, 0, None, 0, 0, 16, 16, 1, 1, None) == 0
    assert lib.fl_linear_bwd_dw(None, 0, None, 0, None, 0, None, 0, None, 16, 0, 16, 1, 1, None) == 0
    # Each bad argument is named.
    st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 7, 0, 1, None)
    assert st == 1 and b"activation" in lib.fl_last_error()
    st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, -1, 8, 8, 0, 0, 1, None)
    assert st == 1 and b"M must be" in lib.fl_last_error()
    st = lib.fl_linear_fwd(FAKE, 5, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 0, 0, 1, None)
    assert st == 1 and b"x_row_stride" in lib.fl_last_error()
    st = lib.fl_linear_bwd_dx(FAKE, 8, None, 0, FAKE, 8, FAKE, 8, 4, 8, 8, 1, 1, None)
    assert st == 1 and b"preact" in lib.fl_last_error()
    st = lib.fl_linear_bwd_dw(FAKE, 8, FAKE, 8, FAKE, 8, FAKE, 4, None, 4, 8, 8, 1, 1, None)
    assert st == 1 and b"dweight_row_stride" in lib.fl_last_error()
    # fp32 is a valid dtype these kernels do not implement.
    st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 0, 0, 0, None)
    assert st == 2 and b"fp16 or bf16" in lib.fl_last_error()


def _cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    err = _cuda.load_error()
    if err is not None:
        pytest.skip(err)
    from fastlayers.cuda_ops import linear
    return linear


@pytest.fixture(autouse=True)
def _no_tf32():
    # The fp32 reference must be true fp32.
    if torch.cuda.is_available():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield


def _act(z, activation):
    if activation is None:
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.relu(z)


def _act_grad(z, activation):
    """d act / dz in fp32 (via autograd of torch's own activation)."""
    if activation is None:
        return torch.ones_like(z)
    z = z.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_act(z, activation).sum(), z)
    return g


def _poison(*shapes, dtype):
    """Leaves NaN-filled blocks of the outputs' sizes in torch's caching allocator, so the launcher's
    torch.empty outputs most likely start as NaN and an element the kernel never writes fails."""
    bufs = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for shape in shapes]
    del bufs


def _rows(M, K, dtype, row_stride=None):
    """(M, K) matrix of randn; with row_stride, a view into a wider buffer (strided rows)."""
    if row_stride is None:
        return torch.randn(M, K, device="cuda", dtype=dtype)
    return torch.randn(M, row_stride, device="cuda", dtype=dtype)[:, :K]


def _check_fwd(ops, M, K, N, dtype, activation, has_bias, has_res, x_stride=None):
    x = _rows(M, K, dtype, x_stride)                                            # (M, K)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)                  # (N, K)
    b = torch.randn(N, device="cuda", dtype=dtype) if has_bias else None         # (N,)
    r = torch.randn(M, N, device="cuda", dtype=dtype) if has_res else None       # (M, N)
    _poison((M, N), (M, N), dtype=dtype)
    y, preact = ops.linear_fwd(x, w, b, activation, r, True)
    torch.cuda.synchronize()

    z_ref = x.float() @ w.float().T + (b.float() if has_bias else 0.0)          # (M, N) fp32
    y_ref = _act(z_ref, activation) + (r.float() if has_res else 0.0)
    z_t = F.linear(x, w, b)                                                      # cuBLAS at dtype
    y_t = _act(z_t, activation) + (r if has_res else 0.0)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_close_rule(y, y_ref, y_t, what="y")
    if activation is None:
        assert preact is None
    else:
        assert_close_rule(preact, z_ref, z_t, what="preact")


CASES_FULL = [  # (M, K, N): every activation x bias x residual x dtype
    (1, 64, 64),
    (7, 127, 129),     # K, N odd: element-wise loads, unpaired stores
    (4096, 1000, 520),  # K % 32 != 0 (k tail), 16-byte rows
    (4096, 768, 3072),  # 128x128 tiles
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("M,K,N", CASES_FULL)
def test_linear_fwd(M, K, N, has_res, has_bias, activation, dtype):
    _check_fwd(_cuda_ops(), M, K, N, dtype, activation, has_bias, has_res)


CASES_BIG = [  # (M, K, N): selected epilogues on large / awkward shapes
    (32768, 1024, 4096),
    (4096, 8192, 8192),
    (7, 8192, 8192),
    (1, 4097, 8191),
    (32768, 120, 33),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("M,K,N", CASES_BIG)
def test_linear_fwd_big(M, K, N, activation, dtype):
    _check_fwd(_cuda_ops(), M, K, N, dtype, activation, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_stride", [136, 129])  # 16-byte rows (fast path) / odd rows (slow path)
def test_linear_fwd_strided_x(x_stride, dtype):
    _check_fwd(_cuda_ops(), 333, 128, 200, dtype, "relu", True, True, x_stride=x_stride)


def _check_bwd(ops, M, K, N, dtype, activation, has_bias, needs_dx=True, needs_dw=True):
    dy = torch.randn(M, N, device="cuda", dtype=dtype)                           # (M, N)
    x = torch.randn(M, K, device="cuda", dtype=dtype)                            # (M, K)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)                  # (N, K)
    preact = torch.randn(M, N, device="cuda", dtype=dtype) if activation else None  # (M, N)
    _poison((M, K), (N, K), (N,), dtype=dtype)
    dx, dw, db = ops.linear_bwd(dy, x, w, preact, activation, has_bias, needs_dx, needs_dw)
    torch.cuda.synchronize()

    dz = dy.float() * (_act_grad(preact, activation) if activation else 1.0)     # (M, N) fp32
    dz_t = dz.to(dtype)                                                          # torch's dz at dtype
    if needs_dx:
        assert_close_rule(dx, dz @ w.float(), dz_t @ w, what="dx")
    else:
        assert dx is None
    if needs_dw:
        ref = dz.T @ x.float()
        assert_close_rule(dw, ref, dz_t.T @ x, what="dweight")
    else:
        assert dw is None
    if has_bias:
        # torch's own error: the dtype dz summed in fp32, rounded once (a floor on tiny M).
        assert_close_rule(db, dz.sum(0), dz_t.sum(0), what="dbias")
    else:
        assert db is None


CASES_BWD = [
    (1, 64, 64),
    (7, 127, 129),
    (0, 64, 48),        # M == 0: dweight and dbias are zeros
    (4096, 1000, 520),
    (4096, 768, 3072),
    (300, 8192, 8192),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("M,K,N", CASES_BWD)
def test_linear_bwd(M, K, N, has_bias, activation, dtype):
    _check_bwd(_cuda_ops(), M, K, N, dtype, activation, has_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(32768, 1024, 4096), (32768, 64, 33)])
def test_linear_bwd_big(M, K, N, dtype):
    _check_bwd(_cuda_ops(), M, K, N, dtype, "gelu_tanh", True)


@pytest.mark.gpu
@pytest.mark.parametrize("needs_dx,needs_dw", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_linear_bwd_partial(needs_dx, needs_dw, activation):
    _check_bwd(_cuda_ops(), 513, 256, 96, torch.bfloat16, activation, True, needs_dx, needs_dw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_tanh_negative_tail(dtype):
    """For z << 0, 1 + tanh(u) cancels: y and act' there must keep their relative accuracy (a fast
    tanh approximation, relative error ~2^-11, is off by up to 100% at z ~ -4). Small floors."""
    ops = _cuda_ops()
    M, K, N = 256, 64, 128
    x = (0.1 * torch.randn(M, K, device="cuda")).to(dtype)                      # (M, K)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)                  # (N, K)
    b = torch.full((N,), -4.0, device="cuda", dtype=dtype)                       # z ~ -4 (N,)
    y, _ = ops.linear_fwd(x, w, b, "gelu_tanh", None, False)                     # (M, N)
    z_ref = x.float() @ w.float().T + b.float()                                  # (M, N) fp32
    assert_close_rule(y, _act(z_ref, "gelu_tanh"), _act(F.linear(x, w, b), "gelu_tanh"), floor=1e-6, what="y")
    dy = torch.randn(M, N, device="cuda", dtype=dtype)                           # (M, N)
    preact = (0.5 * torch.randn(M, N, device="cuda") - 4.0).to(dtype)            # (M, N)
    _, _, db = ops.linear_bwd(dy, x, w, preact, "gelu_tanh", True, False, True)
    dz = dy.float() * _act_grad(preact, "gelu_tanh")                             # (M, N) fp32
    assert_close_rule(db, dz.sum(0), dz.to(dtype).sum(0), floor=1e-5, what="dbias")


@pytest.mark.gpu
def test_linear_broadcast_rows_and_empty_k():
    """Read-only operands with row stride 0 (torch's expand, e.g. the gradient of y.sum(0)), and
    K == 0 (empty x / weight / dweight, whose data pointers torch leaves null)."""
    ops = _cuda_ops()
    dtype = torch.float16
    M, K, N = 100, 64, 48
    x = torch.randn(M, K, device="cuda", dtype=dtype)                            # (M, K)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)                  # (N, K)
    r = torch.randn(1, N, device="cuda", dtype=dtype).expand(M, N)               # (M, N), stride (0, 1)
    y, _ = ops.linear_fwd(x, w, None, "relu", r, False)
    y_ref = F.relu(x.float() @ w.float().T) + r.float()
    assert_close_rule(y, y_ref, F.relu(F.linear(x, w)) + r, what="y (broadcast residual)")
    dy = torch.randn(1, N, device="cuda", dtype=dtype).expand(M, N)              # (M, N), stride (0, 1)
    preact = torch.randn(M, N, device="cuda", dtype=dtype)                       # (M, N)
    dx, dw, db = ops.linear_bwd(dy, x, w, preact, "gelu", True, True, True)
    dz = dy.float() * _act_grad(preact, "gelu")                                  # (M, N) fp32
    dz_t = dz.to(dtype)
    assert_close_rule(dx, dz @ w.float(), dz_t @ w, what="dx (broadcast dy)")
    assert_close_rule(dw, dz.T @ x.float(), dz_t.T @ x, what="dweight (broadcast dy)")
    assert_close_rule(db, dz.sum(0), dz_t.sum(0), what="dbias (broadcast dy)")
    x0 = torch.empty(M, 0, device="cuda", dtype=dtype)                           # (M, 0)
    w0 = torch.empty(N, 0, device="cuda", dtype=dtype)                           # (N, 0)
    dx, dw, db = ops.linear_bwd(dy, x0, w0, preact, "gelu", True, True, True)
    assert dx.shape == (M, 0) and dw.shape == (N, 0)
    assert_close_rule(db, dz.sum(0), dz_t.sum(0), what="dbias (K == 0)")


@pytest.mark.gpu
def test_linear_bwd_deterministic():
    ops = _cuda_ops()
    dy = torch.randn(4099, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4099, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(4099, 384, device="cuda", dtype=torch.bfloat16)
    a = ops.linear_bwd(dy, x, w, z, "gelu", True, True, True)
    b = ops.linear_bwd(dy, x, w, z, "gelu", True, True, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.gpu
def test_linear_unsupported_reason():
    ops = _cuda_ops()
    x = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 8, device="cuda", dtype=torch.float16)
    assert ops.unsupported_reason(x, w) is None
    assert "float32" in ops.unsupported_reason(x.float(), w.float())
    assert ops.unsupported_reason(x.cpu(), w.cpu()) is not None


def test_linear_abi_without_device_reports_cuda_error():
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path (would launch on fake pointers here)")
    lib = _raw_lib()
    st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 1, 0, 1, None)
    assert st == 3 and lib.fl_last_error()
    # Valid, so they pass the argument checks and fail only at the device: a broadcast row
    # (row stride 0) of a read-only operand, and K == 0 with null x / dweight (torch's empty tensors).
    st = lib.fl_linear_fwd(FAKE, 0, FAKE, 8, None, FAKE, 0, FAKE, 8, None, 0, 4, 8, 8, 1, 0, 1, None)
    assert st == 3, lib.fl_last_error()
    st = lib.fl_linear_bwd_dw(FAKE, 0, FAKE, 8, None, 0, None, 0, FAKE, 4, 8, 0, 1, 1, None)
    assert st == 3, lib.fl_last_error()


# ---------------------------------------------------------------- forward impl selector (wgmma)
def test_linear_impl_codes_match_header():
    from pathlib import Path
    from fastlayers.cuda_ops import linear
    header = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "fastlayers.h").read_text()
    codes = {name.lower(): int(v) for name, v in re.findall(r"FL_LINEAR_IMPL_(\w+) = (\d+)", header)}
    assert codes == linear._IMPL_CODES
    m = re.search(r"FL_API fl_status fl_linear_fwd\(([^)]*)\);", header)
    params = [a.split()[-1] for a in m.group(1).split(",")]
    assert params[-3:] == ["impl", "dtype", "stream"]
    assert _cuda.SIGNATURES["fl_linear_fwd"][1][-3:] == [_cuda.c_i32, _cuda.c_i32, _cuda.c_ptr]


def test_linear_forward_impl_env(monkeypatch):
    from fastlayers.cuda_ops import linear
    monkeypatch.delenv("FASTLAYERS_CUDA_GEMM", raising=False)
    assert linear.forward_impl() == 1  # default "mma" until the wgmma kernel is GPU-verified
    for name, code in (("auto", 0), ("mma", 1), ("WGMMA", 2)):
        monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", name)
        assert linear.forward_impl() == code
    monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", "")
    assert linear.forward_impl() == 1
    monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", "cublas")
    with pytest.raises(ValueError, match="FASTLAYERS_CUDA_GEMM"):
        linear.forward_impl()


def test_linear_abi_checks_impl():
    lib = _raw_lib()
    st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 0, 3, 1, None)
    assert st == 1 and b"impl" in lib.fl_last_error()
    if not torch.cuda.is_available():
        # An explicit wgmma request that cannot run is FL_ERR_UNSUPPORTED with the reason.
        st = lib.fl_linear_fwd(FAKE, 8, FAKE, 8, None, None, 0, FAKE, 8, None, 0, 4, 8, 8, 0, 2, 1, None)
        assert st == 2 and b"wgmma" in lib.fl_last_error()


def _wgmma_ops(monkeypatch, impl="wgmma"):
    ops = _cuda_ops()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs an sm_90 GPU")
    if "wgmma" not in _cuda.build_info().get("linear_fwd_impls", []):
        pytest.skip("this build has no sm_90a code")
    monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", impl)
    return ops


CASES_WGMMA = [  # (M, K, N); ping-pong 128x128 tiles when K <= 1024 or few tiles, else cooperative 128x256
    (1, 64, 64),         # explicit wgmma at M = 1: 127 of 128 tile rows zero-filled by TMA
    (200, 72, 136),      # ragged M, N and K (K % 64 = 8)
    (333, 8, 129),       # K = 8 (one partial k tile), odd N: 4-byte pair epilogue, unpaired stores
    (4096, 1000, 520),   # K % 64 = 40; several tiles per CTA
    (4096, 768, 3072),   # ping-pong, many tiles per CTA (both warpgroups, order barrier)
    (4100, 1096, 2056),  # cooperative 128x256, ragged M, N, K
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", CASES_WGMMA)
def test_linear_fwd_wgmma(M, K, N, activation, dtype, monkeypatch):
    ops = _wgmma_ops(monkeypatch)
    _check_fwd(ops, M, K, N, dtype, activation, True, True)
    if activation == "gelu" and M in (200, 4100):
        _check_fwd(ops, M, K, N, dtype, activation, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(32768, 1024, 4096), (4096, 8192, 8192), (300, 4096, 11008)])
def test_linear_fwd_wgmma_big(M, K, N, dtype, monkeypatch):
    _check_fwd(_wgmma_ops(monkeypatch), M, K, N, dtype, "gelu_tanh", True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "wgmma"])
def test_linear_fwd_wgmma_misaligned(impl, monkeypatch):
    ops = _wgmma_ops(monkeypatch, impl)
    dtype = torch.bfloat16
    w = torch.randn(96, 64, device="cuda", dtype=dtype)                            # (N, K)
    buf = torch.randn(300, 80, device="cuda", dtype=dtype)
    for x in (torch.randn(300, 129, device="cuda", dtype=dtype)[:, :64],          # row stride 129
              buf[:, 1:65],                                                     # base 2 bytes off
              torch.randn(1, 64, device="cuda", dtype=dtype).expand(300, 64)):  # row stride 0
        if impl == "wgmma":
            with pytest.raises(RuntimeError, match="wgmma"):
                ops.linear_fwd(x, w, None, "relu", None, False)
        else:
            y, _ = ops.linear_fwd(x, w, None, "relu", None, False)
            assert_close_rule(y, F.relu(x.float() @ w.float().T), F.relu(F.linear(x, w)), what="y")
    if impl == "wgmma":
        # K == 0: nothing for TMA to load.
        with pytest.raises(RuntimeError, match="K == 0"):
            ops.linear_fwd(torch.empty(4, 0, device="cuda", dtype=dtype), torch.empty(8, 0, device="cuda", dtype=dtype),
                           None, None, None, False)


@pytest.mark.gpu
def test_linear_fwd_wgmma_refused_off_hopper(monkeypatch):
    ops = _cuda_ops()
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("checks a non-sm_90 GPU")
    monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", "wgmma")
    x = torch.randn(128, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="wgmma"):
        ops.linear_fwd(x, w, None, None, None, False)
    monkeypatch.setenv("FASTLAYERS_CUDA_GEMM", "mma")
    ops.linear_fwd(x, w, None, None, None, False)
