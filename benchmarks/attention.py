"""Attention jobs. Training: fwd, bwd, fwd+bwd TFLOP/s (formulas.attention_*_flops) per mask kind --
"none", "causal", "padding" (a (B, Lk) key_padding_mask, True = attend; FLOPs count the valid keys)
-- against torch eager (F.scaled_dot_product_attention with its default dispatch, is_causal or a
boolean attn_mask -- "SDPA" in notes: the baseline every row is checked against and the speed-up reference), SDPA
pinned to each backend (flash, efficient, cuDNN; a backend that refuses the case is an
"unsupported" row), torch.compile, and flash-attn when importable.
Decode: one query over a KV cache of max_len slots holding `cache` valid keys, GB/s over the bytes of
the valid K and V, against SDPA on the valid slice. The slots past cache_seqlens hold NaN, as memory
from torch.empty may: they must not affect the output (a kernel that reads them fails its check).
fastlayers takes (B, L, H, D); SDPA takes (B, H, L, D): it gets transposed views (no copies).
On a GPU: B*L = 16384, H*D = 2048 (the padding case on the first shape only). On CPU: model-sized
shapes (H12 D64, as BERT-base / GPT-2), padding and causal, kept to seconds on one thread.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formulas
from .harness import Job
from .impls import Config, compiled, fl_jobs_spec, optional, randn


def train_shapes(cfg: Config):
    """(B, L, H, D)."""
    if not cfg.gpu:
        return [(2, 128, 12, 64)] if cfg.quick else [(4, 256, 12, 64)]
    if cfg.quick:
        return [(16, 1024, 32, 64), (4, 4096, 16, 128)]
    return [(16384 // L, L, 2048 // D, D) for D in (64, 128) for L in (512, 1024, 2048, 4096, 8192, 16384)]


def train_masks(cfg: Config, shape_index: int) -> tuple[str, ...]:
    if not cfg.gpu:
        return ("padding", "causal")
    return ("none", "causal", "padding") if shape_index == 0 else ("none", "causal")


def decode_shapes(cfg: Config):
    """(B, valid cache length, H, D)."""
    if not cfg.gpu:
        return [(2, 256, 12, 64)] if cfg.quick else [(4, 1024, 12, 64)]
    if cfg.quick:
        return [(1, 32768, 16, 128), (16, 8192, 16, 128)]
    return [(b, c, 16, 128) for b in (1, 16, 64) for c in (1024, 8192, 32768)]


DECODE_SLACK = 128   # unused cache slots past the valid length (poisoned with NaN)


def padding_lengths(B: int, L: int) -> list[int]:
    """Valid keys per batch row: L for the first, down to about L/2 (fixed: the FLOP count needs them)."""
    return [max(1, L - (i * L) // (2 * B)) for i in range(B)]


def _sdpa(causal: bool):
    def attn(q, k, v, mask=None):
        # (B, L, H, D) -> (B, H, L, D) views; the output goes back to (B, L, H, D) as a view
        m = None if mask is None else mask[:, None, None, :]            # (B, 1, 1, Lk), True = attend
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=m, is_causal=causal)
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


def _train_inputs(cfg: Config, B: int, L: int, H: int, D: int, padded: bool):
    def make():
        d = {n: randn((B, L, H, D), cfg) for n in ("q", "k", "v")}       # (B, L, H, D) each
        if padded:
            lens = torch.tensor(padding_lengths(B, L), device=cfg.device)
            d["mask"] = torch.arange(L, device=cfg.device)[None, :] < lens[:, None]   # (B, L) True = attend
        return d
    return make


def _fl_build(fn, backend: str, causal: bool):
    def build():
        return lambda d: fn(d["q"], d["k"], d["v"], causal=causal, key_padding_mask=d.get("mask"), backend=backend)
    return build


def jobs(cfg: Config) -> list[Job]:
    out: list[Job] = []
    flash, flash_why = optional("flash_attn") if cfg.gpu else (None, None)
    for i, (B, L, H, D) in enumerate(train_shapes(cfg)):
        for mask in train_masks(cfg, i):
            causal, padded = mask == "causal", mask == "padding"
            case = {"batch": B, "seqlen": L, "heads": H, "head_dim": D, "mask": mask}
            lk = sum(padding_lengths(B, L)) / B if padded else L            # mean valid keys per query
            make = _train_inputs(cfg, B, L, H, D, padded)
            for variant in ("fwd", "bwd", "fwd+bwd"):
                flops = {"fwd": formulas.attention_fwd_flops, "bwd": formulas.attention_bwd_flops,
                         "fwd+bwd": formulas.attention_fwdbwd_flops}[variant](B, H, L, lk, D, causal)
                common = dict(group="attention", case=case, variant=variant, unit="TFLOP/s", work=flops,
                              inputs_key=("attention", B, L, H, D, padded), make_inputs=make,
                              grad_keys=("q", "k", "v"), peak="gemm")
                eager = _sdpa(causal)
                call = lambda d, f=eager: f(d["q"], d["k"], d["v"], d.get("mask"))  # noqa: E731
                note = "SDPA" + (" is_causal=True" if causal else "") + (" bool attn_mask" if padded else "")
                out.append(Job(impl="torch eager", build=lambda c=call: c, is_reference=True, note=note, **common))
                for name, backend, fn, skip in fl_jobs_spec("attention", cfg):
                    out.append(Job(impl=name, build=_fl_build(fn, backend, causal), skip=skip, fl_op="attention",
                                   fl_backend=backend, **common))
                if not cfg.gpu:
                    continue
                for label, ctx, skip in _sdpa_backends():
                    out.append(Job(impl=label, build=lambda c=call: c, context=ctx, skip=skip, **common))
                out.append(Job(impl="torch.compile", build=_compiled_call(eager), **common))

                def build_flash(causal=causal):
                    f = flash.flash_attn_func
                    return lambda d: f(d["q"], d["k"], d["v"], causal=causal)
                skip = flash_why if flash is None else None
                if skip is None and padded:
                    skip = "unsupported: flash_attn_func takes no key padding mask (its varlen API does)"
                out.append(Job(impl="flash-attn", build=build_flash, skip=skip, **common))
    out += decode_jobs(cfg, flash, flash_why)
    return out


def _compiled_call(eager):
    build_fn = compiled(eager)

    def build():
        f = build_fn()
        return lambda d: f(d["q"], d["k"], d["v"], d.get("mask"))
    return build


def _decode_inputs(cfg: Config, B: int, C: int, Lmax: int, H: int, D: int):
    def make():
        d = {"q": randn((B, 1, H, D), cfg),                                  # (B, 1, H, D)
             "k_cache": randn((B, Lmax, H, D), cfg),                         # (B, Lmax, H, D)
             "v_cache": randn((B, Lmax, H, D), cfg),                         # (B, Lmax, H, D)
             "cache_seqlens": torch.full((B,), C, dtype=torch.int32, device=cfg.device)}
        d["k_cache"][:, C:] = float("nan")                                  # unused slots
        d["v_cache"][:, C:] = float("nan")
        return d
    return make


def _fl_decode_build(fn, backend: str, *extra: str):
    """fl.attention_with_kvcache on the decode inputs, plus the inputs named in `extra` as keywords."""
    def build():
        return lambda d: fn(d["q"], d["k_cache"], d["v_cache"], d["cache_seqlens"], causal=True, backend=backend,
                            **{name: d[name] for name in extra})
    return build


def _sdpa_bshd(q, k, v):
    """SDPA on (B, L, H, D) tensors, no mask: one decode query attends every key it is given."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _flash_decode_build(flash, *extra: str):
    """flash_attn_with_kvcache on the decode inputs, plus the inputs named in `extra` as keywords."""
    def build():
        f = flash.flash_attn_with_kvcache
        return lambda d: f(d["q"], d["k_cache"], d["v_cache"], cache_seqlens=d["cache_seqlens"], causal=True,
                           **{name: d[name] for name in extra})
    return build


