"""A/B timing of the CUDA linear forward kernels: mma.sync vs the sm_90a wgmma/TMA kernel vs plain
cuBLAS (torch.mm, no epilogue: the ceiling the fused forward should reach).

    python -m benchmarks.linear_gemm_ab [--dtype bf16|fp16]

Each row: y = gelu(x @ W^T + b) (+ residual), bf16 by default; the kernel is picked per call through
FASTLAYERS_CUDA_GEMM (read by fastlayers.cuda_ops.linear at every call). Times are medians of CUDA-
event-timed repeats after warm-up (triton.testing.do_bench); a kernel that cannot run a case shows
its error instead. Also checks that the two kernels agree (max abs difference, as a sanity line).
"""
from __future__ import annotations

import argparse
import os

import torch

SHAPES = [  # (M, K, N, residual)
    (16384, 768, 3072, False),
    (16384, 3072, 768, True),
    (8192, 8192, 8192, False),
    (4096, 4096, 11008, False),
    (512, 4096, 4096, True),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    from triton.testing import do_bench

    from fastlayers.cuda_ops import linear as ops

    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}")
    print(f"{'M':>6} {'K':>6} {'N':>6} res | {'torch.mm':>9} {'mma':>9} {'wgmma':>9}  TFLOP/s (mm, mma, wgmma)  max|mma-wgmma|")
    for M, K, N, res in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dtype)                   # (M, K)
        w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5       # (N, K)
        b = torch.randn(N, device="cuda", dtype=dtype) * 0.1                # (N,)
        r = torch.randn(M, N, device="cuda", dtype=dtype) if res else None  # (M, N)
        flops = 2.0 * M * N * K
        times, outs = {}, {}
        times["mm"] = do_bench(lambda: torch.mm(x, w.t()))
        for kernel in ("mma", "wgmma"):
            os.environ["FASTLAYERS_CUDA_GEMM"] = kernel
            try:
                outs[kernel] = ops.linear_fwd(x, w, b, "gelu", r, False)[0]
                times[kernel] = do_bench(lambda: ops.linear_fwd(x, w, b, "gelu", r, False))
            except RuntimeError as e:
                times[kernel] = float("nan")
                print(f"  {kernel}: {e}")
        os.environ.pop("FASTLAYERS_CUDA_GEMM", None)
        diff = ((outs["mma"].float() - outs["wgmma"].float()).abs().max().item()
                if len(outs) == 2 else float("nan"))
        tf = [flops / (times[k] * 1e-3) / 1e12 for k in ("mm", "mma", "wgmma")]
        print(f"{M:>6} {K:>6} {N:>6} {'y' if res else 'n':>3} | {times['mm']:>7.3f}ms {times['mma']:>7.3f}ms "
              f"{times['wgmma']:>7.3f}ms  {tf[0]:6.0f} {tf[1]:6.0f} {tf[2]:6.0f}  {diff:.3e}")


if __name__ == "__main__":
    main()
