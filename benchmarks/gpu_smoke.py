"""GPU smoke test: one small case per op x backend x dtype (x CUDA kernel variant), forward and
backward, against the torch reference in float64 -- a whole-library verdict in well under a minute,
before the full `pytest -m gpu` run spends a short lease. Prints one line per case and a summary;
exits 1 if any case fails. Each case runs in a subprocess-free try block, so one broken kernel does
not hide the others (a kernel that corrupts the CUDA context ends the run: the order below puts the
never-run sm_90a variants last).

    python -m fastlayers.bench.gpu_smoke            (on a GPU machine)
"""
from __future__ import annotations

import os
import sys
import time

import torch


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(a.float()).all():
        return float("inf")
    return (a.double() - ref.double()).abs().max().item() / max(1.0, ref.abs().max().item())


def _grads(out, inputs, g):
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


def case_layer_norm(backend, dtype, dev):
    import fastlayers as fl
    x, r = (torch.randn(257, 1000, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1000, device=dev, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(1000, device=dev, dtype=dtype)).requires_grad_()
    y, s = fl.layer_norm(x, w, b, residual=r, backend=backend)
    ran = fl.last_backend("layer_norm")
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    y64, s64 = fl.layer_norm(*ins64[:3], residual=ins64[3], backend="torch")
    g = torch.randn_like(y)
    errs = [_err(y, y64)] + [_err(a, e) for a, e in zip(_grads(y, (x, w, b, r), g),
                                                       _grads(y64, ins64, g.double()))]
    return ran, max(errs)


def case_attention(backend, dtype, dev, D=64, causal=True):
    import fastlayers as fl
    q, k, v = (torch.randn(2, L, 4, D, device=dev, dtype=dtype, requires_grad=True) for L in (197, 300, 300))
    mask = torch.rand(2, 300, device=dev) > 0.2
    o = fl.attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    ran = fl.last_backend("attention")
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = fl.attention(*ins64, causal=causal, key_padding_mask=mask, backend="torch")
    g = torch.randn_like(o)
    errs = [_err(o, o64)] + [_err(a, e) for a, e in zip(_grads(o, (q, k, v), g), _grads(o64, ins64, g.double()))]
    return ran, max(errs)


def case_kvcache(backend, dtype, dev):
    import fastlayers as fl
    B, Lmax, H, D = 3, 4096, 8, 128
    kc, vc = (torch.randn(B, Lmax, H, D, device=dev, dtype=dtype) for _ in range(2))
    kc64, vc64 = kc.double(), vc.double()
    lens = torch.tensor([0, 1000, 4000], dtype=torch.int32, device=dev)
    q, kn, vn = (torch.randn(B, 1, H, D, device=dev, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        o = fl.attention_with_kvcache(q, kc, vc, lens, kn, vn, backend=backend)
        ran = fl.last_backend("attention_with_kvcache")
        o64 = fl.attention_with_kvcache(q.double(), kc64, vc64, lens, kn.double(), vn.double(), backend="torch")
    return ran, _err(o, o64)


def case_linear(backend, dtype, dev, M=1000, K=768, N=3072):
    import fastlayers as fl
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5).requires_grad_()
    b = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(M, N, device=dev, dtype=dtype, requires_grad=True)
    y = fl.linear(x, w, b, activation="gelu", residual=r, backend=backend)
    ran = fl.last_backend("linear")
    ins64 = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    y64 = fl.linear(*ins64[:3], activation="gelu", residual=ins64[3], backend="torch")
    g = torch.randn_like(y)
    errs = [_err(y, y64)] + [_err(a, e) for a, e in zip(_grads(y, (x, w, b, r), g), _grads(y64, ins64, g.double()))]
    return ran, max(errs)


# relative-to-max error above which a case fails (bf16 rounding of one element is 2^-8 = 0.0039)
LIMIT = {torch.float16: 2e-2, torch.bfloat16: 6e-2}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU found")
        return 1
    dev = "cuda"
    print(f"gpu_smoke on {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for backend in ("triton", "cuda"):
            cases += [("layer_norm", backend, dtype, {}, case_layer_norm, None),
                      ("attention D64 causal", backend, dtype, {}, case_attention, None),
                      ("attention D128", backend, dtype, {"D": 128, "causal": False}, case_attention, None),
                      ("kvcache D128", backend, dtype, {}, case_kvcache, None),
                      ("linear gelu+res", backend, dtype, {}, case_linear, None)]
    # never-run sm_90a kernels last: a broken one may poison the CUDA context
    if torch.cuda.get_device_capability() == (9, 0):
        for dtype in (torch.float16, torch.bfloat16):
            cases += [("attention D128 wgmma", "cuda", dtype, {"D": 128, "causal": True}, case_attention,
                       ("FASTLAYERS_CUDA_ATTENTION", "wgmma")),
                      ("linear wgmma", "cuda", dtype, {}, case_linear, ("FASTLAYERS_CUDA_GEMM", "wgmma"))]
    failed = 0
    for name, backend, dtype, kw, fn, env in cases:
        if env:
            os.environ[env[0]] = env[1]
        t0 = time.perf_counter()
        try:
            ran, err = fn(backend, dtype, dev, **kw)
            torch.cuda.synchronize()
            ok = ran == backend and err <= LIMIT[dtype]
            status = "ok" if ok else ("FAIL wrong backend " + str(ran) if ran != backend else "FAIL error")
        except Exception as e:  # report and go on: one line per broken case
            err, status = float("nan"), f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        finally:
            if env:
                del os.environ[env[0]]
        failed += not status.startswith("ok")
        print(f"{name:24s} {backend:7s} {str(dtype).replace('torch.', ''):9s} rel.err {err:9.2e}  "
              f"{time.perf_counter() - t0:6.1f}s  {status}", flush=True)
    print(f"gpu_smoke: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
