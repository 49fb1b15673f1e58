"""Triton linear with a fused epilogue: y = act(x @ weight.T + bias) + residual, and its backward.

Called by pytorch_ext/ops/linear.py through exactly three functions (the same interface as
fastlayers.cuda_ops.linear): linear_fwd, linear_bwd, unsupported_reason.

Guarantees
- x: (M, K) with stride(1) == 1 and any row stride (a column slice of a wider tensor is fine, and
  0: one broadcast row); weight: (N, K) as nn.Linear stores it, stride(1) == 1; residual / dy /
  preact: (M, N), stride(1) == 1, any row stride (0 included: the gradient of y.sum(0) is dy with
  strides (0, 1)). bias: (N,) read as contiguous -- the op boundary (ops/linear.py, vector_arg)
  copies any other layout, and the launchers refuse one. Any M (including 0, 1, odd), any N, K
  (tails are masked). Outputs are allocated with torch.empty, contiguous, in x.dtype (dx) /
  weight.dtype (dweight, dbias).
- Grids: every kernel walks its tiles (or blocks) with a strided loop, so any program count in
  [1, tiles] is correct; the launch plans (fwd_launch, dx_launch, dw_launch) cap it at CUDA's grid
  axis-0 limit (2^31 - 1), and CPU tests check them on extreme shapes. Pointer steps along the
  reduction are int64 (a K or N above 2^24 times the tile height overflows int32).
- fp32 accumulation everywhere; the whole epilogue (bias, activation, residual add, optional
  pre-activation store) happens in registers on the fp32 accumulator before the single store.
- fp16 / bf16 run on tensor cores. fp32 inputs use TF32 dots (input_precision="tf32": 10-bit
  mantissa products, fp32 accumulation), like torch with allow_tf32=True; expect ~1e-3 relative
  error, not fp32-exact results.
- Under TRITON_INTERPRET=1 the kernels run on CPU tensors (fp32, fp16; bf16 dot operands are
  upcast to fp32 there because the interpreter's bf16 dot is wrong).

Design decisions
- Program order is grouped (GROUP_M row-tiles share a column of W) so that tiles running at the
  same time reuse x and W from L2. Every kernel walks its tiles with a strided loop
  `for tile in range(pid, num_tiles, num_programs)`: with grid = num_tiles that is the classic one
  tile per program, with grid = number of SMs it is the persistent variant (chosen by heuristic for
  problems with many waves of tiles). One kernel body serves both, so there is no twin to drift.
- TMA on Hopper (compute capability >= 9) for the GEMM operands of the forward and of the dx
  backward: HOST-side descriptors (triton.tools.tensor_descriptor.TensorDescriptor, same API in
  Triton 3.6 and 3.9) built by the launcher, so no triton.set_allocator side effect is needed
  (device-side tl.make_tensor_descriptor would need one). One kernel body serves both paths: the
  constexpr USE_TMA only changes how tiles are loaded (desc.load, whose out-of-bounds elements are
  zero, instead of masked pointer loads): the GEMM operands and, in the forward, the residual tile
  (a pointer-loaded residual pushed the tanh-gelu+residual epilogue into spills with Triton 3.9's
  ptxas, see benchmarks/triton_aot_check.py). Bias, activation, preact, residual add and the
  stores are the same code. TMA is used only when every tensor it reads (x, W, residual; dy, z, W)
  has a 16-byte aligned base, a NONZERO row stride that is a multiple of 16 bytes (a broadcast row,
  stride 0, is not a TMA tensor: the CUDA side refuses it too), a contiguous last dim and
  dimensions below 2^31 (TMA coordinates are int32); otherwise (e.g. an odd column slice of x, or
  dy = grad of y.sum(0)) the pointer path runs, as it does on Ampere and under the interpreter.
  A single-row operand is described with the smallest valid row stride (it is never stepped).
  FASTLAYERS_TRITON_TMA=0 in the environment (read at each launch) disables TMA, for A/B
  benchmarking. The dweight GEMM keeps pointer loads.
- Configs come from shape / dtype / architecture heuristics (cached), never from a first-call
  autotune; none of them has been tuned on a GPU yet.
- The forward SAVES the pre-activation z = x @ W.T + b (save_preact=True) instead of letting the
  backward recompute it. Saving costs 2 bytes/element written once and read twice (dx and dW
  kernels) = 6*M*N bytes; recomputing costs a full GEMM, 2*M*N*K FLOPs (+50% on the backward's
  4*M*N*K). At ~200 FLOP/byte (H100: ~600-900 TFLOP/s dense bf16 vs ~3 TB/s) recomputation only
  breaks even around K ~ 600 and loses for every transformer width above that; it also needs x
  and W again at full precision. So z is stored (in x.dtype) from the same registers as y.
- Backward: dz = dy * act'(z) is computed in the operand prologue of BOTH gradient GEMMs (load the
  dy tile and the z tile, multiply in fp32 registers, round to the dot dtype, tl.dot); no
  elementwise pass and no dz tensor. dbias = sum_M dz is accumulated in the dweight kernel by the
  programs whose K-tile index is 0. When few (N, K) tiles exist for a long M, the dweight kernel
  splits M into S chunks writing fp32 partials (S, N, K) + (S, N), then one
  small kernel sums them in a fixed order (deterministic) and casts.
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:
    # Host-side TMA descriptors (Triton >= 3.4; present with the same API in 3.6 and 3.9). Without
    # them every launch takes the pointer path, exactly what such a Triton would run anyway.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu")
_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # tanh through exp: tl.math.tanh is not available in every Triton 3.x. exp(2u) overflows to inf
    # for large u, giving exactly 1; it underflows to 0 for very negative u, giving exactly -1.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    # z: fp32 tile. 0: identity, 1: erf gelu, 2: tanh gelu, 3: relu.
    if ACTIVATION == 1:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        z = 0.5 * z * (1.0 + t)
    elif ACTIVATION == 3:
        z = tl.maximum(z, 0.0)
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    # d act / d z at the fp32 pre-activation z (ACTIVATION != 0).
    if ACTIVATION == 1:
        # Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        g = cdf + z * pdf
    elif ACTIVATION == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        g = tl.where(z > 0.0, 1.0, 0.0)
    return g


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Row-tiles are walked in groups of GROUP_M down one column of tiles before moving right, so the
    # programs resident at once share GROUP_M row-panels of A and a few column-panels of B in L2.
    num_in_group = GROUP_M * num_pid_n
    group_id = tile // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % num_in_group) % group_size
    pid_n = (tile % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _dz(dy, z, ACTIVATION: tl.constexpr):
    # dz = dy * act'(z) in fp32 registers from loaded tiles (z unused when ACTIVATION == 0).
    dz = dy.to(tl.float32)
    if ACTIVATION != 0:
        dz = dz * _activation_grad(z.to(tl.float32), ACTIVATION)
    return dz


@triton.jit
def _dz_tile(dy_ptrs, z_ptrs, mask, ACTIVATION: tl.constexpr):
    # The pointer-load operand prologue shared by both gradient GEMMs: load dy (and z), then _dz.
    dy = tl.load(dy_ptrs, mask=mask, other=0.0)
    z = dy
    if ACTIVATION != 0:
        z = tl.load(z_ptrs, mask=mask, other=0.0)
    return _dz(dy, z, ACTIVATION)


# ----------------------------------------------------------------------------------------------
# Forward: y = act(x @ W.T + b) + residual
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_fwd_kernel(
    x_src,      # (M, K) row stride stride_xm, unit column stride; USE_TMA: descriptor, block (BM, BK)
    w_src,      # (N, K) row stride stride_wn; USE_TMA: descriptor, block (BN, BK)
    b_ptr,      # (N,) or dummy when not HAS_BIAS
    res_src,    # (M, N) row stride stride_rm, or dummy when not HAS_RESIDUAL; USE_TMA: descr., (BM, BN)
    y_ptr,      # (M, N) contiguous output
    z_ptr,      # (M, N) contiguous pre-activation output, or dummy when not STORE_PREACT
    M, N, K,
    stride_xm, stride_wn, stride_rm,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_PREACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if not USE_TMA:
            # Out-of-range rows/columns are wrapped onto valid ones (not masked) so the main loop
            # only masks the K tail; the store masks them out. (TMA reads zeros out of bounds.)
            rows = offs_m % M
            cols = offs_n % N
            x_ptrs = x_src + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]   # (BM, BK)
            w_ptrs = w_src + cols.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]   # (BN, BK)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if USE_TMA:
                a = x_src.load([pid_m * BLOCK_M, k * BLOCK_K])                          # (BM, BK)
                b = w_src.load([pid_n * BLOCK_N, k * BLOCK_K])                          # (BN, BK)
            elif EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_mask = offs_k[None, :] < K - k * BLOCK_K
                a = tl.load(x_ptrs, mask=k_mask, other=0.0)
                b = tl.load(w_ptrs, mask=k_mask, other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
            if not USE_TMA:
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K

        # Epilogue, all in fp32 registers.
        n_mask = offs_n < N
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_mask = (offs_m < M)[:, None] & n_mask[None, :]
        out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        if STORE_PREACT:
            tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
        acc = _activation(acc, ACTIVATION)
        if HAS_RESIDUAL:
            if USE_TMA:
                res = res_src.load([pid_m * BLOCK_M, pid_n * BLOCK_N])                  # (BM, BN)
            else:
                r_ptrs = res_src + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
                res = tl.load(r_ptrs, mask=out_mask, other=0.0)
            acc += res.to(tl.float32)
        tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dx = dz @ W, reduction over N
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_bwd_dx_kernel(
    dy_src,     # (M, N) row stride stride_dym; USE_TMA: descriptor, block (BM, BN)
    z_src,      # (M, N) pre-activation, row stride stride_zm (dummy when ACTIVATION == 0); as dy_src
    w_src,      # (N, K) row stride stride_wn; USE_TMA: descriptor, block (BN, BK)
    dx_ptr,     # (M, K) contiguous output
    M, N, K,
    stride_dym, stride_zm, stride_wn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    INT64_STEPS: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_k
    offs_n = tl.arange(0, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_k = _grouped_tile(tile, num_pid_m, num_pid_k, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        if not USE_TMA:
            rows = (offs_m % M).to(tl.int64)
            cols = offs_k % K
            dy_ptrs = dy_src + rows[:, None] * stride_dym + offs_n[None, :]   # (BM, BN)
            z_ptrs = z_src + rows[:, None] * stride_zm + offs_n[None, :]      # (BM, BN)
            w_ptrs = w_src + offs_n.to(tl.int64)[:, None] * stride_wn + cols[None, :]   # (BN, BK)
            if INT64_STEPS:  # BLOCK_N * K passes 2^31: step in int64 (a variant of its own, so the
                w_step = tl.cast(stride_wn, tl.int64) * BLOCK_N   # common one keeps its registers)
            else:
                w_step = BLOCK_N * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n in range(0, tl.cdiv(N, BLOCK_N)):
            if USE_TMA:
                # Out-of-bounds elements read as zero: dz = 0 * act'(0) = 0 there, w rows = 0.
                w = w_src.load([n * BLOCK_N, pid_k * BLOCK_K])                           # (BN, BK)
                dy = dy_src.load([pid_m * BLOCK_M, n * BLOCK_N])                         # (BM, BN)
                z = dy
                if ACTIVATION != 0:
                    z = z_src.load([pid_m * BLOCK_M, n * BLOCK_N])                       # (BM, BN)
                dz = _dz(dy, z, ACTIVATION)
            else:
                n_left = N - n * BLOCK_N
                w = tl.load(w_ptrs, mask=offs_n[:, None] < n_left, other=0.0)           # (BN, BK)
                dz = _dz_tile(dy_ptrs, z_ptrs, offs_n[None, :] < n_left, ACTIVATION)    # (BM, BN)
            if UPCAST_DOT:
                a = dz
                w = w.to(tl.float32)
            else:
                a = dz.to(dx_ptr.dtype.element_ty)      # dx, W and dy share x.dtype
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if not USE_TMA:
                dy_ptrs += BLOCK_N
                z_ptrs += BLOCK_N
                w_ptrs += w_step
        out_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        out_offs = offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(dx_ptr + out_offs, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dW = dz.T @ x and db = sum_M dz, reduction over M (optionally split into chunks)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_bwd_dw_kernel(
    dy_ptr,     # (M, N) row stride stride_dym
    z_ptr,      # (M, N) pre-activation, row stride stride_zm (dummy when ACTIVATION == 0)
    x_ptr,      # (M, K) row stride stride_xm
    dw_ptr,     # num_splits == 1: (N, K) output in weight dtype; else (num_splits, N, K) fp32 partials
    db_ptr,     # num_splits == 1: (N,) output; else (num_splits, N) fp32 partials; dummy w/o HAS_BIAS
    M, N, K, rows_per_split, num_splits,
    stride_dym, stride_zm, stride_xm,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_STEPS: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    tiles_per_split = num_pid_n * num_pid_k
    num_tiles = tiles_per_split * num_splits
    offs_mb = tl.arange(0, BLOCK_M)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        split = tile // tiles_per_split
        pid_n, pid_k = _grouped_tile(tile % tiles_per_split, num_pid_n, num_pid_k, GROUP_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols_n = offs_n % N
        cols_k = offs_k % K
        m_start = split * rows_per_split          # rows_per_split is a multiple of BLOCK_M
        m_end = tl.minimum(m_start + rows_per_split, M)
        offs_m = m_start + offs_mb
        dy_ptrs = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + cols_n[None, :]   # (BM, BN)
        z_ptrs = z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + cols_n[None, :]      # (BM, BN)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + cols_k[None, :]      # (BM, BK)
        if INT64_STEPS:  # BLOCK_M * a row stride passes 2^31: step in int64
            dy_step = tl.cast(stride_dym, tl.int64) * BLOCK_M
            z_step = tl.cast(stride_zm, tl.int64) * BLOCK_M
            x_step = tl.cast(stride_xm, tl.int64) * BLOCK_M
        else:
            dy_step = BLOCK_M * stride_dym
            z_step = BLOCK_M * stride_zm
            x_step = BLOCK_M * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m in range(m_start, m_end, BLOCK_M):
            m_mask = (offs_mb < m_end - m)[:, None]
            dz = _dz_tile(dy_ptrs, z_ptrs, m_mask, ACTIVATION)                          # (BM, BN)
            xt = tl.load(x_ptrs, mask=m_mask, other=0.0)                                # (BM, BK)
            if HAS_BIAS:
                if pid_k == 0:
                    db_acc += tl.sum(dz, axis=0)
            if UPCAST_DOT:
                xt = xt.to(tl.float32)
            else:
                dz = dz.to(x_ptr.dtype.element_ty)
            acc = tl.dot(tl.trans(dz), xt, acc, input_precision=DOT_PRECISION)
            dy_ptrs += dy_step
            z_ptrs += z_step
            x_ptrs += x_step
        n_mask = offs_n < N
        out_mask = n_mask[:, None] & (offs_k < K)[None, :]
        rows_n = split * N + offs_n                              # row of the (S, N, K) partials
        if INT64_STEPS:
            rows_n = tl.cast(split, tl.int64) * N + offs_n
        out_offs = rows_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(dw_ptr + out_offs, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(db_ptr + rows_n, db_acc.to(db_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _sum_splits_kernel(
    part_ptr,   # (num_splits, numel) fp32 partials
    out_ptr,    # (numel,) output
    numel, num_splits,
    BLOCK: tl.constexpr,
):
    # Fixed summation order over the splits: bitwise reproducible run to run. Strided block loop,
    # like the GEMMs: any grid size in [1, blocks] is correct (the launch caps it).
    for block in range(tl.program_id(0), tl.cdiv(numel, BLOCK), tl.num_programs(0)):
        offs = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        ptrs = part_ptr + offs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(num_splits):
            acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += numel
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Configs (heuristics, cached; nothing is autotuned on the first call)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _device_info(device_index):
    """(compute capability major, number of SMs) of a CUDA device; (0, 4) under the interpreter."""
    if device_index is None:
        return 0, 4
    props = torch.cuda.get_device_properties(device_index)
    return props.major, props.multi_processor_count


def _device_index(t):
    return t.device.index if t.device.type == "cuda" else None


@functools.lru_cache(maxsize=4096)
def _gemm_config(M, N, K, elem_bytes, arch, num_sms, heavy):
    """Tile config for an (M x N) output with reduction K. Returns a dict of launch parameters.

    heavy: the kernel has a costly epilogue/prologue (activation or residual). The big tiles were
    checked with ptxas (triton 3.9, sm_90 / sm_80): 128x256 fp32 accumulators plus a gelu/residual
    epilogue spill hundreds of bytes, so heavy kernels use 128x128 (8 warps) instead.
    arch 0 means the interpreter: small tiles so masks, grouping and the tile loop are exercised.
    """
    if arch == 0:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
                    persistent=False)
    fp32 = elem_bytes == 4
    if M <= 64:
        # Decode / small batch: bandwidth bound on W; narrow M tile, long K steps.
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64 if fp32 else 128, GROUP_M=8, num_warps=4,
                   num_stages=4)
    elif fp32:
        cfg = (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4) if heavy
               else dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3))
    elif arch >= 9:
        big = not heavy and M >= 1024 and N >= 1024
        cfg = dict(BLOCK_M=128, BLOCK_N=256 if big else 128, BLOCK_K=64, GROUP_M=8, num_warps=8,
                   num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8 if heavy else 4,
                   num_stages=4)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    # Persistent when there are several waves: the tail wave is then spread over all SMs and the
    # launch creates num_sms programs instead of thousands.
    cfg["persistent"] = tiles >= 4 * num_sms
    return cfg


# CUDA's grid limits (axis x, y, z); every launch here uses axis x only.
MAX_GRID = (2**31 - 1, 65535, 65535)
_SUM_BLOCK = 1024  # elements per block of _sum_splits_kernel


def _grid(cfg, num_tiles, num_sms):
    """Programs of a tile-loop kernel: one per tile, or one per SM when persistent. The kernels'
    strided tile loop makes any count in [1, num_tiles] correct, so it is capped at axis 0's limit
    (reached only by the interpreter's tiny tiles: on a GPU many tiles mean persistent)."""
    n = min(num_tiles, num_sms) if cfg["persistent"] else num_tiles
    return (max(1, min(n, MAX_GRID[0])),)


def fwd_launch(M, N, K, elem_bytes, arch, num_sms, heavy, cfg=None):
    """(cfg, grid) of the forward kernel for x (M, K) @ W (N, K)^T; M, N >= 1 (the launcher returns
    before launching otherwise). CPU-callable: tests check the grid on extreme shapes."""
    cfg = cfg or _gemm_config(M, N, K, elem_bytes, arch, num_sms, heavy)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    return cfg, _grid(cfg, tiles, num_sms)


def dx_launch(M, N, K, elem_bytes, arch, num_sms, cfg=None):
    """(cfg, grid) of the dx kernel: dx (M, K) = dz (M, N) @ W (N, K); M, K, N >= 1. The GEMM is
    (M x K) with reduction N: the config's BLOCK_N tiles K and its BLOCK_K steps N."""
    cfg = cfg or _gemm_config(M, K, N, elem_bytes, arch, num_sms, True)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    return cfg, _grid(cfg, tiles, num_sms)


def dw_launch(M, N, K, elem_bytes, arch, num_sms, cfg=None, split=None):
    """(cfg, split, rows_per_split, grid, sum_grid_dw, sum_grid_db) of the dweight GEMM, dW (N, K) =
    dz^T (N, M) @ x (M, K), reduction M; N, M >= 1. sum_grid_*: the fixed-order sum of the fp32
    partials when split > 1 (else None). The config's (BLOCK_M, BLOCK_N, BLOCK_K) serve as
    (N tile, K tile, M step). Always "heavy": dz is built in registers (not streamed from shared
    memory), and ptxas spills 128x256 tiles of both gradient GEMMs even without an activation."""
    cfg = cfg or _gemm_config(N, K, M, elem_bytes, arch, num_sms, True)
    if split is None:
        split, rows = _split_m(M, N, K, tuple(sorted(cfg.items())), num_sms)
    else:
        rows = triton.cdiv(triton.cdiv(M, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        split = triton.cdiv(M, rows)
    tiles = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"]) * split
    sum_dw = sum_db = None
    if split > 1:
        sum_dw = (max(1, min(triton.cdiv(N * K, _SUM_BLOCK), MAX_GRID[0])),)
        sum_db = (max(1, min(triton.cdiv(N, _SUM_BLOCK), MAX_GRID[0])),)
    return cfg, split, rows, _grid(cfg, tiles, num_sms), sum_dw, sum_db


def _int64_steps(*steps):
    """Whether a kernel's pointer steps (tile height x row stride, elements) need int64 arithmetic:
    Triton types an int argument below 2^31 as int32, and the product would wrap."""
    return any(abs(s) >= 2**31 for s in steps)


def _tma_compatible(t):
    """TMA's rules for a 2-D global tensor: contiguous last dim, 16-byte aligned base, dimensions
    below 2^31 (int32 tile coordinates), and -- unless it has a single row -- a row stride that is
    a NONZERO multiple of 16 bytes below 2^40 bytes. A broadcast row (stride 0, e.g. dy of y.sum(0))
    is not a TMA tensor: the pointer path reads it (the CUDA side's tma_ok refuses it too)."""
    rows, cols = t.shape
    if t.stride(1) != 1 and cols > 1:
        return False
    if t.data_ptr() % 16 or rows >= 2**31 or cols >= 2**31:
        return False
    row_bytes = t.stride(0) * t.element_size()
    return rows <= 1 or (row_bytes > 0 and row_bytes % 16 == 0 and row_bytes < 2**40)


def _use_tma(cfg, arch, *operands):
    """Whether a kernel loads these 2-D operands through host TMA descriptors.

    By default: Hopper or newer (arch >= 9), a Triton with TensorDescriptor, FASTLAYERS_TRITON_TMA
    not "0", and every operand TMA-compatible. cfg["tma"] (the tests' private hook, also usable
    under the interpreter) forces it off, or on, raising ValueError if an operand cannot take TMA.
    """
    forced = cfg.get("tma")
    if forced is None:
        return (arch >= 9 and TensorDescriptor is not None
                and os.environ.get("FASTLAYERS_TRITON_TMA", "1") != "0"
                and all(_tma_compatible(t) for t in operands))
    if forced:
        if TensorDescriptor is None:
            raise ValueError("cfg['tma']=True: this Triton has no triton.tools.tensor_descriptor")
        for t in operands:
            if not _tma_compatible(t):
                raise ValueError(f"cfg['tma']=True: operand with strides {t.stride()} at address "
                                 f"{t.data_ptr()} is not TMA-compatible (16-byte alignment)")
    return bool(forced)


def _operand(t, use_tma, block_rows, block_cols):
    # A GEMM operand as the kernel takes it: the tensor itself or a host TMA descriptor whose
    # block is the tile one desc.load reads (out-of-bounds elements read as zero). A single row is
    # never stepped over, so its descriptor states the smallest valid row stride (any stride and
    # stride(1) the tensor has are then irrelevant).
    if not use_tma:
        return t
    rows, cols = t.shape
    row_stride = t.stride(0)
    if rows <= 1:
        per16 = 16 // t.element_size()
        row_stride = triton.cdiv(cols, per16) * per16
    return TensorDescriptor(t, [rows, cols], [row_stride, 1], [block_rows, block_cols])


def _dot_flags(dtype):
    # (UPCAST_DOT, DOT_PRECISION)
    if _INTERPRET:
        return dtype == torch.bfloat16, "ieee"
    return False, ("tf32" if dtype == torch.float32 else "ieee")


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def unsupported_reason(x, weight):
    """Why this backend cannot run linear on (x, weight), or None if it can."""
    if x.dtype not in _DTYPES:
        return f"x.dtype must be float16, bfloat16 or float32, got {x.dtype}"
    if weight.dtype != x.dtype:
        return f"weight.dtype must equal x.dtype ({x.dtype}), got {weight.dtype}"
    if x.device.type != "cuda" and not _INTERPRET:
        return f"x must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), got {x.device}"
    if weight.device != x.device:
        return f"weight must be on x's device {x.device}, got {weight.device}"
    if x.dim() != 2 or weight.dim() != 2:
        return f"x and weight must be 2-D, got {tuple(x.shape)} and {tuple(weight.shape)}"
    if x.shape[1] == 0:
        return "in_features (x.shape[1]) must be >= 1, got 0"
    if x.shape[1] != weight.shape[1]:
        return f"weight.shape[1] must equal x.shape[1] ({x.shape[1]}), got {weight.shape[1]}"
    if x.stride(1) != 1 and x.shape[1] > 1:
        return f"x.stride(1) must be 1, got {x.stride(1)}"
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        return f"weight.stride(1) must be 1, got {weight.stride(1)}"
    return None


def _check_rows(name, t, M, N):
    if t.shape != (M, N):
        raise ValueError(f"{name}: expected shape {(M, N)}, got {tuple(t.shape)}")
    if t.stride(1) != 1 and N > 1:
        raise ValueError(f"{name}: expected stride(1) == 1, got {t.stride(1)}")


def _check_bias(bias, N):
    # The kernels index bias as contiguous; ops/linear.py's vector_arg copies any other layout at the
    # op boundary (the one place the policy lives), so a view reaching here is a caller's bug.
    if bias.shape != (N,):
        raise ValueError(f"bias: expected shape {(N,)}, got {tuple(bias.shape)}")
    if N > 1 and bias.stride(0) != 1:
        raise ValueError(f"bias: expected a contiguous (N,) tensor (stride 1; the op boundary copies "
                         f"views with vector_arg), got stride {bias.stride(0)}")


def linear_fwd(x, weight, bias, activation, residual, save_preact: bool):
    """y = act(x @ weight.T + bias) + residual -> (y, preact); preact only when saved and act is set."""
    return _linear_fwd(x, weight, bias, activation, residual, save_preact, None)


def _linear_fwd(x, weight, bias, activation, residual, save_preact, cfg):
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"linear_fwd: {reason}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    M, K = x.shape                                                     # (M, K)
    N = weight.shape[0]                                                # weight (N, K)
    if bias is not None:
        _check_bias(bias, N)
    if residual is not None:
        _check_rows("residual", residual, M, N)
    store_preact = bool(save_preact) and activation is not None
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)            # (M, N)
    preact = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_preact else None
    if M == 0 or N == 0:
        return y, preact
    arch, num_sms = _device_info(_device_index(x))
    cfg, grid = fwd_launch(M, N, K, x.element_size(), arch, num_sms,
                           activation is not None or residual is not None, cfg)
    upcast, precision = _dot_flags(x.dtype)
    tma = _use_tma(cfg, arch, x, weight, *((residual,) if residual is not None else ()))
    _linear_fwd_kernel[grid](
        _operand(x, tma, cfg["BLOCK_M"], cfg["BLOCK_K"]),
        _operand(weight, tma, cfg["BLOCK_N"], cfg["BLOCK_K"]),
        bias if bias is not None else y,
        _operand(residual, tma, cfg["BLOCK_M"], cfg["BLOCK_N"]) if residual is not None else y,
        y, preact if store_preact else y,
        M, N, K, x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0,
        HAS_BIAS=bias is not None, ACTIVATION=_ACT_CODE[activation],
        HAS_RESIDUAL=residual is not None, STORE_PREACT=store_preact,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EVEN_K=K % cfg["BLOCK_K"] == 0,
        UPCAST_DOT=upcast, DOT_PRECISION=precision, USE_TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, preact


@functools.lru_cache(maxsize=4096)
def _split_m(M, N, K, cfg_items, num_sms):
    """Chunks of M for the dweight GEMM: enough (N, K, split) tiles to fill the SMs once, each
    chunk at least 8 M-steps long so the fp32 partials' extra traffic stays small. cfg is the dW
    config, whose BLOCK_M / BLOCK_N / BLOCK_K tile N / K / M. Returns (split, rows_per_split) with
    rows_per_split a multiple of the M step."""
    cfg = dict(cfg_items)
    tiles = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    m_blocks = triton.cdiv(M, cfg["BLOCK_K"])
    split = max(1, min(triton.cdiv(num_sms, tiles), m_blocks // 8, 16))
    blocks_per_split = triton.cdiv(m_blocks, split)
    split = triton.cdiv(m_blocks, blocks_per_split)
    return split, blocks_per_split * cfg["BLOCK_K"]


def linear_bwd(dy, x, weight, preact, activation, has_bias: bool, needs_dx: bool, needs_dw: bool):
    """Gradients of linear_fwd -> (dx, dweight, dbias); None for what is not needed."""
    return _linear_bwd(dy, x, weight, preact, activation, has_bias, needs_dx, needs_dw, None, None)


def _linear_bwd(dy, x, weight, preact, activation, has_bias, needs_dx, needs_dw, cfg_dx, cfg_dw,
                split=None):
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"linear_bwd: {reason}")
    if activation not in _ACT_CODE:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    M, K = x.shape                                                     # (M, K)
    N = weight.shape[0]                                                # weight (N, K)
    _check_rows("dy", dy, M, N)
    if dy.dtype != x.dtype:
        raise ValueError(f"dy.dtype: expected {x.dtype}, got {dy.dtype}")
    if activation is not None:
        if preact is None:
            raise ValueError(f"preact: required for activation={activation!r} (the forward must run "
                             "with save_preact=True; this backend does not recompute it)")
        _check_rows("preact", preact, M, N)
    act = _ACT_CODE[activation]
    z = preact if activation is not None else dy                       # dummy pointer when act == 0
    arch, num_sms = _device_info(_device_index(x))
    upcast, precision = _dot_flags(x.dtype)

    dx = dw = db = None
    if needs_dx:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)       # (M, K)
        if M > 0 and K > 0:
            if N == 0:
                dx.zero_()
            else:
                cfg, grid = dx_launch(M, N, K, x.element_size(), arch, num_sms, cfg_dx)
                # The dx GEMM is (M x K) with reduction N: BLOCK_K / BLOCK_N are swapped below.
                tma = _use_tma(cfg, arch, dy, weight, *((z,) if act else ()))
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_N"]
                _linear_bwd_dx_kernel[grid](
                    _operand(dy, tma, bm, bn), _operand(z, tma and act != 0, bm, bn),
                    _operand(weight, tma, bn, bk), dx, M, N, K,
                    dy.stride(0), z.stride(0), weight.stride(0),
                    ACTIVATION=act, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                    UPCAST_DOT=upcast, DOT_PRECISION=precision, USE_TMA=tma,
                    INT64_STEPS=_int64_steps(bn * weight.stride(0)),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if needs_dw or has_bias:
        dw = torch.empty((N, K), device=x.device, dtype=weight.dtype)  # (N, K)
        db = torch.empty((N,), device=x.device, dtype=weight.dtype) if has_bias else None
        if N > 0:
            if M == 0:
                dw.zero_()
                if db is not None:
                    db.zero_()
            else:
                _launch_dw(dy, z, x, dw, db, act, M, N, K, arch, num_sms, upcast, precision,
                           cfg_dw, split)
        if not needs_dw:
            dw = None
    return dx, dw, db


def _launch_dw(dy, z, x, dw, db, act, M, N, K, arch, num_sms, upcast, precision, cfg, split):
    # The dW GEMM is (N x K) with reduction M (see dw_launch).
    cfg, split, rows, grid, sum_dw, sum_db = dw_launch(M, N, K, x.element_size(), arch, num_sms, cfg, split)
    has_bias = db is not None
    if split == 1:
        dw_out, db_out = dw, db
    else:
        dw_out = torch.empty((split, N, K), device=x.device, dtype=torch.float32)  # (S, N, K)
        db_out = torch.empty((split, N), device=x.device, dtype=torch.float32) if has_bias else None
    _linear_bwd_dw_kernel[grid](
        dy, z, x, dw_out, db_out if has_bias else dw_out, M, N, K, rows, split,
        dy.stride(0), z.stride(0), x.stride(0),
        ACTIVATION=act, HAS_BIAS=has_bias,
        BLOCK_M=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"], UPCAST_DOT=upcast, DOT_PRECISION=precision,
        INT64_STEPS=_int64_steps(*(cfg["BLOCK_K"] * t.stride(0) for t in (dy, z, x)), split * N),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        _sum_splits_kernel[sum_dw](dw_out, dw, N * K, split, BLOCK=_SUM_BLOCK)
        if has_bias:
            _sum_splits_kernel[sum_db](db_out, db, N, split, BLOCK=_SUM_BLOCK)