def decode_jobs(cfg: Config, flash, flash_why) -> list[Job]:
    out = []
    el = torch.tensor([], dtype=cfg.dtype).element_size()
    total_mem = torch.cuda.get_device_properties(cfg.device).total_memory if cfg.gpu else None
    for B, C, H, D in decode_shapes(cfg):
        Lmax = C + DECODE_SLACK
        case = {"batch": B, "cache": C, "max_len": Lmax, "heads": H, "head_dim": D, "q_len": 1}
        work = formulas.decode_kv_bytes(B, C, H, D, el)
        too_big = None
        if total_mem is not None and work * Lmax / C > 0.4 * total_mem:
            too_big = f"skipped: the cache needs {work * Lmax / C / 2**30:.1f} GiB of {total_mem / 2**30:.0f} GiB"
        common = dict(group="attention", case=case, variant="decode", unit="GB/s", work=work,
                      inputs_key=("decode", B, C, Lmax, H, D), make_inputs=_decode_inputs(cfg, B, C, Lmax, H, D),
                      peak="bandwidth")

        def sdpa_build(C=C):
            # one query, bottom-right causal over the valid cache = every valid key: is_causal=False
            # (SDPA's is_causal is top-left aligned and would let the query see key 0 only)
            return lambda d: _sdpa_bshd(d["q"], d["k_cache"][:, :C], d["v_cache"][:, :C])  # the valid part
        out.append(Job(impl="torch eager", build=sdpa_build, is_reference=True, skip=too_big,
                       note="SDPA on the valid cache slice", **common))
        for name, backend, fn, skip in fl_jobs_spec("attention_with_kvcache", cfg):
            out.append(Job(impl=name, build=_fl_decode_build(fn, backend), skip=too_big or skip,
                           fl_op="attention_with_kvcache", fl_backend=backend, **common))
        if cfg.gpu:
            out.append(Job(impl="flash-attn", build=_flash_decode_build(flash),
                           skip=too_big or (flash_why if flash is None else None), **common))
        out += paged_decode_jobs(cfg, B, C, Lmax, H, D, work, too_big, flash, flash_why)
    return out


