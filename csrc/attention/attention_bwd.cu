// attention_bwd.cu -- FlashAttention-2 style backward on tensor cores, recomputing P from lse.
//
//   1. attention_bwd_preprocess_kernel: delta = rowsum(dO * O) (fp32, (B, H, Lq)); in the atomic
//      mode it also zeroes the fp32 dQ accumulator (B, Lq, H, D).
//   2. attention_bwd_dkdv_kernel: one CTA per (64-key tile, head, batch), 4 warps x 16 keys; loops
//      over the query tiles that can see its keys (bottom-right causal), keeping dK, dV in
//      registers.  Works on transposed scores S^T = K Q^T so that P^T and dS^T come out of the
//      accumulators already in the A layout of dV += P^T dO and dK += dS^T Q.  In the atomic
//      (non-deterministic) mode it also stores dS^T to smem and atomically adds dQ += dS K.
//   3. deterministic mode: attention_bwd_dq_kernel, one CTA per 64-query tile looping over key
//      tiles (no atomics, fixed summation order); atomic mode: attention_bwd_dq_convert_kernel.
// Dropout: the mask is replayed from the same counter-based philox as the forward.
//   dV_j = sum_i P_ij Z_ij / (1-p) dO_i ; dS_ij = P_ij (Z_ij / (1-p) dO_i.V_j - delta_i)
//   dQ = scale dS K ; dK = scale dS^T Q        (P is the pre-dropout softmax, Z the keep mask)
// Rows with no key have lse = +inf, so P = 0 and all their gradients are 0.  Keys masked by
// key_padding_mask are zero-filled on load (never read): their S, dP are finite, P = 0 makes their
// dS = 0, so NaN / inf in their K/V rows reaches no gradient, and their dk, dv are 0.
// The dropout [seed, offset] is read from device memory (rng_state) when the kernels run.
// Grids: launch_grid (attention_common.cuh); the (b, h) index comes from axes y and z.
#include <algorithm>
#include <string>

#include "attention/attention_common.cuh"

namespace fl {
namespace attn {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.442695040888963407f;

template <int D, typename T>
__global__ void __launch_bounds__(kNumThreads) attention_bwd_preprocess_kernel(const Params p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Lq * p.H;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // (b, i, h) flattened; the grid is capped
    const int h = static_cast<int>(row % p.H);
    const int i = static_cast<int>((row / p.H) % p.Lq);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.H) * p.Lq));
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_b + i * p.do_l + h * p.do_h;
    const T* out = static_cast<const T*>(p.out) + b * p.out_b + i * p.out_l + h * p.out_h;
    float s = 0.f;
    for (int c = lane * 8; c < D; c += 32 * 8) {  // 16-byte loads
      const uint4 a = *reinterpret_cast<const uint4*>(dout + c);
      const uint4 o = *reinterpret_cast<const uint4*>(out + c);
      const T* av = reinterpret_cast<const T*>(&a);
      const T* ov = reinterpret_cast<const T*>(&o);
#pragma unroll
      for (int e = 0; e < 8; ++e) s += to_float(av[e]) * to_float(ov[e]);
    }
    s = warp_sum(s);
    if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.H + h) * p.Lq + i] = s;
    if (p.dq_accum != nullptr)
      for (int d = lane; d < D; d += 32) p.dq_accum[row * D + d] = 0.f;
  }
}

template <int D, typename T>
constexpr int dkdv_smem_bytes() {
  using Tr = Traits<D>;
  return (2 * Tr::kBwdBlockN + 2 * Tr::kBwdBlockM) * Tr::kStride * static_cast<int>(sizeof(T)) +
         Tr::kBwdBlockN * (Tr::kBwdBlockM + 8) * static_cast<int>(sizeof(T)) +
         2 * Tr::kBwdBlockM * static_cast<int>(sizeof(float));
}

