"""Attention jobs. Training: fwd, bwd, fwd+bwd TFLOP/s (formulas.attention_*_flops) for B*L = 16384,
H*D = 2048, D in {64, 128}, causal and not, against torch eager (F.scaled_dot_product_attention with
its default dispatch: the speed-up reference), SDPA pinned to each backend (flash, efficient, cuDNN;
a backend that refuses the case is an "unsupported" row), torch.compile, and flash-attn when importable.
Decode: one query over a full KV cache, GB/s over the bytes of K and V, against SDPA on the sliced cache.
fastlayers takes (B, L, H, D); SDPA takes (B, H, L, D): it gets transposed views (no copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formulas
from .harness import Job
from .impls import Config, compiled, fl_jobs_spec, optional, randn


def train_shapes(cfg: Config):
    """(B, L, H, D) with B*L = 16384 and H*D = 2048 on a GPU."""
    if not cfg.gpu:
        return [(1, 128, 2, 32)]
    if cfg.quick:
        return [(16, 1024, 32, 64), (4, 4096, 16, 128)]
    return [(16384 // L, L, 2048 // D, D) for D in (64, 128) for L in (512, 1024, 2048, 4096, 8192, 16384)]


def decode_shapes(cfg: Config):
    """(B, cache length, H, D) with H*D = 2048 on a GPU."""
    if not cfg.gpu:
        return [(2, 256, 2, 32)]
    if cfg.quick:
        return [(1, 32768, 16, 128), (16, 8192, 16, 128)]
    return [(b, c, 16, 128) for b in (1, 16, 64) for c in (1024, 8192, 32768)]


def _sdpa(causal: bool):
    def attn(q, k, v):
        # (B, L, H, D) -> (B, H, L, D) views; the output goes back to (B, L, H, D) as a view
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal)
        return o.transpose(1, 2)
    return attn


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return []
    out = []
    for label, attr in (("sdpa[flash]", "FLASH_ATTENTION"), ("sdpa[efficient]", "EFFICIENT_ATTENTION"),
                        ("sdpa[cudnn]", "CUDNN_ATTENTION")):
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            out.append((label, None, f"not available: torch {torch.__version__} has no SDPBackend.{attr}"))
        else:
            out.append((label, (lambda b=backend: sdpa_kernel([b])), None))
    return out


def jobs(cfg: Config) -> list[Job]:
    out: list[Job] = []
    flash, flash_why = optional("flash_attn") if cfg.gpu else (None, None)
    for B, L, H, D in train_shapes(cfg):
        for causal in (False, True):
            case = {"batch": B, "seqlen": L, "heads": H, "head_dim": D, "causal": causal}

            def make(B=B, L=L, H=H, D=D):
                return {n: randn((B, L, H, D), cfg) for n in ("q", "k", "v")}   # (B, L, H, D) each
            for variant in ("fwd", "bwd", "fwd+bwd"):
                flops = {"fwd": formulas.attention_fwd_flops, "bwd": formulas.attention_bwd_flops,
                         "fwd+bwd": formulas.attention_fwdbwd_flops}[variant](B, H, L, L, D, causal)
                common = dict(group="attention", case=case, variant=variant, unit="TFLOP/s", work=flops,
                              inputs_key=("attention", B, L, H, D), make_inputs=make,
                              grad_keys=("q", "k", "v"), peak="gemm")
                eager = _sdpa(causal)
                call = lambda d, f=eager: f(d["q"], d["k"], d["v"])  # noqa: E731
                out.append(Job(impl="torch eager", build=lambda c=call: c, is_reference=True,
                               note="F.scaled_dot_product_attention, default dispatch", **common))
                for name, backend, fn, skip in fl_jobs_spec("attention", cfg):
                    def build(fn=fn, backend=backend, causal=causal):
                        return lambda d: fn(d["q"], d["k"], d["v"], causal=causal, backend=backend)
                    out.append(Job(impl=name, build=build, skip=skip, fl_op="attention", fl_backend=backend,
                                   **common))
                if not cfg.gpu:
                    continue
                for label, ctx, skip in _sdpa_backends():
                    out.append(Job(impl=label, build=lambda c=call: c, context=ctx, skip=skip, **common))
                out.append(Job(impl="torch.compile", build=_compiled_call(eager), **common))

                def build_flash(causal=causal):
                    f = flash.flash_attn_func
                    return lambda d: f(d["q"], d["k"], d["v"], causal=causal)
                out.append(Job(impl="flash-attn", build=build_flash, skip=flash_why if flash is None else None,
                               **common))
    out += decode_jobs(cfg, flash, flash_why)
    return out


def _compiled_call(eager):
    build_fn = compiled(eager)

    def build():
        f = build_fn()
        return lambda d: f(d["q"], d["k"], d["v"])
    return build


def decode_jobs(cfg: Config, flash, flash_why) -> list[Job]:
    out = []
    el = torch.tensor([], dtype=cfg.dtype).element_size()
    total_mem = torch.cuda.get_device_properties(cfg.device).total_memory if cfg.gpu else None
    for B, C, H, D in decode_shapes(cfg):
        case = {"batch": B, "cache": C, "heads": H, "head_dim": D, "q_len": 1}
        work = formulas.decode_kv_bytes(B, C, H, D, el)
        too_big = None
        if total_mem is not None and work > 0.4 * total_mem:
            too_big = f"skipped: the cache needs {work / 2**30:.1f} GiB of {total_mem / 2**30:.0f} GiB"

        def make(B=B, C=C, H=H, D=D):
            return {"q": randn((B, 1, H, D), cfg),                                   # (B, 1, H, D)
                    "k_cache": randn((B, C, H, D), cfg),                             # (B, C, H, D)
                    "v_cache": randn((B, C, H, D), cfg),                             # (B, C, H, D)
                    "cache_seqlens": torch.full((B,), C, dtype=torch.int32, device=cfg.device)}
        common = dict(group="attention", case=case, variant="decode", unit="GB/s", work=work,
                      inputs_key=("decode", B, C, H, D), make_inputs=make, peak="bandwidth")

        def sdpa_build():
            # one query, bottom-right causal over a full cache = every key: is_causal=False
            # (SDPA's is_causal is top-left aligned and would let the query see key 0 only)
            def call(d):
                n = int(d["k_cache"].shape[1])
                k, v = d["k_cache"][:, :n], d["v_cache"][:, :n]                     # the filled part
                return F.scaled_dot_product_attention(d["q"].transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
            return call
        out.append(Job(impl="torch eager", build=sdpa_build, is_reference=True, skip=too_big,
                       note="F.scaled_dot_product_attention on the sliced cache", **common))
        for name, backend, fn, skip in fl_jobs_spec("attention_with_kvcache", cfg):
            def build(fn=fn, backend=backend):
                return lambda d: fn(d["q"], d["k_cache"], d["v_cache"], d["cache_seqlens"], causal=True,
                                    backend=backend)
            out.append(Job(impl=name, build=build, skip=too_big or skip, fl_op="attention_with_kvcache",
                           fl_backend=backend, **common))
        if cfg.gpu:
            def build_flash():
                f = flash.flash_attn_with_kvcache
                return lambda d: f(d["q"], d["k_cache"], d["v_cache"], cache_seqlens=d["cache_seqlens"],
                                   causal=True)
            out.append(Job(impl="flash-attn", build=build_flash,
                           skip=too_big or (flash_why if flash is None else None), **common))
    return out