PAGE_SIZES = (1, 256)   # 1: beam search's pages (a reorder moves table rows); 256: flash-attn's smallest


def _paged_inputs(cfg: Config, B: int, C: int, Lmax: int, H: int, D: int, P: int):
    """The decode case on shuffled pages: (num_blocks, P, H, D) caches, block_table (B, Lmax / P)."""
    def make():
        nblk = -(-Lmax // P)
        pages = torch.randperm(B * nblk, device=cfg.device).to(torch.int32).view(B, nblk)
        d = {"q": randn((B, 1, H, D), cfg),
             "k_cache": randn((B * nblk, P, H, D), cfg), "v_cache": randn((B * nblk, P, H, D), cfg),
             "block_table": pages, "cache_seqlens": torch.full((B,), C, dtype=torch.int32, device=cfg.device)}
        return d
    return make


def paged_decode_jobs(cfg: Config, B, C, Lmax, H, D, work, too_big, flash, flash_why) -> list[Job]:
    """Decode over a paged cache (block_table), same bytes as the plain decode row. Reference: gather
    the logical cache, then SDPA -- what a cache without page support pays per step."""
    out = []
    for P in PAGE_SIZES:
        case = {"batch": B, "cache": C, "max_len": Lmax, "heads": H, "head_dim": D, "q_len": 1, "page": P}
        common = dict(group="attention", case=case, variant="decode paged", unit="GB/s", work=work,
                      inputs_key=("decode paged", B, C, Lmax, H, D, P),
                      make_inputs=_paged_inputs(cfg, B, C, Lmax, H, D, P), peak="bandwidth")

        def gather_build(C=C, P=P):
            def call(d):
                idx = d["block_table"][:, :-(-C // P)].long()
                k = d["k_cache"][idx].flatten(1, 2)[:, :C]                      # (B, C, H, D) gathered copy
                return _sdpa_bshd(d["q"], k, d["v_cache"][idx].flatten(1, 2)[:, :C])
            return call
        out.append(Job(impl="torch eager", build=gather_build, is_reference=True, skip=too_big,
                       note="gather the pages, then SDPA", **common))
        for name, backend, fn, skip in fl_jobs_spec("attention_with_kvcache", cfg):
            out.append(Job(impl=name, build=_fl_decode_build(fn, backend, "block_table"), skip=too_big or skip,
                           fl_op="attention_with_kvcache", fl_backend=backend, **common))
        if cfg.gpu:
            why = flash_why if flash is None else (
                None if P % 256 == 0 else f"unsupported: flash-attn's paged cache needs page_block_size % 256 == 0, "
                                          f"got {P}")
            out.append(Job(impl="flash-attn", build=_flash_decode_build(flash, "block_table"), skip=too_big or why,
                           **common))
    return out