template <int D, typename T, bool DQ_ATOMIC>
__global__ void __launch_bounds__(kNumThreads) attention_bwd_dkdv_kernel(const Params p) {
  using Tr = Traits<D>;
  constexpr int BN = Tr::kBwdBlockN, BM = Tr::kBwdBlockM, LD = Tr::kStride, LDS = BM + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // BN x LD
  T* sV = sK + BN * LD;                    // BN x LD
  T* sQ = sV + BN * LD;                    // BM x LD
  T* sdO = sQ + BM * LD;                   // BM x LD
  T* sdS = sdO + BM * LD;                  // BN x LDS: dS^T (keys x queries), atomic mode
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);  // BM: lse * log2 e (+inf past Lq)
  float* sDelta = sLse + BM;                                // BM

  const int64_t bh = grid_head();
  if (bh >= static_cast<int64_t>(p.B) * p.H) return;  // grid overhang
  const int n_block = blockIdx.x, h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nq = p.Lq, nk = p.Lk;
  const int n0 = n_block * BN;
  const int key0 = n0 + warp * 16 + g;  // this thread's keys: key0 and key0 + 8

  const T* q = static_cast<const T*>(p.q) + b * p.q_b + h * p.q_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_b + h * p.k_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_b + h * p.v_h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_b + h * p.do_h;
  const int64_t bh_row = (static_cast<int64_t>(b) * p.H + h) * nq;

  // Query tiles that can see a key of this tile: causal i >= j - (nk - nq).
  const int m_begin = p.causal ? max(0, n0 - (nk - nq)) / BM : 0;
  const int m_end = (nq + BM - 1) / BM;

  const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_b : nullptr;  // masked keys: zero-filled
  load_tile_async<BN, D>(sK, k, p.k_l, n0, nk, kpm, p.kpm_l);
  load_tile_async<BN, D>(sV, v, p.v_l, n0, nk, kpm, p.kpm_l);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  const bool has_dropout = p.dropout_p > 0.f;
  // Read once per CTA here (ptxas: reloading it per tile inside the loop spills the D = 128 dk/dv
  // and the D = 96 dq kernels on sm_90a); read when the kernel runs, so graph replays see redraws.
  DropoutState ds{0, 0};
  if (has_dropout) ds = dropout_state(p, b, h);

  for (int mt = m_begin; mt < m_end; ++mt) {
    const int mm0 = mt * BM;
    load_tile_async<BM, D>(sQ, q, p.q_l, mm0, nq);
    load_tile_async<BM, D>(sdO, dout, p.do_l, mm0, nq);
    cp_async_commit();
    for (int r = threadIdx.x; r < BM; r += kNumThreads) {
      const bool ok = mm0 + r < nq;
      sLse[r] = ok ? p.lse[bh_row + mm0 + r] * kLog2e : kInf;
      sDelta[r] = ok ? p.delta[bh_row + mm0 + r] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    float st[BM / 8][4];  // S^T, then P^T (pre-dropout), then P^T with dropout applied
    zero(st);
    gemm_ss<BM, D, false, true>(st, sK, LD, warp * 16, sQ, LD, 0);  // S^T = K Q^T (16 keys x BM)
    float dpt[BM / 8][4];  // dP^T, then dS^T
    zero(dpt);
    gemm_ss<BM, D, false, true>(dpt, sV, LD, warp * 16, sdO, LD, 0);  // dP^T = V dO^T

    const bool need_mask = n0 + BN > nk || p.kpm != nullptr || (p.causal && n0 + BN - 1 > mm0 + nk - nq);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = j * 8 + 2 * t + (e & 1);  // query column in the tile
        const int i = mm0 + qc, key = key0 + (e >> 1) * 8;
        float pt = exp2f(st[j][e] * p.scale_log2 - sLse[qc]);
        if (need_mask && !attends(p, b, i, key, nk, nq)) pt = 0.f;
        float dp = dpt[j][e];
        float pd = pt;
        if (has_dropout) {
          const bool keep = dropout_keep(ds.seed, dropout_counter(p, ds, i, key), p.dropout_p);
          pd = keep ? pt * p.dropout_rescale : 0.f;
          dp = keep ? dp * p.dropout_rescale : 0.f;
        }
        st[j][e] = pd;
        dpt[j][e] = pt * (dp - sDelta[qc]);
      }

    uint32_t a[BM / 16][4];
    c_to_a<BM, T>(a, st);
    gemm_rs<D, BM, false>(dv, a, sdO, LD, 0);  // dV += P^T dO
    c_to_a<BM, T>(a, dpt);
    gemm_rs<D, BM, false>(dk, a, sQ, LD, 0);   // dK += dS^T Q

    if (DQ_ATOMIC) {
      // dS^T to smem (keys x queries), then dQ (BM x D) += dS K, split over the 4 warps.
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * LDS + j * 8 + 2 * t) = a[j / 2][(j & 1) * 2];
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * LDS + j * 8 + 2 * t) = a[j / 2][(j & 1) * 2 + 1];
      }
      __syncthreads();
      constexpr int kRowGroups = BM / 16, kColGroups = kWarps / kRowGroups, DW = D / kColGroups;
      static_assert(kRowGroups * kColGroups == kWarps && DW % 16 == 0, "dQ warp split");
      const int rg = warp % kRowGroups, cg = warp / kRowGroups;
      float dq[DW / 8][4];
      zero(dq);
      gemm_ss<DW, BN, true, false>(dq, sdS, LDS, rg * 16, sK, LD, cg * DW);
