"""Issue 8, attention op layer (fl.attention, fl.attention_with_kvcache): graph-safe dropout state,
no host sync in eager decode, unused cache slots and padded keys that hold NaN / inf, the native
SDPA torch backend (eager and traced), tensor views, in-place edits of outputs, torch.autocast, and
the layout / polarity hints of the errors. Expected values: float64 compositions written here (or
the float64 reference `attention_ref`, for dropout) on fresh random inputs."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastlayers as fl
from fastlayers.kernels.philox import dropout_keep_mask
from fastlayers.ops import attention as A
from backends_matrix import kernel_backend_cases
from conftest import HAS_CUDA
from helpers import attention_f64 as naive
from helpers import assert_close_rule

BACKENDS = [pytest.param("torch", "cpu", id="torch")] + kernel_backend_cases()
if HAS_CUDA:
    BACKENDS.append(pytest.param("torch", "cuda", marks=pytest.mark.gpu, id="torch-gpu"))
# What torch.empty may leave in a slot: NaN, inf, and finite values whose scores overflow (inf - inf)
POISON = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38)


def _dt(device):
    return torch.float32 if device == "cpu" else torch.float16


def _floor(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def _gfloor(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]


def _qkv(B, Lq, Lk, H, D, dtype, device, grad=False):
    return [torch.randn(B, L, H, D, dtype=dtype, device=device).requires_grad_(grad) for L in (Lq, Lk, Lk)]


def _poison_rows(t, hide, gen_vals=POISON):
    """t (B, L, H, D) with the rows where hide (B, L) is True filled with NaN / +inf / -inf in turn."""
    t = t.detach().clone()
    rows = hide.nonzero().tolist()
    for n, (b, j) in enumerate(rows):
        t[b, j] = gen_vals[n % len(gen_vals)]
    return t


def _state(seed, offset=0, device="cpu"):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# ===================================================================================== dropout state
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_state_is_drawn_by_torch_generator_of_q_device(backend, device):
    """The op's rng_state is torch.randint(0, 2**62) on q's device, offset 0: torch.manual_seed
    reproduces it and the mask equals the spec for exactly that state."""
    dt = _dt(device)
    q, k, v = _qkv(2, 7, 9, 2, 16, dt, device)
    torch.manual_seed(1234)
    o = fl.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    torch.manual_seed(1234)
    state = F.pad(torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device), (0, 1))
    keep = dropout_keep_mask(state, 2, 2, 7, 9, device, 0.3)
    assert_close_rule(o, naive(q, k, v, True, keep=keep, p=0.3), None, factor=0, floor=_floor(dt))
    o2 = fl.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    assert not torch.equal(o, o2), "each call draws a new state"


LAUNCHERS = ["ref", "torch_native"] + [pytest.param("triton", marks=c.marks) for c in kernel_backend_cases()
                                       if c.values[1] == "cpu"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_dropout_mask_follows_the_state_tensor_not_the_call(launcher):
    """One state tensor, rewritten in place between two calls (what a CUDA graph replay does after
    torch's generator redraws it): the second call's mask is the new state's, seed and offset."""
    q, k, v = _qkv(2, 5, 11, 2, 16, torch.float32, "cpu")
    state = _state(77)

    def run():
        if launcher == "torch_native":
            return A.attention_torch(q, k, v, None, 0.25, False, 0.4, state)
        mod = A._TorchBackend if launcher == "ref" else A.BACKENDS.module("triton")
        return mod.attention_fwd(q, k, v, None, 0.25, False, 0.4, state)[0]

    o1 = run()
    state.copy_(_state(2**61 + 12345, 3))
    o2 = run()
    for o, st in ((o1, _state(77)), (o2, _state(2**61 + 12345, 3))):
        keep = dropout_keep_mask(st, 2, 2, 5, 11, "cpu", 0.4)
        assert_close_rule(o, naive(q, k, v, scale=0.25, keep=keep, p=0.4), None, factor=0, floor=1e-5)
    assert not torch.equal(o1, o2)


def test_keep_mask_compares_in_float32():
    """The spec compares u >= p with p a Python scalar (no host-to-device copy on CUDA); that must be
    the float32 comparison the kernels make, boundary values included: p just above a grid point
    k * 2^-24 of u rounds onto it in float32, so a float64 comparison would differ there."""
    from fastlayers.kernels.philox import dropout_uniform
    st = _state(987654321123, 5)
    u = dropout_uniform(st, 2, 3, 33, 40, "cpu", 4, 30)
    on_grid = float(u.flatten()[7])
    for p in (0.1, 1 / 3, 0.5, 0.123456789, 0.99, on_grid, on_grid + 2.0 ** -27):
        want = u >= torch.tensor(p, dtype=torch.float32)
        assert torch.equal(dropout_keep_mask(st, 2, 3, 33, 40, "cpu", p, 4, 30), want), p


def test_dropout_state_is_never_read_on_the_host():
    """Meta tensors hold no values: the whole dropout path (state draw, spec mask, forward and
    backward of the torch backend and of the reference launchers) runs on them only if nothing reads
    the state (or any other tensor) on the host."""
    q, k, v = (torch.empty(2, 6, 2, 8, device="meta", requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool, device="meta")
    o = fl.attention(q, k, v, key_padding_mask=mask, causal=True, dropout_p=0.2, backend="torch")
    o.sum().backward()
    assert o.shape == q.shape and q.grad.shape == q.shape
    state = A._draw_rng_state(torch.device("meta"))
    assert state.device.type == "meta" and state.dtype == torch.int64 and state.shape == (2,)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    o, lse = A.attention_ref(qd, kd, vd, mask, 0.3, True, 0.2, state)
    dq, dk, dv = A.attention_ref_bwd(o, qd, kd, vd, o, lse, mask, 0.3, True, 0.2, state, False)
    assert dk.shape == kd.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_replays_the_forward_state(backend, device):
    """Random draws between forward and backward change nothing: the backward uses the saved state."""
    dt = _dt(device)
    q, k, v = _qkv(1, 6, 8, 2, 16, dt, device, grad=True)
    mask = torch.tensor([[True, False, True, True, True, False, True, True]], device=device)
    torch.manual_seed(99)
    o = fl.attention(q, k, v, key_padding_mask=mask, dropout_p=0.35, backend=backend)
    torch.manual_seed(99)
    keep = dropout_keep_mask(A._draw_rng_state(torch.device(device)), 1, 2, 6, 8, device, 0.35)
    torch.rand(1000, device=device)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = naive(q, k, v, mask=mask, keep=keep, p=0.35)
    refs = torch.autograd.grad(ref, (q, k, v), do.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close_rule(g, r, None, factor=0, floor=_gfloor(dt), what=name)


@pytest.mark.parametrize("backend", ["torch"] + [pytest.param("triton", marks=c.marks) for c in kernel_backend_cases()
                                                 if c.values[1] == "cpu"])
def test_compiled_dropout_draws_per_call_and_follows_manual_seed(backend):
    torch._dynamo.reset()
    q, k, v = _qkv(1, 5, 5, 2, 16, torch.float32, "cpu", grad=True)
    f = torch.compile(lambda q, k, v: fl.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend),
                      fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    a = f(q, k, v)
    b = f(q, k, v)
    torch.manual_seed(5)
    a2 = f(q, k, v)
    torch.manual_seed(5)
    eager = fl.attention(q, k, v, causal=True, dropout_p=0.3, backend=backend)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    torch.testing.assert_close(a, eager, rtol=1e-6, atol=1e-6)
    do = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(a, (q, k, v), do), torch.autograd.grad(eager, (q, k, v), do),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_dropout_in_a_cuda_graph_draws_a_fresh_mask_per_replay(backend, monkeypatch):
    """A captured training step (forward + backward with dropout) replays with a new state each time;
    each replay's output and dq equal the reference for the state the replay drew."""
    if backend == "cuda" and fl.available_backends()["cuda"]["reason"]:
        pytest.skip(fl.available_backends()["cuda"]["reason"])
    drawn = []
    draw = A._draw_rng_state
    monkeypatch.setattr(A, "_draw_rng_state", lambda device: drawn.append(draw(device)) or drawn[-1])
    dev, dt = "cuda", torch.float16
    q, k, v = _qkv(2, 64, 64, 4, 64, dt, dev, grad=True)
    do = torch.randn(2, 64, 4, 64, device=dev, dtype=dt)

    def step():
        o = fl.attention(q, k, v, causal=True, dropout_p=0.2, backend=backend)
        (q.grad,) = torch.autograd.grad(o, (q,), do)
        return o

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    state = drawn[-1]
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        st = state.clone()
        seen.append(out.clone())
        keep = dropout_keep_mask(st, 2, 4, 64, 64, dev, 0.2)
        ref = naive(q, k, v, True, keep=keep, p=0.2)
        assert_close_rule(out, ref, None, factor=0, floor=4e-3, what="o")
        (dq_ref,) = torch.autograd.grad(ref, (q,), do.double())
        assert_close_rule(q.grad, dq_ref, None, factor=0, floor=3e-2, what="dq")
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_eager_calls_never_sync(backend, monkeypatch):
    """Eager decode (each layer, each token) and a dropout training step never wait on the GPU."""
    if backend == "cuda" and fl.available_backends()["cuda"]["reason"]:
        pytest.skip(fl.available_backends()["cuda"]["reason"])
    monkeypatch.delenv(A.CHECK_LENGTHS_ENV, raising=False)
    dev, dt = "cuda", torch.float16
    B, Lmax, H, D = 3, 256, 4, 64
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dt) for _ in range(2))
    lens = torch.tensor([[5, 0], [100, 0], [200, 0]], dtype=torch.int32, device=dev)[:, 0]  # a strided view
    q1, k1, v1 = (torch.randn(B, 1, H, D, device=dev, dtype=dt) for _ in range(3))
    q, k, v = _qkv(2, 32, 40, 4, 64, dt, dev, grad=True)
    mask = torch.rand(2, 40, device=dev) > 0.2

    def calls():
        with torch.no_grad():
            fl.attention_with_kvcache(q1, kc, vc, lens, k1, v1, backend=backend)
        o = fl.attention(q, k, v, key_padding_mask=mask, dropout_p=0.1, backend=backend)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    calls()  # warm-up: compile, load, allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_bad_cache_lengths_nan_rows_or_checked_on_request(backend, monkeypatch):
    if backend == "cuda" and fl.available_backends()["cuda"]["reason"]:
        pytest.skip(fl.available_backends()["cuda"]["reason"])
    dev, dt = "cuda", torch.float16
    B, Lmax, H, D, Lq = 3, 64, 2, 64, 2
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dt) for _ in range(2))
    q, kn, vn = (torch.randn(B, Lq, H, D, device=dev, dtype=dt) for _ in range(3))
    lens = torch.tensor([-1, 10, Lmax - 1], dtype=torch.int32, device=dev)
    kc0, vc0 = kc.clone(), vc.clone()
    monkeypatch.delenv(A.CHECK_LENGTHS_ENV, raising=False)
    o = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)
    assert torch.isnan(o[0]).all() and torch.isnan(o[2]).all() and not torch.isnan(o[1]).any()
    assert torch.equal(kc[0], kc0[0]) and torch.equal(kc[2], kc0[2]) and torch.equal(vc[2], vc0[2])
    assert torch.equal(kc[1, 10:12], kn[1])
    monkeypatch.setenv(A.CHECK_LENGTHS_ENV, "1")
    with pytest.raises(ValueError, match="cache_seqlens"):
        fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)


