// attention_fwd_sm90.cu -- FlashAttention-3 style forward for Hopper (sm_90a): TMA + mbarrier
// producer/consumer pipeline and wgmma, for D in {64, 128}, fp16 / bf16, no dropout.
//
// One CTA per (128-query tile, head, batch), 3 warpgroups: warpgroup 0 is the producer (one thread
// issues every TMA copy: Q once, then K and V tiles into a 2-stage ring guarded by full / empty
// mbarriers); warpgroups 1 and 2 each own 64 query rows.  Per key tile a consumer computes
// S = Q K^T (wgmma, both operands in shared memory), and while O += P V of the previous tile runs
// (wgmma, P from registers) it does the online softmax of S (exp2 domain, fp32 row max / row sum
// on the accumulator layout described in attention_fwd_sm90.cuh).  Masks (key tail, bottom-right
// causal) are applied element-wise on tiles that need them; TMA zero-fills out-of-range rows, so
// keys past Lk contribute exactly 0 to P V.  key_padding_mask runs the mma.sync kernel instead: TMA
// copies a masked key's V row as it is, and a NaN / inf there would turn its P = 0 into NaN in P V.  Output: normalised O staged
// through the warpgroup's own Q rows in shared memory, stored with 16-byte predicated writes;
// lse = +inf and o = 0 for rows with no key, as the mma.sync kernel (attention_fwd.cu) does.
// Host side: tensor maps are encoded with cuTensorMapEncodeTiled obtained from the runtime's
// driver entry point (libcuda is not linked; fl::hopper::encode_tiled_fn, common/hopper.cu); 4-D maps over the (B, L, H, D) strided layout with
// the three outer dims sorted by stride, so no copy is made.
#include "attention/attention_fwd_sm90.cuh"

#include <algorithm>
#include <type_traits>

namespace fl {
namespace attn {
namespace sm90 {
namespace {

[[maybe_unused]] constexpr float kInf = __builtin_huge_valf();
[[maybe_unused]] constexpr float kLn2 = 0.693147180559945309f;

template <int D, typename T>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                              const __grid_constant__ CUtensorMap tv, const MapOrder oq, const MapOrder ok,
                              const MapOrder ov, const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Plan = SmemPlan<D>;
  constexpr int BM = kBlockM, BN = kBlockN, kDBlocks = D / 64;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms need 1024
  unsigned char* smem = smem_raw + (smem_base - smem_addr(smem_raw));
  const uint32_t sQ = smem_base + Plan::kQ, sK = smem_base + Plan::kK, sV = smem_base + Plan::kV;
  const uint32_t bar_q = smem_base + Plan::kBars;
  auto bar_kfull = [&](int s) { return bar_q + 8u * (1 + s); };
  auto bar_vfull = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  auto bar_kempty = [&](int s) { return bar_q + 8u * (1 + 2 * kStages + s); };
  auto bar_vempty = [&](int s) { return bar_q + 8u * (1 + 3 * kStages + s); };

  // Causal: the heaviest query tiles (last rows) start first.
  const int m_block = p.causal ? static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x) : blockIdx.x;
  const int64_t bh = grid_head();  // (b, h) from grid axes y and z (launch_grid)
  if (bh >= static_cast<int64_t>(p.B) * p.H) return;  // grid overhang: the whole CTA leaves
  const int h = static_cast<int>(bh % p.H), b = static_cast<int>(bh / p.H);
  const int nq = p.Lq, nk = p.Lk, m0 = m_block * BM;
  const int n_tiles = (nk + BN - 1) / BN;
  int tile_end = n_tiles;
  if (p.causal) {
    const int last_key = min(m0 + BM, nq) - 1 + nk - nq;
    tile_end = last_key < 0 ? 0 : min(tile_end, last_key / BN + 1);
  }
  const int64_t bh_row = (static_cast<int64_t>(b) * p.H + h) * nq;  // row base of lse (B, H, Lq)
  T* out = static_cast<T*>(p.o) + b * p.o_b + h * p.o_h;

  if (tile_end == 0) {  // no row of this tile attends any key
    for (int c = threadIdx.x; c < BM * (D / 8); c += kThreads) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8, i = m0 + r;
      if (i >= nq) continue;
      *reinterpret_cast<uint4*>(out + i * p.o_l + col) = make_uint4(0u, 0u, 0u, 0u);
      if (col == 0) p.lse[bh_row + i] = kInf;
    }
    return;
  }

