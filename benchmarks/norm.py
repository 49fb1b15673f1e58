"""Layer norm / RMSNorm jobs: fwd, bwd and fwd with fused residual, every fastlayers backend against
torch eager (F.layer_norm / F.rms_norm, the baseline every row is checked against and the speed-up
reference), torch.compile of that eager function, and liger-kernel / apex when importable; plus eager
host overhead per call on a tiny tensor. Rates are GB/s with bytes counted by formulas.norm_*_bytes,
as a fraction of the measured copy bandwidth.
Inputs have a non-zero mean (as residual streams do), so LayerNorm and RMSNorm differ by O(1) and
a row that runs the other norm fails its check.
Every closure binds what it uses (rms, residual, backend) as a default argument: a closure over a
loop variable reads its LAST value when the row runs -- which once made every LayerNorm row run RMSNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formulas
from .harness import Job
from .impls import Config, compiled, fl_jobs_spec, optional, randn

EPS = 1e-5


def shapes(cfg: Config):
    """(rows, hidden)."""
    if not cfg.gpu:
        # CPU: BERT-base activations (batch 8 x 128 tokens, or 2 x 128 in --quick), hidden 768
        return [(256, 768)] if cfg.quick else [(1024, 768)]
    if cfg.quick:
        return [(16384, 1024), (16384, 4096)]
    return [(r, h) for r in (4096, 16384) for h in (768, 1024, 2048, 4096, 8192)]


def _eager(rms: bool, residual: bool):
    def ln(x, w, b, r=None):
        s = x + r if residual else x
        y = F.rms_norm(s, (s.shape[-1],), w, EPS) if rms else F.layer_norm(s, (s.shape[-1],), w, b, EPS)
        return (y, s) if residual else y
    return ln


def _note(rms: bool, residual: bool) -> str:
    return ("s = x + r; " if residual else "") + ("F.rms_norm" if rms else "F.layer_norm")


def _inputs(cfg: Config, rows: int, hidden: int, rms: bool, residual: bool):
    def make():
        d = {"x": randn((rows, hidden), cfg, offset=1.0),     # (rows, hidden), mean 1
             "w": 1.0 + 0.1 * randn((hidden,), cfg)}           # (hidden,)
        if not rms:
            d["b"] = 0.1 * randn((hidden,), cfg)               # (hidden,)
        if residual:
            d["r"] = randn((rows, hidden), cfg)               # (rows, hidden)
        return d
    return make


def _fl_build(fn, backend: str, rms: bool):
    def build():
        return lambda d: fn(d["x"], d["w"], d.get("b"), EPS, residual=d.get("r"), rms=rms, backend=backend)
    return build


def jobs(cfg: Config) -> list[Job]:
    out: list[Job] = []
    el = torch.tensor([], dtype=cfg.dtype).element_size()
    liger_ln, liger_why = optional("liger_kernel.ops.layer_norm") if cfg.gpu else (None, None)
    liger_rms, liger_rms_why = optional("liger_kernel.ops.rms_norm") if cfg.gpu else (None, None)
    apex_ln, apex_why = optional("apex.normalization.fused_layer_norm") if cfg.gpu else (None, None)
    for rms in (False, True):
        kind = "rms" if rms else "layer"
        for rows, hidden in shapes(cfg):
            case = {"norm": kind, "rows": rows, "hidden": hidden}
            for variant in ("fwd", "bwd", "fwd_residual"):
                residual = variant == "fwd_residual"
                if variant == "bwd":
                    work = formulas.norm_bwd_bytes(rows, hidden, el, rms=rms, has_bias=not rms)
                else:
                    work = formulas.norm_fwd_bytes(rows, hidden, el, has_bias=not rms, has_residual=residual)
                grad_keys = ("x", "w") if rms else ("x", "w", "b")
                common = dict(group="norm", case=case, variant=variant, unit="GB/s", work=work,
                              inputs_key=("norm", kind, rows, hidden, residual),
                              make_inputs=_inputs(cfg, rows, hidden, rms, residual),
                              grad_keys=grad_keys, peak="bandwidth")
                eager = _eager(rms, residual)
                call_eager = lambda d, f=eager: f(d["x"], d["w"], d.get("b"), d.get("r"))  # noqa: E731
                out.append(Job(impl="torch eager", build=lambda c=call_eager: c, is_reference=True,
                               note=_note(rms, residual), **common))
                for name, backend, fn, skip in fl_jobs_spec("layer_norm", cfg):
                    out.append(Job(impl=name, build=_fl_build(fn, backend, rms), skip=skip, fl_op="layer_norm",
                                   fl_backend=backend, **common))
                if not cfg.gpu:
                    continue
                out.append(Job(impl="torch.compile", build=_compiled_call(eager), **common))
                if not residual:
                    out.append(_liger_job(rms, liger_ln, liger_rms, liger_rms_why if rms else liger_why, common))
                    out.append(_apex_job(rms, apex_ln, apex_why, common))
    out += host_jobs(cfg)
    return out


def _compiled_call(eager):
    build_fn = compiled(eager)

    def build():
        f = build_fn()
        return lambda d: f(d["x"], d["w"], d.get("b"), d.get("r"))
    return build


def _liger_job(rms, liger_ln, liger_rms, why, common) -> Job:
    if rms:
        def build():
            fn = liger_rms.LigerRMSNormFunction.apply
            return lambda d: fn(d["x"], d["w"], EPS)
    else:
        def build():
            fn = liger_ln.LigerLayerNormFunction.apply
            return lambda d: fn(d["x"], d["w"], d["b"], EPS)
    return Job(impl="liger-kernel", build=build, skip=why if (liger_rms if rms else liger_ln) is None else None,
               **common)


def _apex_job(rms, apex_ln, why, common) -> Job:
    if rms:
        def build():
            fn = apex_ln.fused_rms_norm_affine
            return lambda d: fn(d["x"], d["w"], (d["x"].shape[-1],), EPS)
    else:
        def build():
            fn = apex_ln.fused_layer_norm_affine
            return lambda d: fn(d["x"], d["w"], d["b"], (d["x"].shape[-1],), EPS)
    return Job(impl="apex", build=build, skip=why if apex_ln is None else None, **common)


def host_jobs(cfg: Config) -> list[Job]:
    """Eager host time per call on a (1, 64) tensor: what the Python/launch path costs, no grad and
    with grad (the autograd.Function path), next to F.layer_norm's."""
    rows, hidden = 1, 64
    iters = (200 if cfg.quick else 1000) if not cfg.gpu else (1000 if cfg.quick else 3000)
    out = []
    for variant in ("host_nograd", "host_grad"):
        common = dict(group="norm", case={"norm": "layer", "rows": rows, "hidden": hidden}, variant=variant,
                      unit="us/call", work=iters, inputs_key=("norm-host", rows, hidden),
                      make_inputs=_inputs(cfg, rows, hidden, False, False), grad_keys=("x", "w", "b"),
                      timing="host", host_iters=iters)
        out.append(Job(impl="torch eager", build=lambda: (lambda d: F.layer_norm(
            d["x"], (hidden,), d["w"], d["b"], EPS)), is_reference=True, note="F.layer_norm", **common))
        for name, backend, fn, skip in fl_jobs_spec("layer_norm", cfg):
            out.append(Job(impl=name, build=_fl_build(fn, backend, False), skip=skip, fl_op="layer_norm",
                           fl_backend=backend, **common))
    return out
