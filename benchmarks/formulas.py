"""Work counts behind every rate `fastlayers bench` reports (DESIGN.md, "Measuring").

Pure integer arithmetic on shapes: no torch, no device. Counts are per call of the op.
- attention: forward FLOPs 4*B*H*Lq*Lk_avg*D, causal Lk_avg = (max(0, Lk - Lq) + Lk) / 2 (the mean
  number of keys a query row attends under bottom-right alignment); backward = 2.5 x forward.
- decode (attention over a KV cache): bytes of K and V read, 2 * B * Lk * H * D * element size.
- GEMM: 2*M*N*K forward; the backward's two GEMMs (dx and dweight) 4*M*N*K.
- norms: every tensor read or written once. Forward: x, residual, weight, bias, y, residual_out.
  Backward: s (the normalised input, x + residual), dy, stats (mean and rstd, fp32 per row; rstd
  only for RMSNorm), dresidual_out when fused, dx, and the dweight/dbias partials -- counted as
  their final (cols,) results in the weight's dtype, because the number of per-block fp32 partials
  is the implementation's choice (and is negligible next to rows*cols for the benchmarked shapes).
"""
from __future__ import annotations


def attention_lk_avg(lq: int, lk: int, causal: bool) -> float:
    """Mean number of keys one query attends (bottom-right causal alignment)."""
    if not causal:
        return float(lk)
    return (max(0, lk - lq) + lk) / 2.0


def attention_fwd_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    return 4.0 * b * h * lq * attention_lk_avg(lq, lk, causal) * d


def attention_bwd_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    return 2.5 * attention_fwd_flops(b, h, lq, lk, d, causal)


def attention_fwdbwd_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> float:
    return 3.5 * attention_fwd_flops(b, h, lq, lk, d, causal)


def decode_kv_bytes(b: int, lk: int, h: int, d: int, elsize: int) -> int:
    """Bytes of K and V one decode step reads (the cache dominates; q and o are negligible)."""
    return 2 * b * lk * h * d * elsize


def gemm_fwd_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gemm_bwd_flops(m: int, n: int, k: int) -> float:
    return 4.0 * m * n * k


def norm_fwd_bytes(rows: int, cols: int, elsize: int, *, has_weight: bool = True, has_bias: bool = True,
                   has_residual: bool = False, w_elsize: int | None = None) -> int:
    w_elsize = elsize if w_elsize is None else w_elsize
    act = rows * cols * elsize
    total = 2 * act                                   # x read, y written
    if has_residual:
        total += 2 * act                              # residual read, residual_out written
    total += cols * w_elsize * (int(has_weight) + int(has_bias))
    return total


def norm_bwd_bytes(rows: int, cols: int, elsize: int, *, rms: bool, has_weight: bool = True,
                   has_bias: bool = True, has_dresidual: bool = False, w_elsize: int | None = None) -> int:
    w_elsize = elsize if w_elsize is None else w_elsize
    act = rows * cols * elsize
    total = 3 * act                                   # s and dy read, dx written
    if has_dresidual:
        total += act                                  # dresidual_out read
    total += rows * 4 * (1 if rms else 2)             # rstd (and mean) fp32
    total += cols * w_elsize * (int(has_weight) + int(has_bias))   # dweight, dbias
    return total