#pragma unroll
      for (int j = 0; j < DW / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = mm0 + rg * 16 + g + (e >> 1) * 8, d = cg * DW + j * 8 + 2 * t + (e & 1);
          if (i < nq) atomicAdd(p.dq_accum + ((static_cast<int64_t>(b) * nq + i) * p.H + h) * D + d, dq[j][e]);
        }
    }
    __syncthreads();  // every warp is done with sQ / sdO / sdS / sLse before the next tile refills them
  }
  cp_async_wait<0>();  // (no tile ran: the K/V copies must still land before the CTA exits)

  T* dkp = static_cast<T*>(p.dk) + b * p.dk_b + h * p.dk_h;
  T* dvp = static_cast<T*>(p.dv) + b * p.dv_b + h * p.dv_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + r * 8;
    if (key >= nk) continue;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      const int col = d * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dkp + key * p.dk_l + col) = pack2<T>(dk[d][2 * r] * p.scale, dk[d][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvp + key * p.dv_l + col) = pack2<T>(dv[d][2 * r], dv[d][2 * r + 1]);
    }
  }
}

template <int D, typename T>
constexpr int dq_smem_bytes() {
  using Tr = Traits<D>;
  return (2 * Tr::kBlockM + 4 * Tr::kBlockN) * Tr::kStride * static_cast<int>(sizeof(T));
}

// Deterministic dQ: one CTA per (64-query tile, head, batch) looping over its key tiles in order,
// K/V double-buffered like the forward.
template <int D, typename T>
__global__ void __launch_bounds__(kNumThreads) attention_bwd_dq_kernel(const Params p) {
  using Tr = Traits<D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x LD
  T* sdO = sQ + BM * LD;                   // BM x LD
  T* sK = sdO + BM * LD;                   // 2 x BN x LD
  T* sV = sK + 2 * BN * LD;                // 2 x BN x LD

  const int64_t bh = grid_head();
  if (bh >= static_cast<int64_t>(p.B) * p.H) return;  // grid overhang
  const int m_block = blockIdx.x, h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nq = p.Lq, nk = p.Lk;
  const int m0 = m_block * BM;
  const int row0 = m0 + warp * 16 + g;
  const int64_t bh_row = (static_cast<int64_t>(b) * p.H + h) * nq;

  int tile_end = (nk + BN - 1) / BN;
  if (p.causal) {
    const int last_key = min(m0 + BM, nq) - 1 + nk - nq;
    tile_end = last_key < 0 ? 0 : min(tile_end, last_key / BN + 1);
  }

  float dq[D / 8][4];
  zero(dq);
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + r * 8;
    lse2[r] = i < nq ? p.lse[bh_row + i] * kLog2e : kInf;
    delta[r] = i < nq ? p.delta[bh_row + i] : 0.f;
  }
  const bool has_dropout = p.dropout_p > 0.f;
  // Read once per CTA here (ptxas: reloading it per tile inside the loop spills the D = 128 dk/dv
  // and the D = 96 dq kernels on sm_90a); read when the kernel runs, so graph replays see redraws.
  DropoutState ds{0, 0};
  if (has_dropout) ds = dropout_state(p, b, h);

  if (tile_end > 0) {
    const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_b : nullptr;  // masked keys: zero-filled
    const T* q = static_cast<const T*>(p.q) + b * p.q_b + h * p.q_h;
    const T* k = static_cast<const T*>(p.k) + b * p.k_b + h * p.k_h;
    const T* v = static_cast<const T*>(p.v) + b * p.v_b + h * p.v_h;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_b + h * p.do_h;
    load_tile_async<BM, D>(sQ, q, p.q_l, m0, nq);
    load_tile_async<BM, D>(sdO, dout, p.do_l, m0, nq);
    load_tile_async<BN, D>(sK, k, p.k_l, 0, nk, kpm, p.kpm_l);
    load_tile_async<BN, D>(sV, v, p.v_l, 0, nk, kpm, p.kpm_l);
    cp_async_commit();

    for (int tile = 0; tile < tile_end; ++tile) {
      const int buf = tile & 1;
      if (tile + 1 < tile_end) {
        load_tile_async<BN, D>(sK + (buf ^ 1) * BN * LD, k, p.k_l, (tile + 1) * BN, nk, kpm, p.kpm_l);
        load_tile_async<BN, D>(sV + (buf ^ 1) * BN * LD, v, p.v_l, (tile + 1) * BN, nk, kpm, p.kpm_l);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* cK = sK + buf * BN * LD;
      const T* cV = sV + buf * BN * LD;

      float s[BN / 8][4];
      zero(s);
      gemm_ss<BN, D, false, true>(s, sQ, LD, warp * 16, cK, LD, 0);  // S = Q K^T
      float dp[BN / 8][4];
      zero(dp);
      gemm_ss<BN, D, false, true>(dp, sdO, LD, warp * 16, cV, LD, 0);  // dP = dO V^T

      const int n0 = tile * BN;
      const bool need_mask = n0 + BN > nk || p.kpm != nullptr || (p.causal && n0 + BN - 1 > m0 + nk - nq);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row0 + (e >> 1) * 8, key = n0 + j * 8 + 2 * t + (e & 1);
          float pv = exp2f(s[j][e] * p.scale_log2 - lse2[e >> 1]);
          if (need_mask && !attends(p, b, i, key, nk, nq)) pv = 0.f;
          float d = dp[j][e];
          if (has_dropout)
            d = dropout_keep(ds.seed, dropout_counter(p, ds, i, key), p.dropout_p) ? d * p.dropout_rescale : 0.f;
          s[j][e] = pv * (d - delta[e >> 1]);  // dS
        }
      uint32_t a[BN / 16][4];
      c_to_a<BN, T>(a, s);
      gemm_rs<D, BN, false>(dq, a, cK, LD, 0);  // dQ += dS K
      __syncthreads();
    }
  }

  T* dqp = static_cast<T*>(p.dq) + b * p.dq_b + h * p.dq_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + r * 8;
    if (i >= nq) continue;
