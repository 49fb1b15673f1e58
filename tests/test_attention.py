"""fl.attention / fl.attention_with_kvcache at the op level: the reference against a plain float64
softmax(QK^T)V, every kernel backend through the public op, dropout semantics, validation,
opcheck, torch.compile and the nn module."""

import pytest
import torch

import fastlayers as fl
from fastlayers.kernels.philox import dropout_keep_mask
from backends_matrix import kernel_backend_cases
from helpers import assert_close_rule
from helpers import attention_f64 as naive_attention


def _qkv(B, Lq, Lk, H, D, dtype, device, grad=False):
    ts = [torch.randn(B, L, H, D, dtype=dtype, device=device) for L in (Lq, Lk, Lk)]
    return [t.requires_grad_(grad) for t in ts]


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (7, 13), (13, 7), (16, 16)])
def test_reference_forward_backward_float64(causal, Lq, Lk):
    q, k, v = _qkv(2, Lq, Lk, 3, 8, torch.float64, "cpu", grad=True)
    mask = torch.rand(2, Lk) > 0.3
    mask[1] = False  # a batch row with no key at all
    o = fl.attention(q, k, v, causal=causal, key_padding_mask=mask, softmax_scale=0.3, backend="torch")
    ref = naive_attention(q, k, v, causal, mask, 0.3)
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    g = torch.randn_like(o)
    for a, e in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, e.nan_to_num(0.0), rtol=1e-10, atol=1e-10)


def test_reference_dropout_semantics():
    q, k, v = _qkv(2, 9, 11, 2, 8, torch.float64, "cpu", grad=True)
    torch.manual_seed(7)
    o1 = fl.attention(q, k, v, dropout_p=0.25, backend="torch")
    torch.manual_seed(7)
    o2 = fl.attention(q, k, v, dropout_p=0.25, backend="torch")
    o3 = fl.attention(q, k, v, dropout_p=0.25, backend="torch")
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    # the mask drops ~p of the elements
    keep = dropout_keep_mask(torch.tensor([123, 0]), 4, 4, 64, 64, "cpu", 0.25)
    assert abs(1 - keep.float().mean().item() - 0.25) < 0.02
    # mean over seeds -> the no-dropout output
    qs, ks, vs = (t.detach()[:1, :4, :1] for t in (q, k, v))
    mean = sum(fl.attention(qs, ks, vs, dropout_p=0.25, backend="torch") for _ in range(300)) / 300
    assert (mean - fl.attention(qs, ks, vs, backend="torch")).abs().max() < 0.15
    # backward of the seeded forward equals finite differences
    def seeded(q, k, v):
        torch.manual_seed(11)
        return fl.attention(q, k, v, dropout_p=0.3, causal=True, backend="torch")
    small = [torch.randn(1, L, 2, 4, dtype=torch.float64, requires_grad=True) for L in (4, 6, 6)]
    assert torch.autograd.gradcheck(seeded, small)


def test_reference_kvcache():
    B, Lmax, H, D, Lq = 3, 20, 2, 8, 2
    kc, vc = torch.randn(B, Lmax, H, D), torch.randn(B, Lmax, H, D)
    lens = torch.tensor([0, 5, 18], dtype=torch.int32)
    q, kn, vn = (torch.randn(B, Lq, H, D) for _ in range(3))
    kc0, vc0 = kc.clone(), vc.clone()
    o = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend="torch")
    for b, L in enumerate(lens.tolist()):
        assert torch.equal(kc[b, L:L + Lq], kn[b]) and torch.equal(vc[b, L:L + Lq], vn[b])
        assert torch.equal(kc[b, :L], kc0[b, :L]) and torch.equal(kc[b, L + Lq:], kc0[b, L + Lq:])
        assert torch.equal(vc[b, L + Lq:], vc0[b, L + Lq:])
        ref = naive_attention(q[b:b + 1], kc[b:b + 1, :L + Lq], vc[b:b + 1, :L + Lq], causal=True)
        torch.testing.assert_close(o[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- kernel backends via the op
@pytest.mark.parametrize("backend,device", kernel_backend_cases())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk,D", [(7, 13, 16), (19, 5, 40), (33, 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_matches_reference(backend, device, causal, Lq, Lk, D, dtype):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take fp16/bf16")
    q, k, v = _qkv(2, Lq, Lk, 2, D, dtype, device, grad=True)
    mask = torch.rand(2, Lk, device=device) > 0.25
    mask[0, :] = False
    o = fl.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    assert fl.last_backend("attention") == backend
    ref = naive_attention(q, k, v, causal, mask)
    o_torch = naive_attention(q.detach().to(dtype), k.detach(), v.detach(), causal, mask).to(dtype)
    assert_close_rule(o, ref, o_torch, floor={torch.float32: 1e-4, torch.float16: 4e-3}[dtype], what="o")
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q, k, v), g.double())
    for name, a, e in zip(("dq", "dk", "dv"), grads, refs):
        assert_close_rule(a, e.nan_to_num(0.0), None, factor=0,
                          floor={torch.float32: 2e-4, torch.float16: 2e-2}[dtype], what=name)


