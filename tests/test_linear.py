"""fl.linear at the op level: the reference against float64 x @ W.T + b, every kernel backend through
the public op, validation, opcheck, torch.compile and the nn modules."""
import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from backends_matrix import kernel_backend_cases
from helpers import assert_close_rule

ACTS = {None: lambda z: z, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}


def torch_linear(x, w, b, act, r):
    y = ACTS[act](F.linear(x, w, b))
    return y + r if r is not None else y


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("lead", [(1,), (3, 37), (2, 3, 4)])
@pytest.mark.parametrize("K,N", [(17, 33), (64, 72), (96, 136)])
@pytest.mark.parametrize("bias,residual", [(True, True), (False, False)])
def test_reference_float64(act, lead, K, N, bias, residual):
    x = torch.randn(*lead, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True) if bias else None
    r = torch.randn(*lead, N, dtype=torch.float64, requires_grad=True) if residual else None
    y = fl.linear(x, w, b, activation=act, residual=r, backend="torch")
    ref = torch_linear(x, w, b, act, r)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (x, w, b, r) if t is not None]
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- kernel backends via the op
@pytest.mark.parametrize("backend,device", kernel_backend_cases())
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("M,K,N", [(1, 17, 33), (37, 72, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_matches_reference(backend, device, act, M, K, N, dtype):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take fp16/bf16")
    x = torch.randn(M, K + 5, dtype=dtype, device=device)[:, :K]          # strided rows
    w = torch.randn(N, K, dtype=dtype, device=device) / K ** 0.5
    b = torch.randn(N, dtype=dtype, device=device)
    r = torch.randn(M, N, dtype=dtype, device=device)
    for t in (x, w, b, r):
        t.requires_grad_(True)
    y = fl.linear(x, w, b, activation=act, residual=r, backend=backend)
    assert fl.last_backend("linear") == backend
    x64, w64, b64, r64 = (t.detach().double().requires_grad_(True) for t in (x, w, b, r))
    ref = torch_linear(x64, w64, b64, act, r64)
    # fp32 runs with TF32 dot products in Triton: compare against a floor that admits TF32 rounding
    floor = {torch.float32: 5e-3 if backend == "triton" else 1e-4, torch.float16: 8e-3}[dtype]
    assert_close_rule(y, ref, torch_linear(x.detach(), w.detach(), b.detach(), act, r.detach()), floor=floor)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b, r), g)
    refs = torch.autograd.grad(ref, (x64, w64, b64, r64), g.double())
    for name, a, e in zip(("dx", "dw", "db", "dresidual"), grads, refs):
        scale = max(1.0, M ** 0.5) if name in ("dw", "db") else 1.0
        assert_close_rule(a, e, None, factor=0, floor=floor * 2 * scale, what=name)


# ----------------------------------------------------------------------------- validation
def test_errors_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="x: in-features mismatch"):
        fl.linear(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match="bias: expected shape"):
        fl.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="residual: expected shape"):
        fl.linear(x, w, residual=torch.randn(4, 8))
    with pytest.raises(ValueError, match="activation: expected one of"):
        fl.linear(x, w, activation="silu")
    with pytest.raises(TypeError, match="weight: expected x's dtype"):
        fl.linear(x, w.half())
    with pytest.raises(ValueError, match="weight: expected a tensor on x's device"):
        fl.linear(x, w.to("meta"))
    with pytest.raises(fl.BackendUnavailableError, match="'cuda'"):
        fl.linear(x, w, backend="cuda")


# ----------------------------------------------------------------------------- custom op, compile, nn
def test_opcheck():
    x, w, b = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    r = torch.randn(5, 6, requires_grad=True)
    for act in ("gelu", None):
        torch.library.opcheck(torch.ops.fastlayers.linear_fwd.default, (x, w, b, r, act, act is not None, "torch"))


def test_torch_compile_fullgraph_backward():
    def f(x, w, b, r):
        return fl.linear(x, w, b, activation="gelu_tanh", residual=r).square().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ts = [torch.randn(3, 4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True),
          torch.randn(6, requires_grad=True), torch.randn(3, 4, 6, requires_grad=True)]
    g = torch.autograd.grad(compiled(*ts), ts)
    e = torch.autograd.grad(f(*ts), ts)
    for a, b_ in zip(g, e):
        torch.testing.assert_close(a, b_)


def test_nn_linear_and_mlp_drop_in():
    ref = torch.nn.Linear(8, 6)
    mod = fl.nn.Linear(8, 6, activation="relu")
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(mod(x), F.relu(ref(x)))
    mlp = fl.nn.MLP(8, 32, activation="gelu")
    r = torch.randn(3, 8)
    expect = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias) + r
    torch.testing.assert_close(mlp(x, r), expect)
    with pytest.raises(ValueError, match="activation"):
        fl.nn.Linear(4, 4, activation="tanh")
