"""A/B timing of the CUDA linear forward kernels: mma.sync vs the sm_90a wgmma/TMA kernel vs plain
cuBLAS (torch.mm, no epilogue: the ceiling the fused forward should reach).

    python -m fastlayers.bench.linear_gemm_ab [--dtype bf16|fp16]

Each row: y = gelu(x @ W^T + b) (+ residual), bf16 by default, through the public op
(fl.linear(..., backend="cuda"), fl.last_backend proves it ran); the kernel is picked per call through
FASTLAYERS_CUDA_GEMM (read by fastlayers.cuda_ops.linear at every call). Before it is timed, each
kernel's output is checked against the float32 result on the same inputs (error = max|y - ref| /
max|ref|, the tolerance of `fastlayers bench`); a kernel over it, or one that cannot run the case,
shows FAILED / its error instead of a time. Times are medians of CUDA-event-timed repeats after
warm-up (triton.testing.do_bench).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from .harness import short_message, tolerance

SHAPES = [  # (M, K, N, residual)
    (16384, 768, 3072, False),
    (16384, 3072, 768, True),
    (8192, 8192, 8192, False),
    (4096, 4096, 11008, False),
    (512, 4096, 4096, True),
]


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y.float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    from triton.testing import do_bench

    import fastlayers as fl

    tol = tolerance(dtype, "cuda")
    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}  tolerance: {tol:g} (max|y - fp32| / max|fp32|)")
    print(f"{'M':>6} {'K':>6} {'N':>6} res | {'torch.mm':>9} {'mma':>9} {'wgmma':>9}  TFLOP/s (mm, mma, wgmma)  "
          f"error (mm, mma, wgmma)")
    for M, K, N, res in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dtype)                   # (M, K)
        w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5       # (N, K)
        b = torch.randn(N, device="cuda", dtype=dtype) * 0.1                # (N,)
        r = torch.randn(M, N, device="cuda", dtype=dtype) if res else None  # (M, N)
        mm32 = x.float() @ w.float().t()                                    # (M, N)
        ref = F.gelu(mm32 + b.float()) + (r.float() if res else 0)          # (M, N)
        flops = 2.0 * M * N * K
        times, errs = {}, {}
        errs["mm"] = _err(torch.mm(x, w.t()), mm32)
        del mm32
        times["mm"] = do_bench(lambda: torch.mm(x, w.t())) if errs["mm"] <= tol else float("nan")
        for kernel in ("mma", "wgmma"):
            os.environ["FASTLAYERS_CUDA_GEMM"] = kernel
            times[kernel], errs[kernel] = float("nan"), float("nan")
            try:
                y = fl.linear(x, w, b, activation="gelu", residual=r, backend="cuda")
                ran = fl.last_backend("linear")
                if ran != "cuda":
                    raise RuntimeError(f"fl.last_backend('linear') says {ran!r} ran, not 'cuda'")
                errs[kernel] = _err(y, ref)
                del y
                if errs[kernel] <= tol:
                    times[kernel] = do_bench(lambda: fl.linear(x, w, b, activation="gelu", residual=r, backend="cuda"))
                else:
                    print(f"  {kernel}: FAILED: error {errs[kernel]:.2g} > tolerance {tol:g}")
            except Exception as e:  # one kernel failing never hides the other
                print(f"  {kernel}: error: {short_message(e)}")
        os.environ.pop("FASTLAYERS_CUDA_GEMM", None)
        tf = [flops / (times[k] * 1e-3) / 1e12 for k in ("mm", "mma", "wgmma")]
        print(f"{M:>6} {K:>6} {N:>6} {'y' if res else 'n':>3} | {times['mm']:>7.3f}ms {times['mma']:>7.3f}ms "
              f"{times['wgmma']:>7.3f}ms  {tf[0]:6.0f} {tf[1]:6.0f} {tf[2]:6.0f}  "
              f"{errs['mm']:.1e} {errs['mma']:.1e} {errs['wgmma']:.1e}")


if __name__ == "__main__":
    main()
