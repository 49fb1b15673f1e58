"""Linear (GEMM + bias + GELU [+ residual]) jobs, forward and backward, TFLOP/s (2*M*N*K forward,
4*M*N*K backward) as a fraction of the measured bf16 GEMM rate. Baselines: torch eager = the
nn.Linear path, F.linear + F.gelu (+ add) (the baseline every row is checked against and the
speed-up reference; its autograd is the backward reference); torch.mm (the plain cuBLAS GEMM of
the same shape, no epilogue: the ceiling, checked against x @ w.T in float32);
torch._addmm_activation (cuBLASLt's fused GELU epilogue -- tanh approximation); torch.compile
default and mode="max-autotune" (the latter left out of --quick: it autotunes for minutes).
On CPU: BERT-base's MLP (768 -> 3072 with GELU, 3072 -> 768 with the residual add), 512 tokens
(128 in --quick).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formulas
from .harness import Job
from .impls import Config, compiled, fl_jobs_spec, randn


def shapes(cfg: Config):
    """(M, K, N, residual)."""
    if not cfg.gpu:
        m = 128 if cfg.quick else 512
        return [(m, 768, 3072, False), (m, 3072, 768, True)]
    if cfg.quick:
        return [(16384, 768, 3072, False), (16384, 3072, 768, True), (8192, 8192, 8192, False)]
    out = []
    for m in (4096, 16384, 32768):
        for k, n in ((768, 3072), (3072, 768), (1024, 4096), (4096, 1024)):
            out.append((m, k, n, False))
            if (k, n) in ((3072, 768), (4096, 1024)):
                out.append((m, k, n, True))
    out.append((8192, 8192, 8192, False))
    return out


def _eager(residual: bool):
    def lin(x, w, b, r=None):
        y = F.gelu(F.linear(x, w, b))                 # (M, N)
        return y + r if residual else y
    return lin


def _fl_build(fn, backend: str):
    def build():
        return lambda d: fn(d["x"], d["w"], d["b"], activation="gelu", residual=d.get("r"), backend=backend)
    return build


def _mm_fp32(d):
    return torch.mm(d["x"].float(), d["w"].float().t())    # (M, N), the plain GEMM's expected result


def jobs(cfg: Config) -> list[Job]:
    out: list[Job] = []
    for M, K, N, residual in shapes(cfg):
        case = {"M": M, "K": K, "N": N, "activation": "gelu", "bias": True, "residual": residual}

        def make(M=M, K=K, N=N, residual=residual):
            d = {"x": randn((M, K), cfg),                       # (M, K)
                 "w": randn((N, K), cfg, K ** -0.5),            # (N, K) as nn.Linear stores it
                 "b": randn((N,), cfg, 0.1)}                    # (N,)
            if residual:
                d["r"] = randn((M, N), cfg)                     # (M, N)
            return d
        for variant in ("fwd", "bwd"):
            work = (formulas.gemm_fwd_flops if variant == "fwd" else formulas.gemm_bwd_flops)(M, N, K)
            common = dict(group="linear", case=case, variant=variant, unit="TFLOP/s", work=work,
                          inputs_key=("linear", M, K, N, residual), make_inputs=make,
                          grad_keys=("x", "w", "b"), peak="gemm")
            eager = _eager(residual)
            call = lambda d, f=eager: f(d["x"], d["w"], d["b"], d.get("r"))  # noqa: E731
            out.append(Job(impl="torch eager", build=lambda c=call: c, is_reference=True,
                           note="F.linear + F.gelu" + (" + r" if residual else ""), **common))
            for name, backend, fn, skip in fl_jobs_spec("linear", cfg):
                out.append(Job(impl=name, build=_fl_build(fn, backend), skip=skip, fl_op="linear",
                               fl_backend=backend, **common))
            if not cfg.gpu:
                continue
            if variant == "fwd":
                out.append(Job(impl="torch.mm", build=lambda: (lambda d: torch.mm(d["x"], d["w"].t())),
                               note="plain cuBLAS GEMM, no epilogue", baseline=_mm_fp32,
                               baseline_name="x @ w.T in float32", **common))
                out.append(_addmm_activation_job(residual, common))
            out.append(Job(impl="torch.compile", build=_compiled_call(eager), **common))
            if cfg.max_autotune:
                out.append(Job(impl="torch.compile max-autotune", build=_compiled_call(eager, mode="max-autotune"),
                               **common))
    return out


def _addmm_activation_job(residual: bool, common) -> Job:
    fn = getattr(torch, "_addmm_activation", None)

    def build():
        if residual:
            return lambda d: fn(d["b"], d["x"], d["w"].t(), use_gelu=True) + d["r"]
        return lambda d: fn(d["b"], d["x"], d["w"].t(), use_gelu=True)
    skip = None if fn is not None else f"not available: torch {torch.__version__} has no _addmm_activation"
    return Job(impl="torch._addmm_activation", build=build, skip=skip,
               note="cuBLASLt GELU epilogue (tanh approximation)" + (" + add" if residual else ""), **common)


def _compiled_call(eager, **kwargs):
    build_fn = compiled(eager, **kwargs)

    def build():
        f = build_fn()
        return lambda d: f(d["x"], d["w"], d["b"], d.get("r"))
    return build