  if (threadIdx.x == 0) {
    hopper::mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      hopper::mbar_init(bar_kfull(s), 1);
      hopper::mbar_init(bar_vfull(s), 1);
      hopper::mbar_init(bar_kempty(s), 8);  // one arrival per consumer warp
      hopper::mbar_init(bar_vempty(s), 8);
    }
    hopper::fence_mbarrier_init();
    hopper::fence_proxy_async_shared();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    hopper::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      hopper::prefetch_tensormap(&tq);
      hopper::prefetch_tensormap(&tk);
      hopper::prefetch_tensormap(&tv);
      // coordinate c of a map: c[0] = column, c[order.l] = row, c[order.h] = h, c[order.b] = b
      auto load = [&](const CUtensorMap* map, const MapOrder& o, uint32_t dst, uint32_t bar, int rows, int row0) {
#pragma unroll
        for (int cb = 0; cb < kDBlocks; ++cb) {
          int c[4] = {cb * 64, 0, 0, 0};
#pragma unroll
          for (int i = 1; i < 4; ++i) c[i] = o.l == i ? row0 : (o.h == i ? h : b);
          hopper::tma_load_4d(dst + cb * rows * 128, map, bar, c[0], c[1], c[2], c[3]);
        }
      };
      hopper::mbar_arrive_expect_tx(bar_q, Plan::kQBytes);
      load(&tq, oq, sQ, bar_q, BM, m0);
      for (int it = 0; it < tile_end; ++it) {
        const int s = it % kStages;
        const uint32_t parity = ((it / kStages) & 1) ^ 1;  // the first lap waits on nothing
        if (it >= kStages) hopper::mbar_wait(bar_kempty(s), parity);
        hopper::mbar_arrive_expect_tx(bar_kfull(s), Plan::kTileBytes);
        load(&tk, ok, sK + s * Plan::kTileBytes, bar_kfull(s), BN, it * BN);
        if (it >= kStages) hopper::mbar_wait(bar_vempty(s), parity);
        hopper::mbar_arrive_expect_tx(bar_vfull(s), Plan::kTileBytes);
        load(&tv, ov, sV + s * Plan::kTileBytes, bar_vfull(s), BN, it * BN);
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  hopper::setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;                          // consumer warpgroup: rows 64*cw .. of the tile
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wg_row0 = m0 + cw * 64;
  const int row0 = wg_row0 + warp * 16 + g;       // this thread's rows: row0, row0 + 8
  const int diag = nk - nq;                       // causal: key j visible to row i iff j <= i + diag
  const bool has_kpm = p.kpm != nullptr;
  const uint8_t* kpm = has_kpm ? p.kpm + b * p.kpm_b : nullptr;
  const uint32_t q_wg = sQ + cw * 64 * 128;       // this warpgroup's 64 rows in each column block

  float s[BN / 2];        // S tile, m64n128 accumulator
  float o[D / 2];         // O, m64nD accumulator
  uint32_t pa[BN / 16][4];  // P as the register A operand, one k16 slice per entry
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;

  auto issue_qk = [&](int stage) {
    const uint32_t k_tile = sK + stage * Plan::kTileBytes;
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk % 4) * 32;  // k16 slice inside the 128-byte row
      const uint64_t da = sw128_desc(q_wg + (kk / 4) * BM * 128 + off, 16, 1024);
      const uint64_t db = sw128_desc(k_tile + (kk / 4) * BN * 128 + off, 16, 1024);
      Wgmma<T>::ss_n128(s, da, db, kk > 0 ? 1 : 0);
    }
    hopper::wgmma_commit();
  };
  auto issue_pv = [&](int stage) {
    const uint32_t v_tile = sV + stage * Plan::kTileBytes;
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t db = sw128_desc(v_tile + kk * 2048, BN * 128, 1024);
      if constexpr (D == 128) Wgmma<T>::rs_n128(o, pa[kk], db);
      else Wgmma<T>::rs_n64(o, pa[kk], db);
    }
    hopper::wgmma_commit();
  };
  // Scores -> exp2 domain, masks, new row max, p = exp2(x - max) in place, row sums.  alpha is the
  // factor O must be rescaled by (applied by the caller once the P V in flight is done).
  auto softmax = [&](int tile) {
    const int n0 = tile * BN;
    const bool need_mask = n0 + BN > nk || has_kpm || (p.causal && n0 + BN - 1 > wg_row0 + diag);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] *= p.scale_log2;
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + j * 8 + 2 * t + e;
          bool ok = col < nk;
          if (ok && has_kpm) ok = kpm[static_cast<int64_t>(col) * p.kpm_l] != 0;
          const bool ok0 = ok && (!p.causal || col <= row0 + diag);
          const bool ok1 = ok && (!p.causal || col <= row0 + 8 + diag);
          if (!ok0) s[4 * j + e] = -kInf;
          if (!ok1) s[4 * j + 2 + e] = -kInf;
        }
    }
    // A row with no key so far keeps max -inf; it exponentiates against 0 so no (-inf) - (-inf)
    // NaN appears, and its p, l, O stay 0.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == -kInf ? 0.f : mx;
      alpha[r] = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[4 * j + 2 * r] = exp2f(s[4 * j + 2 * r] - m_use);
        s[4 * j + 2 * r + 1] = exp2f(s[4 * j + 2 * r + 1] - m_use);
        sum += s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
    }
  };
  auto to_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);  // row g,   keys 16kk + 2t, +1
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);  // row g+8, keys 16kk + 2t, +1
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);  // row g,   keys 16kk + 8 + 2t, +1
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);  // row g+8, keys 16kk + 8 + 2t, +1
    }
  };
  auto rescale_o = [&]() {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j + 0] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) hopper::mbar_arrive(bar);
  };
  // Ping-pong between the two consumer warpgroups: each issues its GEMMs only after the other has
  // issued its own, so one warpgroup's softmax runs while the other's GEMMs use the tensor cores.
  // Named barrier 3 + c (256 threads: 128 waiting in warpgroup c, 128 arriving from the other).
  // Both warpgroups pass the same number of issue points (tile_end + 1), warpgroup 1 arrives once
  // up front so that warpgroup 0 goes first, and warpgroup 0 consumes the last arrival at the end.
  auto sched_wait = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(3 + cw) : "memory"); };
  auto sched_pass = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(3 + (cw ^ 1)) : "memory"); };
  if (cw == 1) sched_pass();

  hopper::mbar_wait(bar_q, 0);
  // Tile 0: S only.
  hopper::mbar_wait(bar_kfull(0), 0);
  sched_wait();
  issue_qk(0);
  sched_pass();
  hopper::wgmma_wait<0>();
  pin(s);
  release(bar_kempty(0));
  softmax(0);
  to_p();
  // Tile it: S_it = Q K_it^T is issued, then O += P_{it-1} V_{it-1}; the softmax of S_it runs
  // while the P V wgmma is in flight (it reads pa and o, the softmax touches s only).
  for (int it = 1; it < tile_end; ++it) {
    const int st = it % kStages, prev = (it - 1) % kStages;
    hopper::mbar_wait(bar_kfull(st), (it / kStages) & 1);
    hopper::mbar_wait(bar_vfull(prev), ((it - 1) / kStages) & 1);
    sched_wait();
    issue_qk(st);
    issue_pv(prev);
    sched_pass();
    hopper::wgmma_wait<1>();  // S_it is done (groups complete in order)
    pin(s);
    release(bar_kempty(st));
    softmax(it);
    hopper::wgmma_wait<0>();  // P_{it-1} V_{it-1} is done
    pin(o);
    pin(pa);
    release(bar_vempty(prev));
    rescale_o();
    to_p();
  }
  {
    const int last = (tile_end - 1) % kStages;
    hopper::mbar_wait(bar_vfull(last), ((tile_end - 1) / kStages) & 1);
    sched_wait();
    issue_pv(last);
    sched_pass();
    if (cw == 0) sched_wait();  // warpgroup 1's last arrival
    hopper::wgmma_wait<0>();
    pin(o);
    release(bar_vempty(last));
  }

  // ------------------------------------------------------------------ epilogue
  float out_scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool any = sum > 0.f;  // the row max contributes exp2(0) = 1 whenever a key is attended
    out_scale[r] = any ? 1.f / sum : 0.f;
    const int i = row0 + r * 8;
    if (t == 0 && i < nq) p.lse[bh_row + i] = any ? row_max[r] * kLn2 + logf(sum) : kInf;
  }
  // O -> this warpgroup's Q rows (same swizzled layout; every wgmma reading them has completed).
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lr = warp * 16 + g + 8 * r;  // row within the warpgroup's 64
      const int col = j * 8 + 2 * t;
      const uint32_t off = (col / 64) * BM * 128 + lr * 128 + ((((col % 64) / 8) ^ (lr % 8)) << 4) + (col % 8) * 2;
      *reinterpret_cast<uint32_t*>(smem + (q_wg - smem_base) + off) =
          pack2<T>(o[4 * j + 2 * r] * out_scale[r], o[4 * j + 2 * r + 1] * out_scale[r]);
    }
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");  // this warpgroup only
#pragma unroll
  for (int c = tid; c < 64 * (D / 8); c += 128) {
    const int lr = c / (D / 8), chunk = c % (D / 8), i = wg_row0 + lr;
    const uint32_t off = (chunk / 8) * BM * 128 + lr * 128 + (((chunk % 8) ^ (lr % 8)) << 4);
    if (i < nq)
      *reinterpret_cast<uint4*>(out + i * p.o_l + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + (q_wg - smem_base) + off);
  }
