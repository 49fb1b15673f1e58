"""fl.layer_norm at the op level: reference vs torch in float64, every backend through the public
op (Triton via the interpreter on CPU; CUDA and Triton on a GPU), validation, selection, opcheck,
torch.compile, and the nn modules."""

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from backends_matrix import kernel_backend_cases
from helpers import assert_close_rule

from conftest import INTERPRET

# Shapes: 1 and primes catch tail handling; 1000/4097 are non-powers of two past one block.
CPU_COLS = [1, 7, 1000, 4097]


def _inputs(shape, dtype, device, *, weight=True, bias=True, residual=False, grad=False):
    cols = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    w = (1 + 0.5 * torch.randn(cols, dtype=dtype, device=device)) if weight else None
    b = 0.5 * torch.randn(cols, dtype=dtype, device=device) if bias else None
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    ts = [x, w, b, r]
    if grad:
        for t in ts:
            if t is not None:
                t.requires_grad_(True)
    return ts


def _torch_norm(x, w, b, eps, rms):
    if rms:
        y = F.rms_norm(x, (x.shape[-1],), w, eps)
        return y + b if b is not None else y
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cols", [1, 5, 64, 1000])
def test_reference_matches_torch_float64(rms, residual, cols):
    x, w, b, r = _inputs((3, 4, cols), torch.float64, "cpu", residual=residual, bias=not rms, grad=True)
    out = fl.layer_norm(x, w, b, 1e-5, residual=r, rms=rms, backend="torch")
    y, s = out if residual else (out, x)
    s_ref = x + r if residual else x
    y_ref = _torch_norm(s_ref, w, b, 1e-5, rms)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    gy, gs = torch.randn_like(y), torch.randn_like(y)
    inputs = [t for t in (x, w, b, r) if t is not None]
    loss = (y * gy).sum() + ((s * gs).sum() if residual else 0)
    loss_ref = (y_ref * gy).sum() + ((s_ref * gs).sum() if residual else 0)
    for g, g_ref in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(loss_ref, inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck():
    x, w, b, r = _inputs((4, 9), torch.float64, "cpu", residual=True, grad=True)
    for rms in (False, True):
        assert torch.autograd.gradcheck(lambda *a: fl.layer_norm(a[0], a[1], a[2], residual=a[3], rms=rms,
                                                                 backend="torch"), (x, w, b, r))


def test_reference_no_affine_and_zero_rows():
    x = torch.randn(0, 16)
    y = fl.layer_norm(x, None, None, backend="torch")
    assert y.shape == (0, 16)
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(fl.layer_norm(x, None, backend="torch"), F.layer_norm(x, (16,)))


# ----------------------------------------------------------------------------- kernel backends via the op
def _check_backend(backend, device, shape, dtype, rms, residual, bias=True, weight=True, strided=False):
    x, w, b, r = _inputs(shape, dtype, device, residual=residual, bias=bias, weight=weight)
    if strided:  # rows with a gap between them (a column slice of a wider tensor)
        wide = torch.randn(shape[0], shape[1] + 3, dtype=dtype, device=device)
        wide[:, : shape[1]] = x
        x = wide[:, : shape[1]]
    for t in (x, w, b, r):
        if t is not None:
            t.requires_grad_(True)
    out = fl.layer_norm(x, w, b, 1e-5, residual=r, rms=rms, backend=backend)
    assert fl.last_backend("layer_norm") == backend
    y, s = out if residual else (out, None)
    # high-precision reference and torch's own same-dtype result
    leaves = [t for t in (x, w, b, r) if t is not None]
    x64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, r)]
    s64 = (x64[0] + x64[3]) if residual else x64[0]
    if residual and dtype != torch.float32:
        s64 = s64.to(dtype).double()  # the op normalises the sum rounded to x's dtype, as HF does
    y64 = _torch_norm(s64, x64[1], x64[2], 1e-5, rms)
    s_t = (x + r).detach() if residual else x.detach()
    y_t = _torch_norm(s_t, w.detach() if w is not None else None, b.detach() if b is not None else None, 1e-5, rms)
    assert_close_rule(y, y64, y_t, what="y")
    if residual:
        torch.testing.assert_close(s, (x + r).detach(), rtol=0, atol=0)
    gy = torch.randn_like(y)
    gs = torch.randn_like(y) if residual else None
    loss = (y.float() * gy.float()).sum() + ((s.float() * gs.float()).sum() if residual else 0)
    grads = torch.autograd.grad(loss, leaves)
    loss64 = (y64 * gy.double()).sum() + (((x64[0] + x64[3]) * gs.double()).sum() if residual else 0)
    grads64 = torch.autograd.grad(loss64, [t for t in x64 if t is not None])
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), (x, w, b, r)) if t is not None]
    for name, g, g64 in zip(names, grads, grads64):
        # reductions over rows (dweight/dbias) grow with the row count: scale the floor by sqrt(rows)
        floor = None
        if name in ("dweight", "dbias"):
            floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1, shape[0]) ** 0.5
        assert_close_rule(g, g64, None, factor=0, floor=(floor or {torch.float32: 1e-4, torch.float16: 1e-2,
                                                                     torch.bfloat16: 6e-2}[dtype]), what=name)