#pragma unroll
    for (int d = 0; d < D / 8; ++d)
      *reinterpret_cast<uint32_t*>(dqp + i * p.dq_l + d * 8 + 2 * t) =
          pack2<T>(dq[d][2 * r] * p.scale, dq[d][2 * r + 1] * p.scale);
  }
}

// Atomic mode: dq = scale * dq_accum in the output dtype; 4 elements per thread.
template <typename T>
__global__ void attention_bwd_dq_convert_kernel(const Params p, int D) {
  const int64_t total4 = static_cast<int64_t>(p.B) * p.Lq * p.H * D / 4;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total4;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = idx * 4, row = e / D;  // row = (b, i, h) flattened
    const int d = static_cast<int>(e % D);
    const int h = static_cast<int>(row % p.H);
    const int i = static_cast<int>((row / p.H) % p.Lq);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.H) * p.Lq));
    const float4 x = *reinterpret_cast<const float4*>(p.dq_accum + e);
    T* dst = static_cast<T*>(p.dq) + b * p.dq_b + i * p.dq_l + h * p.dq_h + d;
    uint2 packed;
    packed.x = pack2<T>(x.x * p.scale, x.y * p.scale);
    packed.y = pack2<T>(x.z * p.scale, x.w * p.scale);
    *reinterpret_cast<uint2*>(dst) = packed;
  }
}