# ===================================================================================== unused cache slots
def _kv_case(B, Lmax, H, D, Lq, lens, with_new, dtype=torch.float32, device="cpu"):
    kc, vc = (torch.randn(B, Lmax, H, D, dtype=dtype, device=device) for _ in range(2))
    q, kn, vn = (torch.randn(B, Lq, H, D, dtype=dtype, device=device) for _ in range(3))
    n_new = Lq if with_new else 0
    used = torch.arange(Lmax)[None, :] < (torch.tensor(lens)[:, None] + n_new)   # (B, Lmax) after the append
    if with_new:  # the rows the op writes may hold garbage before the call too
        used_before = torch.arange(Lmax)[None, :] < torch.tensor(lens)[:, None]
    else:
        used_before = used
    kc_p, vc_p = _poison_rows(kc, ~used_before.to(device)), _poison_rows(vc, ~used_before.to(device))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, kc, vc, kc_p, vc_p, lens_t, (kn if with_new else None), (vn if with_new else None), used


def _kv_expected(q, kc, vc, lens, kn, vn, causal, scale):
    """float64 per batch row: clean caches (+ the new rows), keys 0 .. len + Lq_new - 1."""
    B, Lq = q.shape[:2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b, n in enumerate(lens.tolist()):
        ek, ev = kc[b].clone(), vc[b].clone()
        if kn is not None:
            ek[n:n + Lq], ev[n:n + Lq] = kn[b], vn[b]
            n += Lq
        out[b:b + 1] = naive(q[b:b + 1], ek[None, :n], ev[None, :n], causal, scale=scale)
    return out


KV_PATHS = ["ref", "torch", "torch_device", "torch_compiled"] + [
    pytest.param("triton", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"] + [
    pytest.param("triton_compiled", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"]


def _run_kv(path, q, kc, vc, lens, kn, vn, causal, scale):
    if path == "ref":  # the float64-capable reference of the decode step
        return A.attention_with_kvcache_ref(q, kc, vc, lens, kn, vn, scale, causal)
    if path == "torch_device":  # the no-host-read composition that CUDA tensors and torch.compile run
        return A._kvcache_torch_device(q, kc, vc, lens, kn, vn, scale, causal)
    if path.endswith("_compiled"):
        torch._dynamo.reset()
        f = torch.compile(lambda *a: fl.attention_with_kvcache(*a, causal=causal, softmax_scale=scale,
                                                               backend=path.split("_")[0]),
                          fullgraph=True, backend="aot_eager")
        return f(q, kc, vc, lens, kn, vn)
    return fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, causal=causal, softmax_scale=scale, backend=path)


@pytest.mark.parametrize("path", KV_PATHS)
@pytest.mark.parametrize("lens,Lq,with_new,causal", [
    ([4, 4], 1, True, True),          # equal lengths: one batched call
    ([0, 9, 3], 1, True, True),       # different lengths: one call per row on the CPU
    ([2, 7], 3, True, True),          # a causal block of new rows
    ([5, 0, 1], 3, False, True),      # no append: rows with fewer keys than queries -> zero rows
    ([6, 2], 2, False, False),
])
def test_kvcache_unused_slots_never_affect_the_output(path, lens, Lq, with_new, causal):
    """Slots at or past each row's length (after the append) hold NaN / inf, as torch.empty may
    leave them: the output equals the float64 result on clean caches, the new rows are written and
    every other slot is left bit for bit."""
    if path == "triton_compiled" and lens != [2, 7]:
        pytest.skip("the interpreter is slow: one compiled Triton case (the custom op path) is enough")
    B, Lmax, H, D = len(lens), 12, 2, 16
    q, kc, vc, kc_p, vc_p, lens_t, kn, vn, used = _kv_case(B, Lmax, H, D, Lq, lens, with_new)
    expect = _kv_expected(q, kc, vc, lens_t, kn, vn, causal, 0.3)
    kc_w, vc_w = kc_p.clone(), vc_p.clone()
    with torch.no_grad():
        o = _run_kv(path, q, kc_w, vc_w, lens_t, kn, vn, causal, 0.3)
    assert_close_rule(o, expect, None, factor=0, floor=1e-5)
    kc_e, vc_e = kc_p.clone(), vc_p.clone()
    if with_new:
        for b, n in enumerate(lens):
            kc_e[b, n:n + Lq], vc_e[b, n:n + Lq] = kn[b], vn[b]
    torch.testing.assert_close(kc_w, kc_e, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc_w, vc_e, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("poison,calls", [("none", 1), ("past_longest", 1), ("inside_window", 3)])
def test_kvcache_cpu_one_sdpa_unless_the_key_window_holds_nonfinite_slots(poison, calls):
    """CPU, rows of different lengths: one masked SDPA over keys 0 .. longest - 1 when the unused
    slots inside that window are finite (slots past it are never read); one SDPA per row when they
    are not (a masked key's 0 weight times NaN is NaN)."""
    lens, Lq, Lmax, H, D = [2, 7, 4], 1, 12, 2, 8
    q, kc, vc, _, _, lens_t, kn, vn, _ = _kv_case(3, Lmax, H, D, Lq, lens, True)
    expect = _kv_expected(q, kc, vc, lens_t, kn, vn, True, 0.3)
    if poison != "none":
        kc[:, 8:], vc[:, 8:] = float("nan"), float("inf")
    if poison == "inside_window":
        vc[0, 5] = float("-inf")
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention",
                                            wraps=F.scaled_dot_product_attention) as sdpa:
        o = fl.attention_with_kvcache(q, kc, vc, lens_t, kn, vn, softmax_scale=0.3, backend="torch")
    assert sdpa.call_count == calls
    assert_close_rule(o, expect, None, factor=0, floor=1e-5)


KV_NOCHECK_PATHS = ["ref", "torch_device"] + [
    pytest.param("triton_launcher", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"]


@pytest.mark.parametrize("path", KV_NOCHECK_PATHS)
def test_kvcache_bad_lengths_write_nothing_and_give_nan_rows(path):
    """Where no host check runs (CUDA tensors; here the launchers and the device-tensor path): a row
    with len < 0 or len + Lq > Lmax is not written and its output rows are NaN; the other rows are
    exact."""
    B, Lmax, H, D, Lq = 4, 10, 2, 16, 2
    lens = [-1, 3, 9, 8]  # bad, good, bad (9 + 2 > 10), good (8 + 2 == 10)
    kc, vc = (torch.randn(B, Lmax, H, D) for _ in range(2))
    q, kn, vn = (torch.randn(B, Lq, H, D) for _ in range(3))
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kc_w, vc_w = kc.clone(), vc.clone()
    with torch.no_grad():
        if path == "triton_launcher":
            o = A.BACKENDS_KV.module("triton").attention_with_kvcache(q, kc_w, vc_w, lens_t, kn, vn, 0.25, True)
        else:
            o = _run_kv(path, q, kc_w, vc_w, lens_t, kn, vn, True, 0.25)
    for b in (0, 2):
        assert torch.isnan(o[b]).all(), f"row {b}"
        assert torch.equal(kc_w[b], kc[b]) and torch.equal(vc_w[b], vc[b]), f"row {b} written"
    good = torch.tensor([1, 3])
    expect = _kv_expected(q[good], kc[good], vc[good], lens_t[good], kn[good], vn[good], True, 0.25)
    assert_close_rule(o[good], expect, None, factor=0, floor=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_kvcache_bad_lengths_raise_for_cpu_tensors(compiled):
    """CPU tensors are checked on the host (free there), under torch.compile too (inside the op)."""
    kc = torch.randn(2, 10, 2, 8)
    q = torch.randn(2, 2, 2, 8)
    f = fl.attention_with_kvcache
    if compiled:
        f = torch.compile(lambda *a: fl.attention_with_kvcache(*a), backend="aot_eager", fullgraph=True)
    for lens, arg in (([-1, 0], "cache_seqlens"), ([3, 9], "k_cache")):
        kc_w = kc.clone()
        with pytest.raises(ValueError, match=arg):
            f(q, kc_w, kc_w.clone(), torch.tensor(lens, dtype=torch.int32), q, q)
        assert torch.equal(kc_w, kc), "nothing may be written before the error"


# ===================================================================================== padded keys
ATTN_PATHS = ["torch", "torch_compiled", "torch_custom_op"] + [
    pytest.param("triton", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"] + [
    pytest.param("triton_compiled", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"]


def _run_attn(path, q, k, v, mask, causal, p=0.0):
    backend = path.split("_")[0]
    if path == "torch_custom_op":  # what the automatic fallback to torch runs for CUDA tensors: the reference
        state = A._draw_rng_state(q.device) if p > 0 else None
        o, _ = torch.ops.fastlayers.attention_fwd(q, k, v, mask, state, 0.4, causal, p, False, "torch")
        return o
    if path.endswith("_compiled"):
        torch._dynamo.reset()
        f = torch.compile(lambda q, k, v, m: fl.attention(q, k, v, key_padding_mask=m, causal=causal,
                                                          softmax_scale=0.4, dropout_p=p, backend=backend),
                          fullgraph=True, backend="aot_eager")
        return f(q, k, v, mask)
    return fl.attention(q, k, v, key_padding_mask=mask, causal=causal, softmax_scale=0.4, dropout_p=p,
                        backend=backend)


@pytest.mark.parametrize("path", ATTN_PATHS)
@pytest.mark.parametrize("causal,Lq,p", [(False, 6, 0.0), (True, 6, 0.0), (True, 11, 0.0), (False, 6, 0.3)])
def test_padded_keys_never_affect_outputs_or_gradients(path, causal, Lq, p):
    """k / v rows hidden by key_padding_mask hold NaN / inf: the output and the gradients equal the
    float64 result on clean rows, their dk / dv are exactly 0, and a batch row with no key (and, with
    Lq > Lk causal, rows above the diagonal) gets zeros and zero gradients."""
    if path == "triton_compiled" and (causal, Lq, p) not in ((True, 11, 0.0), (False, 6, 0.3)):
        pytest.skip("the interpreter is slow: the compiled Triton path runs the two hardest cases")
    B, Lk, H, D = 3, 8, 2, 16
    q, k, v = _qkv(B, Lq, Lk, H, D, torch.float32, "cpu")
    mask = torch.rand(B, Lk) > 0.4
    mask[0, 0], mask[1, -1] = False, True
    mask[2] = False  # no key at all
    kp = _poison_rows(k, ~mask).requires_grad_()
    vp = _poison_rows(v, ~mask).requires_grad_()
    qg = q.clone().requires_grad_()
    state = torch.get_rng_state()
    o = _run_attn(path, qg, kp, vp, mask, causal, p)
    keep = None
    if p > 0:
        torch.set_rng_state(state)
        keep = dropout_keep_mask(A._draw_rng_state(torch.device("cpu")), B, H, Lq, Lk, "cpu", p)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive(qr, kr, vr, causal, mask, 0.4, keep, p)
    assert_close_rule(o, ref, None, factor=0, floor=1e-5)
    assert torch.equal(o[2], torch.zeros_like(o[2]))
    do = torch.randn(o.shape, dtype=torch.float64)
    grads = torch.autograd.grad(o, (qg, kp, vp), do.float())
    refs = torch.autograd.grad(ref, (qr, kr, vr), do)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close_rule(g, r, None, factor=0, floor=2e-4, what=name)
    for name, g in zip(("dk", "dv"), grads[1:]):
        assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), f"{name} of padded keys"
    assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))


@pytest.mark.parametrize("op", ["attention", "kvcache"])
def test_hidden_keys_finite_but_overflowing_are_harmless(op):
    """Finite garbage is not harmless either: a hidden key of 3e38 overflows its score to inf, and
    SDPA's additive mask turns inf - inf into NaN. The CPU fast path (use k, v as they are when the
    hidden rows are harmless) must see that."""
    B, L, H, D = 2, 9, 2, 8
    q, k, v = _qkv(B, L if op == "attention" else 1, L, H, D, torch.float32, "cpu")
    if op == "attention":
        mask = torch.rand(B, L) > 0.3
        mask[:, 0] = True
        kp = _poison_rows(k, ~mask, (3e38, -3e38))
        o = fl.attention(q, kp, v, key_padding_mask=mask, backend="torch")
        assert_close_rule(o, naive(q, k, v, mask=mask), None, factor=0, floor=1e-5)
    else:
        lens = torch.tensor([3, 6], dtype=torch.int32)
        kp = _poison_rows(k, torch.arange(L)[None, :] >= lens[:, None], (3e38, -3e38))
        with torch.no_grad():
            o = fl.attention_with_kvcache(q, kp, v.clone(), lens, backend="torch")
        assert_close_rule(o, _kv_expected(q, k, v, lens, None, None, True, None), None, factor=0, floor=1e-5)


# ===================================================================================== the fast CPU path
def test_torch_backend_is_sdpa_with_native_autograd():
    """Eager: one F.scaled_dot_product_attention call, no custom autograd.Function; is_causal for a
    square causal call without padding, a bool mask otherwise (and for ragged decode lengths)."""
    q, k, v = _qkv(2, 6, 6, 2, 8, torch.float32, "cpu", grad=True)
    mask = torch.rand(2, 6) > 0.3
    mask[:, 0] = True
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as sdpa:
        o = fl.attention(q, k, v, causal=True, backend="torch")
        assert sdpa.call_count == 1 and sdpa.call_args.kwargs["is_causal"] is True
        assert sdpa.call_args.kwargs["attn_mask"] is None
        o2 = fl.attention(q, k, v, causal=True, key_padding_mask=mask, backend="torch")
        assert sdpa.call_count == 2 and sdpa.call_args.kwargs["attn_mask"].dtype == torch.bool
        with torch.no_grad():
            kc = torch.randn(2, 10, 2, 8)
            fl.attention_with_kvcache(q[:, :1], kc, kc.clone(), torch.tensor([3, 7], dtype=torch.int32),
                                      backend="torch")
        assert sdpa.call_count == 3
    for out in (o, o2):
        assert "AttentionFn" not in type(out.grad_fn).__name__
    assert_close_rule(o2, naive(q, k, v, True, mask), None, factor=0, floor=1e-5)


@pytest.mark.parametrize("op", ["attention", "kvcache"])
def test_compiled_torch_backend_graph(op):
    """fl.attention traces the native SDPA composition; the decode step keeps its custom op, whose
    CPU composition reads the lengths on the host (not traceable; the masked form is 10x slower)."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = _qkv(2, 5, 5, 2, 8, torch.float32, "cpu", grad=op == "attention")
    if op == "attention":
        f = torch.compile(lambda q, k, v: fl.attention(q, k, v, causal=True, key_padding_mask=torch.ones(
            2, 5, dtype=torch.bool)), backend=capture, fullgraph=True)
        f(q, k, v)
    else:
        kc = torch.randn(2, 9, 2, 8)
        f = torch.compile(lambda q, kc, vc, lens: fl.attention_with_kvcache(q, kc, vc, lens, q, q),
                          backend=capture, fullgraph=True)
        f(q[:, :1], kc, kc.clone(), torch.tensor([1, 4], dtype=torch.int32))
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    if op == "attention":
        assert F.scaled_dot_product_attention in targets
        assert not any("fastlayers" in str(t) for t in targets)
    else:
        assert torch.ops.fastlayers.attention_with_kvcache.default in targets or \
            torch.ops.fastlayers.attention_with_kvcache in targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,Lk,causal,masked", [
    (2, 7, 13, True, True), (2, 13, 7, True, False), (1, 1, 9, True, True), (2, 5, 0, False, False),
    (2, 0, 5, True, True), (0, 3, 3, False, False), (3, 4, 4, False, True)])
def test_torch_backend_awkward_shapes(dtype, B, Lq, Lk, causal, masked):
    q, k, v = _qkv(B, Lq, Lk, 3, 8, dtype, "cpu", grad=True)
    mask = None
    if masked:
        mask = torch.rand(B, Lk) > 0.4
        if B > 1:
            mask[1] = False
    o = fl.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="torch")
    assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    ref = naive(q, k, v, causal, mask)
    low = naive(q, k, v, causal, mask).to(dtype) if dtype == torch.float64 else _low(q, k, v, causal, mask)
    assert_close_rule(o, ref, low, floor=_floor(dtype))
    if o.numel():
        do = torch.randn(o.shape, dtype=torch.float64)
        grads = torch.autograd.grad(o, (q, k, v), do.to(dtype), allow_unused=True)
        refs = torch.autograd.grad(ref, (q, k, v), do, allow_unused=True)
        for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
            if g is None or r is None:  # no key: k and v take no part (zero-size anyway)
                assert all(t is None or t.numel() == 0 or not t.any() for t in (g, r)), name
                continue
            assert_close_rule(g, r, None, factor=0, floor=_gfloor(dtype) * 4, what=name)


def _low(q, k, v, causal, mask):
    """torch's own error at the low dtype: softmax(q k^T) v composed in that dtype."""
    q, k, v = (t.detach().transpose(1, 2) for t in (q, k, v))                      # (B, H, L, D)
    Lq, Lk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(q.shape[0], 1, Lq, Lk, dtype=torch.bool)
    if causal:
        allowed &= torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq
    if mask is not None:
        allowed &= mask[:, None, None, :]
    pr = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (pr @ v).transpose(1, 2)


# ===================================================================================== views
def _lens_views(lens):
    n = len(lens)
    t = torch.tensor(lens, dtype=torch.int32)
    return {
        "stride2": torch.stack([t, torch.full_like(t, 1000)], 1)[:, 0],           # a column of a matrix
        "step2": torch.stack([t, t + 3], 1).reshape(-1)[::2],
        "offset": torch.cat([torch.tensor([77], dtype=torch.int32), t])[1:],
        "expand": torch.tensor([lens[0]], dtype=torch.int32).expand(n) if len(set(lens)) == 1 else None,
    }


@pytest.mark.parametrize("path", ["torch", "torch_compiled"] + [
    pytest.param("triton", marks=c.marks) for c in kernel_backend_cases() if c.values[1] == "cpu"])
@pytest.mark.parametrize("view", ["stride2", "step2", "offset", "expand"])
def test_cache_seqlens_views(path, view):
    """The issue's example: lengths [[3, 11], [9, 2]][:, 0] = [3, 9] (stride 2) must attend 3 and 9
    keys; also a stride-2 slice, a storage offset and an expanded (stride 0) tensor."""
    lens = [3, 3] if view == "expand" else [3, 9]
    lens_t = _lens_views(lens)[view]
    assert lens_t.tolist() == lens and (lens_t.stride(0) != 1 or lens_t.storage_offset() > 0)
    B, Lmax, H, D, Lq = 2, 14, 2, 16, 1
    q, kc, vc, kc_p, vc_p, _, kn, vn, _ = _kv_case(B, Lmax, H, D, Lq, lens, True)
    expect = _kv_expected(q, kc, vc, torch.tensor(lens, dtype=torch.int32), kn, vn, True, 0.3)
    with torch.no_grad():
        o = _run_kv(path, q, kc_p, vc_p, lens_t, kn, vn, True, 0.3)
    assert_close_rule(o, expect, None, factor=0, floor=1e-5)
    for b, n in enumerate(lens):
        assert torch.equal(kc_p[b, n], kn[b, 0])


def _mask_views(mask):
    B, Lk = mask.shape
    return {
        "step2": torch.stack([mask, ~mask], -1).reshape(B, 2 * Lk)[:, ::2],
        "column_major": mask.t().contiguous().t(),                                # stride (1, B)
        "offset": torch.cat([torch.zeros(1, Lk, dtype=torch.bool), mask])[1:],
        "expand": mask[:1].expand(B, Lk),                                          # stride 0 on the batch
    }


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("view", ["step2", "column_major", "offset", "expand", "qkv_views"])
def test_views_of_mask_and_inputs(backend, device, view):
    dt = _dt(device)
    B, L, H, D = 3, 9, 2, 16
    mask = torch.rand(B, L, device=device) > 0.3
    mask[:, 0] = True
    if view == "qkv_views":
        # k, v: a storage offset, an expanded (stride 0) batch and a strided last-but-one dim; q packed
        q = torch.randn(B, L, 3, H, D, dtype=dt, device=device)[:, :, 1]
        k = torch.randn(1 + B * L * H * D, dtype=dt, device=device)[1:].view(B, L, H, D)
        v = torch.randn(1, L, H, D, dtype=dt, device=device).expand(B, L, H, D)
        m = mask
    else:
        q, k, v = _qkv(B, L, L, H, D, dt, device)
        m = _mask_views(mask if view != "expand" else mask[:1].expand(B, L).contiguous())[view]
        mask = m.contiguous()
    qg, kg, vg = (t.detach().requires_grad_() if t.is_leaf else t for t in (q, k, v))
    leaves = [t for t in (qg, kg, vg) if t.is_leaf and t.requires_grad]
    o = fl.attention(qg, kg, vg, causal=True, key_padding_mask=m, backend=backend)
    ref = naive(q, k, v, True, mask)
    assert_close_rule(o, ref, None, factor=0, floor=_floor(dt))
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, do)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    refs = torch.autograd.grad(naive(qr, kr, vr, True, mask), (qr, kr, vr), do.double())
    for g, r in zip(got, refs):
        assert_close_rule(g, r, None, factor=0, floor=_gfloor(dt))


# ===================================================================================== in-place edits
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5, 1, 16), (2, 1, 3, 16)])  # H == 1 / Lq == 1: where a transpose is contiguous
def test_output_edited_in_place_in_training(backend, device, shape):
    """The output is no view made inside a custom autograd.Function, so in-place edits are allowed
    (no 'is a view and is being modified inplace' error); a backward through the edited output then
    fails the version check exactly as torch's own SDPA does (both save the output)."""
    dt = _dt(device)
    q, k, v = (torch.randn(shape, dtype=dt, device=device, requires_grad=True) for _ in range(3))
    o = fl.attention(q, k, v, causal=True, backend=backend)
    o.add_(1)
    torch.nn.functional.relu(o, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()
    sd = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    sd.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sd.sum().backward()
    # what is not saved for the backward may be edited: a clone, and the value used after the op
    o = fl.attention(q, k, v, causal=True, backend=backend)
    h = o * 2
    h += 1
    h.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_reference_launcher_outputs_are_not_views():
    for shape in ((1, 5, 1, 8), (2, 1, 3, 8), (1, 1, 1, 8)):
        q, k, v = (torch.randn(shape) for _ in range(3))
        o, lse = A.attention_ref(q, k, v, None, 0.3, True, 0.0, None)
        assert o._base is None and lse._base is None


def test_mhsa_output_with_inplace_relu_in_training():
    m = fl.nn.MultiheadSelfAttention(16, 4, causal=True, dropout=0.1).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = torch.nn.ReLU(inplace=True)(m(x))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ===================================================================================== autocast
def _sdpa_autocast(q, k, v, mask, causal):
    allowed = None
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if causal:
        allowed = (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq)[None, None]
    if mask is not None:
        allowed = mask[:, None, None, :] if allowed is None else allowed & mask[:, None, None, :]
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=allowed).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("causal,masked", [(False, True), (True, False)])
def test_autocast_cpu_like_sdpa(dtype, compiled, causal, masked):
    """Under torch.autocast("cpu") fl.attention casts q, k, v as SDPA does: output in the autocast
    dtype, error vs float64 within twice SDPA's own autocast error, fp32 gradients for fp32 leaves."""
    torch._dynamo.reset()
    q, k, v = _qkv(2, 7, 9, 2, 16, torch.float32, "cpu", grad=True)
    mask = torch.rand(2, 9) > 0.3 if masked else None
    if masked:
        mask[:, 0] = True

    def f(q, k, v):
        return fl.attention(q, k, v, causal=causal, key_padding_mask=mask)
    f = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    do = torch.randn(2, 7, 2, 16)
    with torch.autocast("cpu", dtype=dtype):
        o = f(q, k, v)
        sd = _sdpa_autocast(q, k, v, mask, causal)
    assert o.dtype == sd.dtype == dtype
    ref = naive(*(t.to(dtype) for t in (q, k, v)), causal, mask)
    assert_close_rule(o, ref, sd, floor=_floor(dtype))
    grads = torch.autograd.grad(o, (q, k, v), do.to(dtype))
    sgrads = torch.autograd.grad(sd, (q, k, v), do.to(dtype))
    qr, kr, vr = (t.detach().to(dtype).double().requires_grad_() for t in (q, k, v))
    refs = torch.autograd.grad(naive(qr, kr, vr, causal, mask), (qr, kr, vr), do.to(dtype).double())
    for name, g, sg, r in zip(("dq", "dk", "dv"), grads, sgrads, refs):
        assert g.dtype == torch.float32
        assert_close_rule(g, r, sg, floor=_gfloor(dtype), what=name)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_autocast_cpu_kvcache_like_write_then_sdpa(cache_dtype):
    """Under bf16 autocast: q / k_new in fp32. The result is what `cache[rows] = k_new` then SDPA under
    autocast gives: new rows written in the cache's dtype, attention in bf16, output bf16."""
    B, Lmax, H, D, Lq = 2, 12, 2, 16, 1
    kc, vc = (torch.randn(B, Lmax, H, D, dtype=cache_dtype) for _ in range(2))
    q, kn, vn = (torch.randn(B, Lq, H, D) for _ in range(3))
    lens = torch.tensor([4, 9], dtype=torch.int32)
    kc_e, vc_e = kc.clone(), vc.clone()
    for b, n in enumerate(lens.tolist()):
        kc_e[b, n:n + Lq], vc_e[b, n:n + Lq] = kn[b], vn[b]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        o = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn)
        sd = [_sdpa_autocast(q[b:b + 1], kc_e[b:b + 1, :n + Lq], vc_e[b:b + 1, :n + Lq], None, True)
              for b, n in enumerate(lens.tolist())]
    assert o.dtype == torch.bfloat16
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    for b, n in enumerate(lens.tolist()):
        ref = naive(q[b:b + 1].bfloat16(), kc_e[b:b + 1, :n + Lq].bfloat16(), vc_e[b:b + 1, :n + Lq].bfloat16(), True)
        assert_close_rule(o[b:b + 1], ref, sd[b], floor=_floor(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_like_sdpa(backend, dtype):
    if backend == "cuda" and fl.available_backends()["cuda"]["reason"]:
        pytest.skip(fl.available_backends()["cuda"]["reason"])
    q, k, v = _qkv(2, 70, 90, 4, 64, torch.float32, "cuda", grad=True)
    mask = torch.rand(2, 90, device="cuda") > 0.3
    mask[:, 0] = True
    with torch.autocast("cuda", dtype=dtype):
        o = fl.attention(q, k, v, causal=True, key_padding_mask=mask, backend=backend)
        sd = _sdpa_autocast_dev(q, k, v, mask, True)
    assert o.dtype == sd.dtype == dtype
    assert_close_rule(o, naive(*(t.to(dtype) for t in (q, k, v)), True, mask), sd, floor=_floor(dtype))
    g = torch.autograd.grad(o, (q,), torch.ones_like(o))[0]
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    kc, vc = (torch.randn(2, 128, 4, 64, device="cuda", dtype=dtype) for _ in range(2))
    lens = torch.tensor([5, 77], dtype=torch.int32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        o1 = fl.attention_with_kvcache(q[:, :1].detach(), kc, vc, lens, k[:, :1].detach(), v[:, :1].detach(),
                                       backend=backend)
    assert o1.dtype == dtype and torch.isfinite(o1).all()


def _sdpa_autocast_dev(q, k, v, mask, causal):
    dev = q.device
    Lq, Lk = q.shape[1], k.shape[1]
    allowed = (torch.arange(Lk, device=dev)[None, :] <= torch.arange(Lq, device=dev)[:, None] + Lk - Lq)[None, None]
    if not causal:
        allowed = torch.ones_like(allowed)
    allowed = allowed & mask[:, None, None, :]
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=allowed).transpose(1, 2)


# ===================================================================================== errors that teach
def test_errors_point_at_the_layout_and_the_mask_polarity():
    B, L, H, D = 2, 10, 4, 8
    q, k, v = _qkv(B, L, L, H, D, torch.float32, "cpu")
    sdpa_layout = [t.transpose(1, 2) for t in (q, k, v)]                           # (B, H, L, D)
    # cross-attention in SDPA's layout: k's dims no longer line up with q's
    with pytest.raises(ValueError, match=r"\(B, L, H, D\).*transpose\(1, 2\)"):
        fl.attention(sdpa_layout[0], k[:, :7].transpose(1, 2), v[:, :7].transpose(1, 2))
    # self-attention in SDPA's layout with a (B, L) padding mask: the mask matches H, not Lk
    with pytest.raises(ValueError, match=r"were q, k, v passed as \(B, H, L, D\)"):
        fl.attention(*sdpa_layout, key_padding_mask=torch.ones(B, L, dtype=torch.bool))
    # an additive float mask or nn.MultiheadAttention's polarity: the message says True = attend
    with pytest.raises(TypeError, match=r"True = attend.*~mask"):
        fl.attention(q, k, v, key_padding_mask=torch.zeros(B, L))
    kc = torch.randn(B, 16, H, D)
    with pytest.raises(ValueError, match=r"k_cache.*\(B, L, H, D\)"):
        fl.attention_with_kvcache(q[:, :1], kc.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(),
                                  torch.tensor([1, 2], dtype=torch.int32))


def test_docstrings_state_layout_and_polarity():
    for fn in (fl.attention, fl.attention_with_kvcache):
        doc = fn.__doc__
        assert "(B, L, H, D)" in doc and "(B, H, L, D)" in doc
    assert "True = attend" in fl.attention.__doc__ and "nn.MultiheadAttention" in fl.attention.__doc__
    assert "True = attend" in fl.nn.MultiheadSelfAttention.forward.__doc__


@pytest.mark.parametrize("backend,device", kernel_backend_cases())
def test_explicit_kernel_backend_takes_a_strided_head_dim(backend, device):
    """Selection asks the backend about the tensors its launcher gets (a contiguous last dim), so an
    explicit kernel backend runs k with a strided head dim (copied at launch) instead of refusing it."""
    q = torch.randn(1, 4, 2, 8, device=device)
    k = torch.randn(1, 5, 2, 16, device=device)[..., ::2]
    v = torch.randn(1, 5, 2, 8, device=device)
    o = fl.attention(q, k, v, backend=backend)
    assert fl.last_backend("attention") == backend
    ref = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert_close_rule(o, ref, None, floor=1e-5)