@pytest.mark.parametrize("backend,device", kernel_backend_cases())
def test_backend_dropout_equals_reference_mask(backend, device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = _qkv(2, 9, 17, 2, 16, dtype, device, grad=True)
    torch.manual_seed(3)
    o = fl.attention(q, k, v, dropout_p=0.2, causal=True, backend=backend)
    torch.manual_seed(3)
    o_ref = fl.attention(q.double(), k.double(), v.double(), dropout_p=0.2, causal=True, backend="torch")
    assert_close_rule(o, o_ref, None, factor=0, floor=1e-4 if dtype == torch.float32 else 4e-3, what="o")
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    refs = torch.autograd.grad(o_ref, (q, k, v), g.double(), allow_unused=True)
    for a, e in zip(grads, refs):
        assert_close_rule(a, e, None, factor=0, floor=2e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("backend,device", kernel_backend_cases())
def test_backend_kvcache(backend, device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, Lmax, H, D, Lq = 3, 40, 2, 16, 2
    kc, vc = torch.randn(B, Lmax, H, D, dtype=dtype, device=device), torch.randn(B, Lmax, H, D, dtype=dtype, device=device)
    lens = torch.tensor([1, 17, 38], dtype=torch.int32, device=device)
    q, kn, vn = (torch.randn(B, Lq, H, D, dtype=dtype, device=device) for _ in range(3))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    o = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)
    assert fl.last_backend("attention_with_kvcache") == backend
    o_ref = fl.attention_with_kvcache(q.double(), kc_ref.double(), vc_ref.double(), lens, kn.double(), vn.double(),
                                      backend="torch")
    for b, L in enumerate(lens.tolist()):
        kc_ref[b, L:L + Lq], vc_ref[b, L:L + Lq] = kn[b], vn[b]
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert_close_rule(o, o_ref, None, factor=0, floor=1e-4 if dtype == torch.float32 else 4e-3)


# ----------------------------------------------------------------------------- validation
def test_errors_name_the_argument():
    q, k, v = _qkv(2, 4, 6, 2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="k: expected shape"):
        fl.attention(q, torch.randn(2, 6, 3, 8), v)
    with pytest.raises(ValueError, match="v: expected k's shape"):
        fl.attention(q, k, torch.randn(2, 5, 2, 8))
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        fl.attention(q[0], k, v)
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
        fl.attention(q, k, v, key_padding_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        fl.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        fl.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="k: expected q's dtype"):
        fl.attention(q, k.half(), v)
    with pytest.raises(fl.BackendUnavailableError, match="'cuda'"):
        fl.attention(q, k, v, backend="cuda")
    kc = torch.randn(2, 8, 2, 8)
    with pytest.raises(ValueError, match="k_cache: too short"):
        fl.attention_with_kvcache(q, kc, kc.clone(), torch.tensor([3, 5], dtype=torch.int32), q, q)
    with pytest.raises(TypeError, match="cache_seqlens: expected an int32 tensor"):
        fl.attention_with_kvcache(q, kc, kc.clone(), torch.tensor([3, 5]))
    with pytest.raises(RuntimeError, match="forward-only"):
        fl.attention_with_kvcache(q.requires_grad_(), kc, kc.clone(), torch.tensor([0, 0], dtype=torch.int32))
    q.requires_grad_(False)
    with pytest.raises(ValueError, match="k_new, v_new"):
        fl.attention_with_kvcache(q, kc, kc.clone(), torch.tensor([0, 0], dtype=torch.int32), q, None)


# ----------------------------------------------------------------------------- custom ops
def test_opcheck():
    q, k, v = _qkv(2, 5, 7, 2, 8, torch.float32, "cpu", grad=True)
    mask = torch.rand(2, 7) > 0.2
    torch.library.opcheck(torch.ops.fastlayers.attention_fwd.default,
                          (q, k, v, mask, None, 0.4, True, 0.0, False, "torch"))
    torch.library.opcheck(torch.ops.fastlayers.attention_fwd.default,
                          (q, k, v, mask, torch.tensor([7, 0]), 0.4, True, 0.3, False, "torch"))
    kc, vc = torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    torch.library.opcheck(torch.ops.fastlayers.attention_with_kvcache.default,
                          (q.detach(), kc, vc, torch.tensor([2, 4], dtype=torch.int32), k.detach()[:, :5],
                           v.detach()[:, :5], 0.4, True, "torch"))


def test_torch_compile_fullgraph_with_dropout():
    def f(q, k, v):
        return fl.attention(q, k, v, causal=True, dropout_p=0.1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(1, 6, 6, 2, 8, torch.float32, "cpu", grad=True)
    a = compiled(q, k, v)
    b = compiled(q, k, v)
    assert not torch.equal(a, b), "a compiled graph must draw a fresh dropout mask per call"
    g = torch.autograd.grad(a, (q, k, v))
    assert all(torch.isfinite(t).all() for t in g)
    f0 = torch.compile(lambda q, k, v: fl.attention(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(f0(q, k, v), naive_attention(q, k, v, True).float(), rtol=1e-5, atol=1e-5)


def test_torch_compile_kvcache_fullgraph():
    f = torch.compile(lambda q, kc, vc, lens, kn, vn: fl.attention_with_kvcache(q, kc, vc, lens, kn, vn),
                      fullgraph=True, backend="aot_eager")
    B, Lmax, H, D = 2, 16, 2, 8
    kc, vc = torch.randn(B, Lmax, H, D), torch.randn(B, Lmax, H, D)
    kc2, vc2 = kc.clone(), vc.clone()
    lens = torch.tensor([3, 9], dtype=torch.int32)
    q, kn, vn = (torch.randn(B, 1, H, D) for _ in range(3))
    o = f(q, kc, vc, lens, kn, vn)
    o_ref = fl.attention_with_kvcache(q, kc2, vc2, lens, kn, vn, backend="torch")
    torch.testing.assert_close(o, o_ref)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_nn_self_attention_module():
    torch.manual_seed(0)
    m = fl.nn.MultiheadSelfAttention(16, 4, causal=True, dropout=0.5).eval()
    x = torch.randn(2, 5, 16)
    y = m(x, residual=x)
    qkv = x @ m.qkv_proj.weight.T + m.qkv_proj.bias
    q, k, v = qkv.view(2, 5, 3, 4, 4).unbind(2)
    ref = naive_attention(q, k, v, causal=True).float().reshape(2, 5, 16) @ m.out_proj.weight.T + m.out_proj.bias + x
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_decode_step_captures_in_a_cuda_graph(backend):
    # A decode step through the public op is graph-capturable: lengths stay on the device, the host
    # check is skipped while capturing, and replays with new lengths write and read the right rows.
    B, Lmax, H, D = 4, 2048, 8, 128
    dev, dt = "cuda", torch.float16
    kc, vc = torch.randn(B, Lmax, H, D, device=dev, dtype=dt), torch.randn(B, Lmax, H, D, device=dev, dtype=dt)
    lens = torch.tensor([0, 5, 700, 2000], dtype=torch.int32, device=dev)
    q, kn, vn = (torch.randn(B, 1, H, D, device=dev, dtype=dt) for _ in range(3))
    with torch.no_grad():
        fl.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn, backend=backend)  # warm-up/compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)
        for step in range(3):
            q.copy_(torch.randn_like(q))
            kn.copy_(torch.randn_like(kn))
            vn.copy_(torch.randn_like(vn))
            kc_ref, vc_ref = kc.double(), vc.double()
            graph.replay()
            o_ref = fl.attention_with_kvcache(q.double(), kc_ref, vc_ref, lens, kn.double(), vn.double(),
                                              backend="torch")
            assert torch.equal(kc, kc_ref.to(dt)) and torch.equal(vc, vc_ref.to(dt))
            assert_close_rule(out, o_ref, None, factor=0, floor=4e-3, what=f"step {step}")
            lens += 1