template <int D, typename T>
fl_status launch_bwd(const Params& p, bool deterministic, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Lq * p.H;
  LaunchGrid g;
  if (rows > 0) {
    FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_BWD_PREPROCESS, p.B, p.Lq, p.Lk, p.H, D, 1, &g));
    attention_bwd_preprocess_kernel<D, T><<<to_dim3(g), kNumThreads, 0, stream>>>(p);
    FL_RETURN_IF_ERROR(check_launch("attention_bwd_preprocess_kernel"));
  }

  if (p.Lk > 0) {
    constexpr int smem = dkdv_smem_bytes<D, T>();
    FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_BWD_DKDV, p.B, p.Lq, p.Lk, p.H, D, 1, &g));
    const dim3 grid = to_dim3(g);
    if (deterministic) {
      if (smem > 48 * 1024)
        FL_CUDA_CHECK(cudaFuncSetAttribute(attention_bwd_dkdv_kernel<D, T, false>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      attention_bwd_dkdv_kernel<D, T, false><<<grid, kNumThreads, smem, stream>>>(p);
    } else {
      if (smem > 48 * 1024)
        FL_CUDA_CHECK(cudaFuncSetAttribute(attention_bwd_dkdv_kernel<D, T, true>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      attention_bwd_dkdv_kernel<D, T, true><<<grid, kNumThreads, smem, stream>>>(p);
    }
    FL_RETURN_IF_ERROR(check_launch("attention_bwd_dkdv_kernel"));
  }

  if (rows == 0) return FL_OK;  // no query: dq is empty
  if (deterministic) {
    constexpr int smem = dq_smem_bytes<D, T>();
    if (smem > 48 * 1024)
      FL_CUDA_CHECK(cudaFuncSetAttribute(attention_bwd_dq_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_BWD_DQ, p.B, p.Lq, p.Lk, p.H, D, 1, &g));
    attention_bwd_dq_kernel<D, T><<<to_dim3(g), kNumThreads, smem, stream>>>(p);
    FL_RETURN_IF_ERROR(check_launch("attention_bwd_dq_kernel"));
  } else {
    FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_BWD_DQ_CONVERT, p.B, p.Lq, p.Lk, p.H, D, 1, &g));
    attention_bwd_dq_convert_kernel<T><<<to_dim3(g), 256, 0, stream>>>(p, D);
    FL_RETURN_IF_ERROR(check_launch("attention_bwd_dq_convert_kernel"));
  }
  return FL_OK;
}

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

}  // namespace
}  // namespace attn
}  // namespace fl

#define FL_ATTN_REQUIRE_ROWS(name, ptr, sb, sl, sh)                                                    \
  FL_REQUIRE(ptr != nullptr, "%s: pointer is NULL", name);                                             \
  FL_REQUIRE((reinterpret_cast<uintptr_t>(ptr) & 15u) == 0, "%s: pointer must be 16-byte aligned, got %p", name, ptr); \
  FL_REQUIRE((sb) % 8 == 0 && (sl) % 8 == 0 && (sh) % 8 == 0,                                          \
             "%s: (b, l, h) strides must be multiples of 8 elements (16-byte rows), got (%lld, %lld, %lld)", \
             name, (long long)(sb), (long long)(sl), (long long)(sh))

extern "C" fl_status fl_attention_bwd_workspace_size(int64_t B, int64_t Lq, int64_t H, int64_t D,
                                                     int32_t deterministic, size_t* bytes) {
  FL_REQUIRE(bytes != nullptr, "fl_attention_bwd_workspace_size: bytes is NULL");
  FL_REQUIRE(B >= 0 && Lq >= 0 && H >= 0 && D >= 0,
             "fl_attention_bwd_workspace_size: sizes must be >= 0, got B=%lld Lq=%lld H=%lld D=%lld",
             (long long)B, (long long)Lq, (long long)H, (long long)D);
  const size_t rows = static_cast<size_t>(B) * Lq * H;
  *bytes = fl::attn::align256(rows * sizeof(float)) +                        // delta (B, H, Lq)
           (deterministic ? 0 : rows * static_cast<size_t>(D) * sizeof(float));  // dq_accum (B, Lq, H, D)
  return FL_OK;
}

