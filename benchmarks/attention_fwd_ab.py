"""A/B timing of the CUDA attention forward kernels: mma.sync (attention_fwd.cu) vs the sm_90a
wgmma/TMA kernel (attention_fwd_sm90.cu), with torch's SDPA (flash backend when it runs) as a yardstick.

    python -m benchmarks.attention_fwd_ab [--dtype bf16|fp16]

Each row: B*L = 16384 tokens, H*D = 2048, no mask, no dropout; the kernel is picked per call through
FASTLAYERS_CUDA_ATTENTION (read by fastlayers.cuda_ops.attention at every call). TFLOP/s from
benchmarks.formulas.attention_fwd_flops (causal counts the attended half); times are medians of
CUDA-event-timed repeats after warm-up (triton.testing.do_bench). A kernel that cannot run a case shows
its error instead. Also prints max |o_mma - o_wgmma| as a sanity line.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from benchmarks import formulas

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    from triton.testing import do_bench

    from fastlayers.cuda_ops import attention as ops

    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}")
    print(f"{'D':>4} {'L':>6} {'causal':>6} | TFLOP/s {'sdpa':>7} {'mma':>7} {'wgmma':>7}  max|mma-wgmma|")
    for D in (64, 128):
        H = 2048 // D
        for L in SEQ_LENS:
            B = max(1, 16384 // L)
            q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=dtype) for _ in range(3))  # (B, L, H, D)
            for causal in (False, True):
                flops = formulas.attention_fwd_flops(B, H, L, L, D, causal)
                tf, outs = {}, {}
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views for SDPA
                ms = do_bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                tf["sdpa"] = flops / (ms * 1e-3) / 1e12
                for kernel in ("mma", "wgmma"):
                    os.environ["FASTLAYERS_CUDA_ATTENTION"] = kernel
                    try:
                        outs[kernel] = ops.attention_fwd(q, k, v, None, D ** -0.5, causal, 0.0, None)[0]
                        ms = do_bench(lambda: ops.attention_fwd(q, k, v, None, D ** -0.5, causal, 0.0, None))
                        tf[kernel] = flops / (ms * 1e-3) / 1e12
                    except RuntimeError as e:
                        tf[kernel] = float("nan")
                        print(f"  {kernel}: {e}")
                os.environ.pop("FASTLAYERS_CUDA_ATTENTION", None)
                diff = ((outs["mma"].float() - outs["wgmma"].float()).abs().max().item()
                        if len(outs) == 2 else float("nan"))
                print(f"{D:>4} {L:>6} {str(causal):>6} | {'':7} {tf['sdpa']:7.0f} {tf['mma']:7.0f} "
                      f"{tf['wgmma']:7.0f}  {diff:.3e}")


if __name__ == "__main__":
    main()