@pytest.mark.parametrize("backend,device", kernel_backend_cases())
@pytest.mark.parametrize("cols", CPU_COLS)
@pytest.mark.parametrize("rms,residual", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_matches_reference(backend, device, cols, rms, residual, dtype):
    rows = 3 if device == "cpu" else 257
    _check_backend(backend, device, (rows, cols), dtype, rms, residual)


@pytest.mark.parametrize("backend,device", kernel_backend_cases())
def test_backend_strided_leading_dims_no_bias(backend, device):
    _check_backend(backend, device, (5, 33), torch.float32, False, True, bias=False, strided=True)
    x = torch.randn(2, 3, 4, 33, device=device).transpose(1, 2)  # leading dims not collapsible
    w = torch.randn(33, device=device)
    y = fl.layer_norm(x, w, None, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (33,), w), rtol=1e-5, atol=1e-5)
    y = fl.layer_norm(x, None, None, rms=True, backend=backend)
    torch.testing.assert_close(y, F.rms_norm(x, (33,), None, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (4096, 768), (1000, 4097), (16384, 8192), (3, 65536)])
def test_gpu_backends(backend, dtype, shape):
    _check_backend(backend, "cuda", shape, dtype, False, True)
    _check_backend(backend, "cuda", shape, dtype, True, False, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_weight_grad_deterministic(backend):
    x, w, b, r = _inputs((8192, 1024), torch.bfloat16, "cuda", residual=True, grad=True)
    gy = torch.randn_like(x)
    outs = []
    for _ in range(3):
        y, _ = fl.layer_norm(x, w, b, residual=r, backend=backend)
        outs.append(torch.autograd.grad(y, (w, b), gy))
    for dw, db in outs[1:]:
        assert torch.equal(dw, outs[0][0]) and torch.equal(db, outs[0][1])


# ----------------------------------------------------------------------------- validation and selection
def test_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight: expected shape"):
        fl.layer_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="bias: expected shape"):
        fl.layer_norm(x, torch.randn(8), torch.randn(9))
    with pytest.raises(ValueError, match="residual: expected shape"):
        fl.layer_norm(x, torch.randn(8), residual=torch.randn(4, 7))
    with pytest.raises(TypeError, match="x: expected dtype"):
        fl.layer_norm(torch.ones(4, 8, dtype=torch.int32), None)
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        fl.layer_norm(x, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight: expected a tensor on x's device"):
        fl.layer_norm(x, torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        fl.layer_norm(x, None, eps=-1.0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        fl.layer_norm(x, None, backend="cudnn")
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        fl.layer_norm([1.0, 2.0], None)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    x = torch.randn(4, 8)
    with pytest.raises(fl.BackendUnavailableError, match="backend 'cuda' cannot run"):
        fl.layer_norm(x, None, backend="cuda")
    monkeypatch.setenv("FASTLAYERS_BACKEND", "cuda")
    with pytest.raises(fl.BackendUnavailableError):
        fl.layer_norm(x, None)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTLAYERS_BACKEND"):
        fl.layer_norm(x, None)
    monkeypatch.delenv("FASTLAYERS_BACKEND")
    with fl.use_backend("cuda"):
        with pytest.raises(fl.BackendUnavailableError):
            fl.layer_norm(x, None)
    with pytest.raises(fl.BackendUnavailableError, match="float64"):
        fl.layer_norm(x.double(), None, backend="triton")


def test_auto_selection_on_cpu_is_torch_and_observable():
    fl.layer_norm(torch.randn(2, 8), None)
    assert fl.last_backend("layer_norm") == "torch"
    info = fl.available_backends()
    assert set(info) == {"torch", "triton", "cuda"} and info["torch"]["available"]
    for v in info.values():
        assert v["available"] or v["reason"]


# ----------------------------------------------------------------------------- custom op
def _opcheck_backends():
    out = ["torch"]
    if INTERPRET:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _opcheck_backends())
@pytest.mark.parametrize("rms,residual", [(False, True), (True, False)])
def test_opcheck(backend, rms, residual):
    x, w, b, r = _inputs((3, 12), torch.float32, "cpu", residual=residual, bias=not rms, grad=True)
    torch.library.opcheck(torch.ops.fastlayers.layer_norm_fwd.default, (x, w, b, r, 1e-5, rms, backend))
    s = (x + r).detach() if residual else x.detach()
    mean = s.mean(-1) if not rms else torch.empty(0)
    rstd = torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.fastlayers.layer_norm_bwd.default,
                          (torch.randn(3, 12), s, w.detach(), mean, rstd, torch.randn(3, 12) if residual else None,
                           b is not None, rms, backend))


def test_torch_compile_fullgraph_forward_and_backward():
    def block(x, w, b, r):
        y, s = fl.layer_norm(x, w, b, residual=r)
        return (y * 2).sum() + s.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, w, b, r = _inputs((6, 24), torch.float32, "cpu", residual=True, grad=True)
    loss = compiled(x, w, b, r)
    g = torch.autograd.grad(loss, (x, w, b, r))
    loss_ref = block(x, w, b, r)
    g_ref = torch.autograd.grad(loss_ref, (x, w, b, r))
    torch.testing.assert_close(loss, loss_ref)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e)


def test_torch_compile_inductor_forward():
    f = torch.compile(lambda x, w: fl.layer_norm(x, w, rms=True), fullgraph=True)
    x, w = torch.randn(5, 40), torch.randn(40)
    torch.testing.assert_close(f(x, w), F.rms_norm(x, (40,), w, 1e-5))


# ----------------------------------------------------------------------------- nn modules
@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_nn_layer_norm_drop_in(kwargs):
    ref = torch.nn.LayerNorm((4, 6), **kwargs)
    mod = fl.nn.LayerNorm((4, 6), **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(mod(x), ref(x))
    r = torch.randn(3, 4, 6)
    y, s = mod(x, r)
    torch.testing.assert_close(y, ref(x + r))


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_nn_rms_norm_drop_in(eps):
    ref = torch.nn.RMSNorm(32, eps=eps)
    mod = fl.nn.RMSNorm(32, eps=eps)
    with torch.no_grad():
        ref.weight.normal_()
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(7, 32)
    torch.testing.assert_close(mod(x), ref(x))