#endif  // sm_90a
}

// ------------------------------------------------------------------ host
#if FL_HAS_SM90A
// One (L, H, B) outer dim of a tensor map: size, stride in elements, and which of l/h/b it is.
struct OuterDim {
  int64_t size, stride;
  int which;  // 0 = l, 1 = h, 2 = b
};

// Dims sorted by stride (size-1 dims last, their stride irrelevant); empty string when encodable.
std::string map_outer_dims(int64_t L, int64_t H, int64_t B, int64_t sl, int64_t sh, int64_t sb, OuterDim (&dims)[3]) {
  dims[0] = {L, sl, 0};
  dims[1] = {H, sh, 1};
  dims[2] = {B, sb, 2};
  std::stable_sort(dims, dims + 3, [](const OuterDim& x, const OuterDim& y) {
    if ((x.size == 1) != (y.size == 1)) return y.size == 1;
    return x.stride < y.stride;
  });
  int64_t prev_extent = 0;  // bytes
  for (auto& d : dims) {
    if (d.size == 1) d.stride = std::max<int64_t>(prev_extent, 16) / 2;  // any valid stride
    const int64_t bytes = d.stride * 2;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (1ll << 40))
      return "strides must be positive multiples of 16 bytes below 2^40 for TMA, got " + std::to_string(bytes);
    prev_extent = std::max(prev_extent, bytes * d.size);
  }
  return std::string();
}