extern "C" fl_status fl_attention_bwd(const void* dout, int64_t do_b, int64_t do_l, int64_t do_h,
                                      const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                      const void* k, int64_t k_b, int64_t k_l, int64_t k_h,
                                      const void* v, int64_t v_b, int64_t v_l, int64_t v_h,
                                      const void* o, int64_t o_b, int64_t o_l, int64_t o_h,
                                      const float* lse,
                                      const uint8_t* key_padding_mask, int64_t kpm_b, int64_t kpm_l,
                                      void* dq, int64_t dq_b, int64_t dq_l, int64_t dq_h,
                                      void* dk, int64_t dk_b, int64_t dk_l, int64_t dk_h,
                                      void* dv, int64_t dv_b, int64_t dv_l, int64_t dv_h,
                                      void* workspace, size_t workspace_bytes,
                                      int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                      float softmax_scale, int32_t causal, float dropout_p,
                                      const int64_t* rng_state, int32_t deterministic,
                                      int32_t dtype, void* stream) {
  FL_REQUIRE(B >= 0 && Lq >= 0 && Lk >= 0 && H >= 0, "fl_attention_bwd: sizes must be >= 0, got B=%lld Lq=%lld Lk=%lld H=%lld",
             (long long)B, (long long)Lq, (long long)Lk, (long long)H);
  FL_REQUIRE(B < (1ll << 31) && H < (1ll << 31) && Lq < (1ll << 31) && Lk < (1ll << 31),
             "fl_attention_bwd: B, H, Lq and Lk must be < 2^31, got B=%lld H=%lld Lq=%lld Lk=%lld",
             (long long)B, (long long)H, (long long)Lq, (long long)Lk);
  FL_REQUIRE(dropout_p >= 0.f && dropout_p < 1.f, "fl_attention_bwd: dropout_p must be in [0, 1), got %g", dropout_p);
  FL_REQUIRE(dropout_p == 0.f || rng_state != nullptr,
             "fl_attention_bwd: rng_state (device int64 [seed, offset]) is NULL with dropout_p = %g", dropout_p);
  if (B == 0 || H == 0 || (Lq == 0 && Lk == 0)) return FL_OK;
  if (Lq > 0) {
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: dout", dout, do_b, do_l, do_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: q", q, q_b, q_l, q_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: o", o, o_b, o_l, o_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: dq", dq, dq_b, dq_l, dq_h);
    FL_REQUIRE(lse != nullptr, "fl_attention_bwd: lse is NULL");
  }
  if (Lk > 0) {
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: k", k, k_b, k_l, k_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: v", v, v_b, v_l, v_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: dk", dk, dk_b, dk_l, dk_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_bwd: dv", dv, dv_b, dv_l, dv_h);
  }
  size_t need = 0;
  FL_RETURN_IF_ERROR(fl_attention_bwd_workspace_size(B, Lq, H, D, deterministic, &need));
  FL_REQUIRE(workspace != nullptr && workspace_bytes >= need && (reinterpret_cast<uintptr_t>(workspace) & 255u) == 0,
             "fl_attention_bwd: workspace must be 256-byte aligned and hold %zu bytes "
             "(fl_attention_bwd_workspace_size), got %zu bytes at %p", need, workspace_bytes, workspace);

  fl::attn::Params p{};
  p.q = q; p.q_b = q_b; p.q_l = q_l; p.q_h = q_h;
  p.k = k; p.k_b = k_b; p.k_l = k_l; p.k_h = k_h;
  p.v = v; p.v_b = v_b; p.v_l = v_l; p.v_h = v_h;
  p.lse = const_cast<float*>(lse);
  p.kpm = key_padding_mask; p.kpm_b = kpm_b; p.kpm_l = kpm_l;
  p.B = (int)B; p.H = (int)H; p.Lq = (int)Lq; p.Lk = (int)Lk;
  p.scale = softmax_scale; p.scale_log2 = softmax_scale * 1.442695040888963407f;
  p.causal = causal != 0;
  p.dropout_p = dropout_p; p.dropout_rescale = 1.f / (1.f - dropout_p);
  p.rng_state = rng_state;
  p.num_splits = 1;
  p.dout = dout; p.do_b = do_b; p.do_l = do_l; p.do_h = do_h;
  p.out = o; p.out_b = o_b; p.out_l = o_l; p.out_h = o_h;
  p.dq = dq; p.dq_b = dq_b; p.dq_l = dq_l; p.dq_h = dq_h;
  p.dk = dk; p.dk_b = dk_b; p.dk_l = dk_l; p.dk_h = dk_h;
  p.dv = dv; p.dv_b = dv_b; p.dv_l = dv_l; p.dv_h = dv_h;
  p.delta = static_cast<float*>(workspace);
  p.dq_accum = deterministic ? nullptr
                             : reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                        fl::attn::align256(static_cast<size_t>(B) * Lq * H * sizeof(float)));
  cudaStream_t st = fl::as_stream(stream);
  return FL_DISPATCH_HALF(dtype, "fl_attention_bwd", [&] {
    return FL_ATTN_DISPATCH_HEAD_DIM(D, "fl_attention_bwd", [&] {
      return fl::attn::launch_bwd<kHeadDim, scalar_t>(p, deterministic != 0, st);
    });
  });
}