std::string tensor_reason(const char* name, const void* ptr, int64_t L, int64_t H, int64_t B, int64_t sl, int64_t sh,
                          int64_t sb) {
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) != 0) return std::string(name) + " must be 16-byte aligned for TMA";
  if (L >= (1ll << 32) || H >= (1ll << 32) || B >= (1ll << 32)) return std::string(name) + ": dims must be < 2^32";
  OuterDim dims[3];
  const std::string r = map_outer_dims(L, H, B, sl, sh, sb, dims);
  return r.empty() ? r : std::string(name) + ": " + r;
}

fl_status encode_map(CUtensorMap* map, MapOrder* order, const void* ptr, int32_t dtype, int64_t D, int64_t L,
                     int64_t H, int64_t B, int64_t sl, int64_t sh, int64_t sb, int box_rows, const char* name) {
  OuterDim dims[3];
  const std::string r = map_outer_dims(L, H, B, sl, sh, sb, dims);
  if (!r.empty()) return set_error(FL_ERR_UNSUPPORTED, std::string("fl_attention_fwd (wgmma): ") + name + ": " + r);
  cuuint64_t gdim[4] = {static_cast<cuuint64_t>(D), 0, 0, 0};
  cuuint64_t gstride[3];
  cuuint32_t box[4] = {64, 1, 1, 1};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    gdim[i + 1] = static_cast<cuuint64_t>(dims[i].size);
    gstride[i] = static_cast<cuuint64_t>(dims[i].stride * 2);
    const int pos = i + 1;
    if (dims[i].which == 0) { order->l = pos; box[pos] = static_cast<cuuint32_t>(box_rows); }
    else if (dims[i].which == 1) order->h = pos;
    else order->b = pos;
  }
  hopper::EncodeTiledFn fn = hopper::encode_tiled_fn();
  if (fn == nullptr)
    return set_error(FL_ERR_UNSUPPORTED, "fl_attention_fwd (wgmma): cuTensorMapEncodeTiled is not available from the driver");
  const CUresult res = fn(map, dtype == FL_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                          const_cast<void*>(ptr), gdim, gstride, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS)
    return set_error(FL_ERR_UNSUPPORTED, std::string("fl_attention_fwd (wgmma): cuTensorMapEncodeTiled refused ") + name +
                                      " (CUresult " + std::to_string(static_cast<int>(res)) + ")");
  return FL_OK;
}

template <int D, typename T>
fl_status launch(const Params& p, cudaStream_t stream) {
  CUtensorMap tq, tk, tv;
  MapOrder oq{}, ok{}, ov{};
  const int32_t dtype = std::is_same<T, __nv_bfloat16>::value ? FL_BF16 : FL_F16;
  FL_RETURN_IF_ERROR(encode_map(&tq, &oq, p.q, dtype, D, p.Lq, p.H, p.B, p.q_l, p.q_h, p.q_b, kBlockM, "q"));
  FL_RETURN_IF_ERROR(encode_map(&tk, &ok, p.k, dtype, D, p.Lk, p.H, p.B, p.k_l, p.k_h, p.k_b, kBlockN, "k"));
  FL_RETURN_IF_ERROR(encode_map(&tv, &ov, p.v, dtype, D, p.Lk, p.H, p.B, p.v_l, p.v_h, p.v_b, kBlockN, "v"));
  constexpr int smem = SmemPlan<D>::kBytes;
  FL_CUDA_CHECK(cudaFuncSetAttribute(attention_fwd_sm90_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  LaunchGrid grid;
  FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_FWD_SM90, p.B, p.Lq, p.Lk, p.H, D, 1, &grid));
  attention_fwd_sm90_kernel<D, T><<<to_dim3(grid), kThreads, smem, stream>>>(tq, tk, tv, oq, ok, ov, p);
  return check_launch("attention_fwd_sm90_kernel");
}
#endif  // FL_HAS_SM90A

}  // namespace

std::string fwd_sm90_unsupported(const Params& p, int64_t D) {
#if FL_HAS_SM90A
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "no current CUDA device";
  if (!hopper::device_is_sm90(dev)) return "the wgmma kernel needs an sm_90 (Hopper) device";
  if (D != 64 && D != 128) return "the wgmma kernel takes head dims 64 and 128, got " + std::to_string(D);
  if (p.dropout_p > 0.f) return "the wgmma kernel has no dropout (dropout_p > 0 runs the mma kernel)";
  if (p.num_splits != 1 || p.seqlens_k != nullptr) return "the wgmma kernel has no split-KV / KV-cache path";
  if (p.kpm != nullptr)
    return "the wgmma kernel has no key_padding_mask (TMA cannot skip masked V rows, which may hold NaN; "
           "the mma kernel zero-fills them)";
  if (p.Lk == 0) return "the wgmma kernel needs Lk > 0";
  if (p.lse == nullptr) return "the wgmma kernel writes lse (got NULL)";
  if (hopper::encode_tiled_fn() == nullptr) return "cuTensorMapEncodeTiled is not available from the driver";
  std::string r = tensor_reason("q", p.q, p.Lq, p.H, p.B, p.q_l, p.q_h, p.q_b);
  if (r.empty()) r = tensor_reason("k", p.k, p.Lk, p.H, p.B, p.k_l, p.k_h, p.k_b);
  if (r.empty()) r = tensor_reason("v", p.v, p.Lk, p.H, p.B, p.v_l, p.v_h, p.v_b);
  return r;
#else
  (void)p;
  (void)D;
  return "this build of the library has no sm_90a code (FASTLAYERS_CUDA_ARCHS without 90a)";
#endif
}

fl_status launch_fwd_sm90(const Params& p, int64_t D, int32_t dtype, cudaStream_t stream) {
#if FL_HAS_SM90A
  return FL_DISPATCH_HALF(dtype, "fl_attention_fwd", [&]() -> fl_status {
    if (D == 64) return launch<64, scalar_t>(p, stream);
    if (D == 128) return launch<128, scalar_t>(p, stream);
    return set_error(FL_ERR_UNSUPPORTED, "fl_attention_fwd (wgmma): head dim must be 64 or 128, got " + std::to_string(D));
  });
#else
  (void)p; (void)D; (void)dtype; (void)stream;
  return set_error(FL_ERR_UNSUPPORTED, "fl_attention_fwd: this build has no sm_90a code");
#endif
}

}  // namespace sm90
}  // namespace attn
}  // namespace fl
