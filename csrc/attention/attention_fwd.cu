// attention_fwd.cu -- FlashAttention-2 style forward on tensor cores (mma.sync.m16n8k16), and the
// KV-cache decode path built on the same kernel run split-KV.
//
// fl_attention_fwd: one CTA per (64-query tile, head, batch); 4 warps, each owning 16 query rows;
// K/V tiles double-buffered with cp.async; scores kept in the exp2 domain (scale * log2 e folded
// in); online softmax with fp32 row max / row sum; bottom-right causal with key tiles past the
// diagonal never loaded; key_padding_mask; tails of Lq and Lk masked (zero-filled K/V rows).
// Rows with no key: o = 0, lse = +inf.  Dropout multiplies P (after normalisation) by the
// counter-based philox mask of attention_common.cuh and rescales by 1/(1-p); its [seed, offset]
// are read from device memory (rng_state) when the kernel runs.  Keys masked by key_padding_mask
// are zero-filled on load (never read), so NaN / inf in their K/V rows cannot reach the output.
// fl_attention_kvcache_fwd: appends k_new / v_new at the device-side cache_seqlens, runs the
// forward kernel over num_splits chunks of each row's keys [cache_leftpad, length) (partial o / lse
// in fp32), then combines them.  No host synchronisation: the split count depends on host-known
// sizes only.  A batch row with a bad length (< 0, or + new rows > Lmax) or a bad cache_leftpad (< 0,
// or > length + new rows) writes nothing to the caches and gets NaN output rows.
// Paged caches (block_table, flash-attn's convention): the same steps on logical slots. Every CTA of
// the split pass first checks the page ids covering its share of the row's attended slots (pages_bad_cta,
// a barrier): a row with one out of range reads no page and gets NaN output rows (split-KV: its
// partials are o = NaN with lse = +inf, which the combine turns into NaN whatever the other splits
// hold); the append writes each new row whose own page id is in range.
// fl_attention_grid: the launch grid of every attention kernel (launch_grid), for tests.
#include <algorithm>
#include <cmath>
#include <string>

#include "attention/attention_common.cuh"
#include "attention/attention_fwd_sm90.cuh"

namespace fl {
namespace attn {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

template <int D, typename T>
constexpr int fwd_smem_bytes() {
  using Tr = Traits<D>;
  return (Tr::kBlockM + 4 * Tr::kBlockN) * Tr::kStride * static_cast<int>(sizeof(T));
}

// Paged = p.block_table != nullptr (kv-cache only): the K/V tiles come from the pages of the row.
template <int D, typename T, bool Paged>
__global__ void __launch_bounds__(kNumThreads) attention_fwd_kernel(const Params p) {
  using Tr = Traits<D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x LD; later each warp's 16 rows stage its output
  T* sK = sQ + BM * LD;                    // 2 buffers of BN x LD
  T* sV = sK + 2 * BN * LD;                // 2 buffers of BN x LD

  const int64_t head = grid_head();  // ((b * H) + h) * num_splits + split
  if (head >= static_cast<int64_t>(p.B) * p.H * p.num_splits) return;  // grid overhang
  const int split = static_cast<int>(head % p.num_splits);
  const int h = static_cast<int>((head / p.num_splits) % p.H);
  const int b = static_cast<int>(head / (static_cast<int64_t>(p.num_splits) * p.H));
  const int m_block = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nq = p.Lq, nk = keys_of_batch(p, b);  // 0 for a bad kv-cache length
  const int k_first = first_key_of_batch(p, b);     // kv-cache left padding: slots < k_first unread
  const int m0 = m_block * BM;
  const int row0 = m0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8

  // Key tiles [tile_begin, tile_end), from the one holding k_first: causal stops after the last key
  // the tile's last row sees; split-KV shares the row's own tiles (device-side lengths) among the
  // splits, and a split past them is empty (lse -inf, o 0: no weight in the combine).
  const int n_tiles = (nk + BN - 1) / BN;
  const int first_tile = k_first / BN;  // <= n_tiles (k_first <= nk)
  int tile_begin = first_tile, tile_end = n_tiles;
  if (p.causal) {
    const int last_key = min(m0 + BM, nq) - 1 + nk - nq;
    tile_end = last_key < 0 ? 0 : min(tile_end, last_key / BN + 1);
  }
  if (p.num_splits > 1) {
    const int per_split = (n_tiles - first_tile + p.num_splits - 1) / p.num_splits;
    tile_begin = first_tile + split * per_split;
    tile_end = min(tile_end, tile_begin + per_split);
  }
  // Paged: the page ids of this split's share of the row's attended slots -- all of its tiles,
  // causal or not, so every CTA of the row (each query tile, each split) turns NaN on the same ids.
  // The loads below stay inside it. (A new row written below k_first, in the left padding, is not
  // attended: the append skips it when its page id is out of range, and the output is unaffected.)
  bool pages_bad = false;
  if constexpr (Paged) {
    int lo = k_first, hi = nk;
    if (p.num_splits > 1) {
      const int per_split = (n_tiles - first_tile + p.num_splits - 1) / p.num_splits;
      if (split > 0) lo = (first_tile + split * per_split) * BN;
      hi = min(hi, (first_tile + (split + 1) * per_split) * BN);
    }
    pages_bad = pages_bad_cta(p, b, lo, hi);
  }

  const bool split_out = p.num_splits > 1;
  const int64_t bh_row = (static_cast<int64_t>(b) * p.H + h) * nq;  // row base of (B, H, Lq) arrays
  const int64_t part_row = (static_cast<int64_t>(split) * p.B * p.H) * nq + bh_row;
  T* out = static_cast<T*>(p.o) + b * p.o_b + h * p.o_h;

  if (tile_begin >= tile_end || pages_bad) {  // no key for any row of this CTA (or an empty split)
    // A bad kv-cache length is loud: NaN rows (with split-KV the combine kernel writes them). A bad
    // page id too: NaN rows, or split partials o = NaN, lse = +inf (the combine's weights all turn NaN).
    const float fill = pages_bad || kv_bad(p, b) ? nan_f() : 0.f;
    for (int c = threadIdx.x; c < BM * D; c += kNumThreads) {
      const int r = c / D, d = c % D, i = m0 + r;
      if (i >= nq) continue;
      if (split_out) p.o_part[(part_row + i) * D + d] = pages_bad ? nan_f() : 0.f;
      else out[i * p.o_l + d] = from_float<T>(fill);
      if (d == 0) {
        if (split_out) p.lse_part[part_row + i] = pages_bad ? kInf : -kInf;
        else if (p.lse != nullptr) p.lse[bh_row + i] = pages_bad ? nan_f() : kInf;
      }
    }
    return;
  }

  const T* q = static_cast<const T*>(p.q) + b * p.q_b + h * p.q_h;
  // Paged: k, v at page 0 of head h (the batch is in the table); else at batch b.
  const T* k = static_cast<const T*>(p.k) + (Paged ? 0 : b * p.k_b) + h * p.k_h;
  const T* v = static_cast<const T*>(p.v) + (Paged ? 0 : b * p.v_b) + h * p.v_h;
  const int32_t* table = Paged ? p.block_table + b * p.table_stride : nullptr;  // (max_num_blocks,)

  const uint8_t* kpm = p.kpm != nullptr ? p.kpm + b * p.kpm_b : nullptr;  // masked keys: zero-filled
  load_tile_async<BM, D>(sQ, q, p.q_l, m0, nq);
  if constexpr (Paged) {  // (no key_padding_mask on the kv-cache path)
    load_kv_tiles_paged<BN, D>(sK, sV, k, v, p, table, tile_begin * BN, nk, k_first);
  } else {
    load_tile_async<BN, D>(sK, k, p.k_l, tile_begin * BN, nk, kpm, p.kpm_l, k_first);
    load_tile_async<BN, D>(sV, v, p.v_l, tile_begin * BN, nk, kpm, p.kpm_l, k_first);
  }
  cp_async_commit();

  float acc[D / 8][4];
  zero(acc);
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};  // row_sum: this thread's columns
  const bool has_dropout = p.dropout_p > 0.f;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int buf = (tile - tile_begin) & 1;
    if (tile + 1 < tile_end) {  // prefetch the next K/V tile into the other buffer
      if constexpr (Paged) {
        load_kv_tiles_paged<BN, D>(sK + (buf ^ 1) * BN * LD, sV + (buf ^ 1) * BN * LD, k, v, p, table,
                                   (tile + 1) * BN, nk, k_first);
      } else {
        load_tile_async<BN, D>(sK + (buf ^ 1) * BN * LD, k, p.k_l, (tile + 1) * BN, nk, kpm, p.kpm_l, k_first);
        load_tile_async<BN, D>(sV + (buf ^ 1) * BN * LD, v, p.v_l, (tile + 1) * BN, nk, kpm, p.kpm_l, k_first);
      }
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
    gemm_ss<BN, D, false, true>(s, sQ, LD, warp * 16, cK, LD, 0);  // S = Q K^T (16 x BN)

    const int n0 = tile * BN;
    const bool need_mask = n0 + BN > nk || n0 < k_first || p.kpm != nullptr ||
                           (p.causal && n0 + BN - 1 > m0 + nk - nq);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (need_mask && !attends(p, b, row0 + (e >> 1) * 8, n0 + j * 8 + 2 * t + (e & 1), nk, nq, k_first))
          x = -kInf;
        s[j][e] = x;
      }

    // Online softmax. A row with no key so far keeps max -inf; it exponentiates against 0 so that
    // no (-inf) - (-inf) NaN appears, and its p, l, acc stay 0.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == -kInf ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int d = 0; d < D / 8; ++d) {
        acc[d][2 * r] *= alpha;
        acc[d][2 * r + 1] *= alpha;
      }
    }

    if (has_dropout) {  // the row sum above is pre-dropout (lse is); only P.V sees the mask
      const DropoutState ds = dropout_state(p, b, h);  // read when the kernel runs (graph replays)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint64_t c = dropout_counter(p, ds, row0 + (e >> 1) * 8, n0 + j * 8 + 2 * t + (e & 1));
          if (!dropout_keep(ds.seed, c, p.dropout_p)) s[j][e] = 0.f;
        }
    }

    uint32_t pa[BN / 16][4];
    c_to_a<BN, T>(pa, s);
    gemm_rs<D, BN, false>(acc, pa, cV, LD, 0);  // O += P V
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }

  // Epilogue: normalise, write lse and o (via this warp's own Q rows in smem, 16-byte stores).
  float out_scale[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool any = sum > 0.f;  // the row max contributes exp2(0) = 1 whenever a key is attended
    out_scale[r] = any ? (has_dropout ? p.dropout_rescale : 1.f) / sum : 0.f;
    const int i = row0 + r * 8;
    if (t == 0 && i < nq) {
      const float lse = any ? row_max[r] * kLn2 + logf(sum) : kInf;
      if (split_out) p.lse_part[part_row + i] = any ? lse : -kInf;
      else if (p.lse != nullptr) p.lse[bh_row + i] = lse;
    }
  }

  if (split_out) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + r * 8;
      if (i >= nq) continue;
      float* dst = p.o_part + (part_row + i) * D;
#pragma unroll
      for (int d = 0; d < D / 8; ++d)
        *reinterpret_cast<float2*>(dst + d * 8 + 2 * t) =
            make_float2(acc[d][2 * r] * out_scale[r], acc[d][2 * r + 1] * out_scale[r]);
    }
    return;
  }

  T* sO = sQ + warp * 16 * LD;  // only this warp ever read these Q rows
#pragma unroll
  for (int d = 0; d < D / 8; ++d)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(sO + (g + r * 8) * LD + d * 8 + 2 * t) =
          pack2<T>(acc[d][2 * r] * out_scale[r], acc[d][2 * r + 1] * out_scale[r]);
  __syncwarp();
  for (int c = lane; c < 16 * (D / 8); c += 32) {
    const int r = c / (D / 8), col = (c % (D / 8)) * 8, i = m0 + warp * 16 + r;
    if (i < nq) *reinterpret_cast<uint4*>(out + i * p.o_l + col) = *reinterpret_cast<const uint4*>(sO + r * LD + col);
  }
}

// o[b, i, h, :] = sum_s exp(lse_s - lse) o_s over the splits; one warp per (b, h, i) row, the
// grid striding over rows (launch_grid caps it); a bad kv-cache length gives a NaN row.
template <int D, typename T>
__global__ void __launch_bounds__(kNumThreads) attention_combine_kernel(const Params p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.Lq;
  const int64_t split_rows = rows;  // stride between splits in lse_part (rows) / o_part (rows * D)
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {  // (b, h, i) flattened
    const int i = static_cast<int>(row % p.Lq);
    const int h = static_cast<int>((row / p.Lq) % p.H);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.Lq) * p.H));
    T* out = static_cast<T*>(p.o) + b * p.o_b + i * p.o_l + h * p.o_h;
    if (kv_bad(p, b)) {
      for (int d = lane; d < D; d += 32) out[d] = from_float<T>(nan_f());
      continue;
    }
    float mx = -kInf;
    for (int s = lane; s < p.num_splits; s += 32) mx = fmaxf(mx, p.lse_part[s * split_rows + row]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (mx == -kInf) {  // no key at all
      for (int d = lane; d < D; d += 32) out[d] = from_float<T>(0.f);
      continue;
    }
    float denom = 0.f;
    for (int s = lane; s < p.num_splits; s += 32) denom += exp2f((p.lse_part[s * split_rows + row] - mx) * kLog2e);
    denom = warp_sum(denom);
    float o[D / 32];
#pragma unroll
    for (int c = 0; c < D / 32; ++c) o[c] = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = exp2f((p.lse_part[s * split_rows + row] - mx) * kLog2e) / denom;  // 0 for empty splits
      if (w == 0.f) continue;
      const float* src = p.o_part + (s * split_rows + row) * D;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) o[c] += w * src[c * 32 + lane];
    }
#pragma unroll
    for (int c = 0; c < D / 32; ++c) out[c * 32 + lane] = from_float<T>(o[c]);
  }
}

// Writes k_new / v_new rows i into the caches at row cache_seqlens[b] + i; a batch row whose lengths
// are bad (kv_bad: length < 0 or + nnew > Lmax, a bad cache_leftpad) writes nothing at all (its
// output is NaN). Paged: slot cache_seqlens[b] + i (logical, < Lmax) goes to row slot % P of page
// block_table[b, slot / P]; a new row whose page id is out of range is not written (never
// dereferenced; the split pass turns the row's output NaN when the row attends that slot).
template <typename T, bool Paged>
__global__ void attention_append_kv_kernel(const Params p, const T* k_new, int64_t kn_b, int64_t kn_l,
                                           int64_t kn_h, const T* v_new, int64_t vn_b, int64_t vn_l,
                                           int64_t vn_h, int nnew, int D) {
  const int chunks = D / 8;
  const int64_t total = static_cast<int64_t>(p.B) * nnew * p.H * chunks;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % chunks) * 8;
    const int h = static_cast<int>((idx / chunks) % p.H);
    const int i = static_cast<int>((idx / (static_cast<int64_t>(chunks) * p.H)) % nnew);
    const int b = static_cast<int>(idx / (static_cast<int64_t>(chunks) * p.H * nnew));
    if (kv_bad(p, b)) continue;  // p.seqlens_add == nnew
    const int row = p.seqlens_k[b] + i;
    T* kc;
    T* vc;
    if constexpr (Paged) {
      const int page_idx = row / p.page_size, in_page = row - page_idx * p.page_size;
      const int32_t page = p.block_table[b * p.table_stride + page_idx];
      if (!page_in_range(p, page)) continue;
      kc = const_cast<T*>(static_cast<const T*>(p.k)) + page * p.k_b + static_cast<int64_t>(in_page) * p.k_l + h * p.k_h + c;
      vc = const_cast<T*>(static_cast<const T*>(p.v)) + page * p.v_b + static_cast<int64_t>(in_page) * p.v_l + h * p.v_h + c;
    } else {
      kc = const_cast<T*>(static_cast<const T*>(p.k)) + b * p.k_b + row * p.k_l + h * p.k_h + c;
      vc = const_cast<T*>(static_cast<const T*>(p.v)) + b * p.v_b + row * p.v_l + h * p.v_h + c;
    }
    *reinterpret_cast<uint4*>(kc) = *reinterpret_cast<const uint4*>(k_new + b * kn_b + i * kn_l + h * kn_h + c);
    *reinterpret_cast<uint4*>(vc) = *reinterpret_cast<const uint4*>(v_new + b * vn_b + i * vn_l + h * vn_h + c);
  }
}

template <int D, typename T>
fl_status launch_fwd(const Params& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D, T>();
  const auto kernel = p.block_table != nullptr ? attention_fwd_kernel<D, T, true> : attention_fwd_kernel<D, T, false>;
  if (smem > 48 * 1024)
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  LaunchGrid grid;
  FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_FWD, p.B, p.Lq, p.Lk, p.H, D, p.num_splits, &grid));
  kernel<<<to_dim3(grid), kNumThreads, smem, stream>>>(p);
  FL_RETURN_IF_ERROR(check_launch("attention_fwd_kernel"));
  if (p.num_splits > 1) {
    FL_RETURN_IF_ERROR(launch_grid(FL_ATTENTION_KERNEL_KVCACHE_COMBINE, p.B, p.Lq, p.Lk, p.H, D, p.num_splits, &grid));
    attention_combine_kernel<D, T><<<to_dim3(grid), kNumThreads, 0, stream>>>(p);
    FL_RETURN_IF_ERROR(check_launch("attention_combine_kernel"));
  }
  return FL_OK;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Split count for the decode path: enough CTAs for ~2 waves, at most one split per key tile, from
// sizes the host knows (Lmax, not the device-side lengths) so the launch is graph-capturable.
fl_status kvcache_splits(int64_t B, int64_t Lq, int64_t H, int64_t D, int64_t Lmax, int* splits) {
  int dev = 0, sms = 0;
  FL_CUDA_CHECK(cudaGetDevice(&dev));
  FL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t block_n = D <= 64 ? Traits<64>::kBlockN : Traits<128>::kBlockN;
  const int64_t ctas = B * H * ((Lq + 63) / 64);
  const int64_t tiles = (Lmax + block_n - 1) / block_n;
  int64_t s = 1;
  if (ctas < sms) s = (2 * sms + ctas - 1) / ctas;
  s = std::min<int64_t>({s, tiles, 128});  // the grid spreads B*H*splits over axes y and z
  *splits = static_cast<int>(std::max<int64_t>(s, 1));
  return FL_OK;
}

}  // namespace

fl_status launch_grid(int32_t kernel, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D, int64_t num_splits,
                      LaunchGrid* grid) {
  FL_REQUIRE(grid != nullptr, "fl_attention_grid: grid is NULL");
  FL_REQUIRE(B >= 0 && Lq >= 0 && Lk >= 0 && H >= 0 && num_splits >= 1 && B < (1ll << 31) && H < (1ll << 31) &&
                 Lq < (1ll << 31) && Lk < (1ll << 31) && num_splits < (1ll << 31),
             "fl_attention_grid: sizes must be in [0, 2^31) (num_splits >= 1), got B=%lld Lq=%lld Lk=%lld H=%lld "
             "num_splits=%lld", (long long)B, (long long)Lq, (long long)Lk, (long long)H, (long long)num_splits);
  // Rows x heads far beyond any tensor (2^53) would overflow the products below: refused.
  FL_REQUIRE(static_cast<double>(B) * H * std::max<int64_t>({Lq, Lk, 1}) * num_splits < 9.0e15,
             "fl_attention_grid: B*H*max(Lq, Lk)*num_splits must be < 2^53, got B=%lld Lq=%lld Lk=%lld H=%lld "
             "num_splits=%lld", (long long)B, (long long)Lq, (long long)Lk, (long long)H, (long long)num_splits);
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const auto flat = [](int64_t blocks, int64_t cap) { return LaunchGrid{std::max<int64_t>(1, std::min(blocks, cap)), 1, 1}; };
  const int64_t heads = B * H;
  LaunchGrid g{1, 1, 1};
  FL_RETURN_IF_ERROR(FL_ATTN_DISPATCH_HEAD_DIM(D, "fl_attention_grid", [&]() -> fl_status {
    using Tr = Traits<kHeadDim>;
    switch (kernel) {
      case FL_ATTENTION_KERNEL_FWD:  // also the split pass of the kv-cache path
        g = heads_grid(cdiv(Lq, Tr::kBlockM), heads * num_splits);
        return FL_OK;
      case FL_ATTENTION_KERNEL_FWD_SM90:
        g = heads_grid(cdiv(Lq, sm90::kBlockM), heads);
        return FL_OK;
      case FL_ATTENTION_KERNEL_BWD_PREPROCESS:  // one warp per (b, i, h) row, grid-stride
        g = flat(cdiv(B * Lq * H, kWarps), kMaxGridX);
        return FL_OK;
      case FL_ATTENTION_KERNEL_BWD_DKDV:
        g = heads_grid(cdiv(Lk, Tr::kBwdBlockN), heads);
        return FL_OK;
      case FL_ATTENTION_KERNEL_BWD_DQ:
        g = heads_grid(cdiv(Lq, Tr::kBlockM), heads);
        return FL_OK;
      case FL_ATTENTION_KERNEL_BWD_DQ_CONVERT:  // 256 threads x 4 elements, grid-stride
        g = flat(cdiv(B * Lq * H * kHeadDim / 4, 256), 8192);
        return FL_OK;
      case FL_ATTENTION_KERNEL_KVCACHE_APPEND:  // 256 threads x 16 bytes, grid-stride
        g = flat(cdiv(B * Lq * H * (kHeadDim / 8), 256), 4096);
        return FL_OK;
      case FL_ATTENTION_KERNEL_KVCACHE_COMBINE:  // one warp per (b, h, i) row, grid-stride
        g = flat(cdiv(B * H * Lq, kWarps), kMaxGridX);
        return FL_OK;
      default:
        return set_error(FL_ERR_INVALID, "fl_attention_grid: kernel must be an FL_ATTENTION_KERNEL_* code (0..7), got " +
                                             std::to_string(kernel));
    }
  }));
  FL_REQUIRE(g.x >= 1 && g.x <= kMaxGridX && g.y >= 1 && g.y <= kMaxGridYZ && g.z >= 1 && g.z <= kMaxGridYZ,
             "fl_attention_grid: kernel %d at B=%lld Lq=%lld Lk=%lld H=%lld num_splits=%lld needs grid (%lld, %lld, "
             "%lld), beyond the limits (2^31-1, 65535, 65535)", (int)kernel, (long long)B, (long long)Lq, (long long)Lk,
             (long long)H, (long long)num_splits, (long long)g.x, (long long)g.y, (long long)g.z);
  *grid = g;
  return FL_OK;
}

// Published in fl_build_info() so Python never re-states the list.
static const bool g_registered = register_info("attention_head_dims", FL_ATTN_HEAD_DIMS_JSON);
// fl_attention_kvcache_fwd takes cache_leftpad (after cache_seqlens): the Python bridge calls it only
// when this is published, so a library built before that argument is never called with it.
static const bool g_registered_leftpad = register_info("attention_kvcache_leftpad", "true");
// ... and block_table, max_num_blocks, num_blocks, page_block_size after cache_leftpad: the bridge
// calls it only when this is published (an older library would read every later argument shifted).
static const bool g_registered_paged = register_info("attention_kvcache_paged", "true");
#if FL_HAS_SM90A
static const bool g_registered_impls = register_info("attention_fwd_impls", "[\"mma\", \"wgmma\"]");
#else
static const bool g_registered_impls = register_info("attention_fwd_impls", "[\"mma\"]");
#endif

}  // namespace attn
}  // namespace fl

using fl::attn::Params;

#define FL_ATTN_REQUIRE_ROWS(name, ptr, sb, sl, sh)                                                    \
  FL_REQUIRE(ptr != nullptr, "%s: pointer is NULL", name);                                             \
  FL_REQUIRE(fl::attn::aligned16(ptr), "%s: pointer must be 16-byte aligned, got %p", name, ptr);      \
  FL_REQUIRE((sb) % 8 == 0 && (sl) % 8 == 0 && (sh) % 8 == 0,                                          \
             "%s: (b, l, h) strides must be multiples of 8 elements (16-byte rows), got (%lld, %lld, %lld)", \
             name, (long long)(sb), (long long)(sl), (long long)(sh))

extern "C" fl_status fl_attention_fwd(const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                      const void* k, int64_t k_b, int64_t k_l, int64_t k_h,
                                      const void* v, int64_t v_b, int64_t v_l, int64_t v_h,
                                      void* o, int64_t o_b, int64_t o_l, int64_t o_h, float* lse,
                                      const uint8_t* key_padding_mask, int64_t kpm_b, int64_t kpm_l,
                                      int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                      float softmax_scale, int32_t causal, float dropout_p,
                                      const int64_t* rng_state, int32_t impl, int32_t dtype,
                                      void* stream) {
  FL_REQUIRE(B >= 0 && Lq >= 0 && Lk >= 0 && H >= 0, "fl_attention_fwd: sizes must be >= 0, got B=%lld Lq=%lld Lk=%lld H=%lld",
             (long long)B, (long long)Lq, (long long)Lk, (long long)H);
  FL_REQUIRE(B < (1ll << 31) && H < (1ll << 31) && Lq < (1ll << 31) && Lk < (1ll << 31),
             "fl_attention_fwd: B, H, Lq and Lk must be < 2^31, got B=%lld H=%lld Lq=%lld Lk=%lld",
             (long long)B, (long long)H, (long long)Lq, (long long)Lk);
  FL_REQUIRE(dropout_p >= 0.f && dropout_p < 1.f, "fl_attention_fwd: dropout_p must be in [0, 1), got %g", dropout_p);
  FL_REQUIRE(dropout_p == 0.f || rng_state != nullptr,
             "fl_attention_fwd: rng_state (device int64 [seed, offset]) is NULL with dropout_p = %g", dropout_p);
  FL_REQUIRE(impl == FL_ATTENTION_IMPL_AUTO || impl == FL_ATTENTION_IMPL_MMA || impl == FL_ATTENTION_IMPL_WGMMA,
             "fl_attention_fwd: impl must be 0 (auto), 1 (mma) or 2 (wgmma), got %d", (int)impl);
  if (B == 0 || Lq == 0 || H == 0) return FL_OK;
  FL_ATTN_REQUIRE_ROWS("fl_attention_fwd: q", q, q_b, q_l, q_h);
  FL_ATTN_REQUIRE_ROWS("fl_attention_fwd: o", o, o_b, o_l, o_h);
  FL_REQUIRE(lse != nullptr, "fl_attention_fwd: lse is NULL");
  if (Lk > 0) {
    FL_ATTN_REQUIRE_ROWS("fl_attention_fwd: k", k, k_b, k_l, k_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_fwd: v", v, v_b, v_l, v_h);
  }
  Params p{};
  p.q = q; p.q_b = q_b; p.q_l = q_l; p.q_h = q_h;
  p.k = k; p.k_b = k_b; p.k_l = k_l; p.k_h = k_h;
  p.v = v; p.v_b = v_b; p.v_l = v_l; p.v_h = v_h;
  p.o = o; p.o_b = o_b; p.o_l = o_l; p.o_h = o_h;
  p.lse = lse;
  p.kpm = key_padding_mask; p.kpm_b = kpm_b; p.kpm_l = kpm_l;
  p.B = (int)B; p.H = (int)H; p.Lq = (int)Lq; p.Lk = (int)Lk;
  p.scale = softmax_scale; p.scale_log2 = softmax_scale * 1.442695040888963407f;
  p.causal = causal != 0;
  p.dropout_p = dropout_p; p.dropout_rescale = 1.f / (1.f - dropout_p);
  p.rng_state = rng_state;
  p.num_splits = 1;
  cudaStream_t st = fl::as_stream(stream);
  // Hopper: the wgmma/TMA kernel when it can run the case (auto), or because it was asked for
  // (wgmma: a case it cannot run is an error, never a silent switch to the mma kernel).
  if (impl != FL_ATTENTION_IMPL_MMA && (dtype == FL_F16 || dtype == FL_BF16)) {
    const std::string why = fl::attn::sm90::fwd_sm90_unsupported(p, D);
    if (why.empty()) {
      // FL_ERR_UNSUPPORTED comes back only before anything was launched (e.g. the driver refused a
      // tensor map): under auto the mma kernel then takes the case.
      const fl_status s = fl::attn::sm90::launch_fwd_sm90(p, D, dtype, st);
      if (s != FL_ERR_UNSUPPORTED || impl == FL_ATTENTION_IMPL_WGMMA) return s;
    } else if (impl == FL_ATTENTION_IMPL_WGMMA) {
      return fl::set_error(FL_ERR_UNSUPPORTED, "fl_attention_fwd: impl=wgmma cannot run this case: " + why);
    }
  }
  return FL_DISPATCH_HALF(dtype, "fl_attention_fwd", [&] {
    return FL_ATTN_DISPATCH_HEAD_DIM(D, "fl_attention_fwd", [&] {
      return fl::attn::launch_fwd<kHeadDim, scalar_t>(p, st);
    });
  });
}

extern "C" fl_status fl_attention_kvcache_workspace_size(int64_t B, int64_t Lq, int64_t H, int64_t D,
                                                         int64_t Lmax, size_t* bytes) {
  FL_REQUIRE(bytes != nullptr, "fl_attention_kvcache_workspace_size: bytes is NULL");
  FL_REQUIRE(B >= 0 && Lq >= 0 && H >= 0 && D > 0 && Lmax >= 0,
             "fl_attention_kvcache_workspace_size: sizes must be >= 0, got B=%lld Lq=%lld H=%lld D=%lld Lmax=%lld",
             (long long)B, (long long)Lq, (long long)H, (long long)D, (long long)Lmax);
  *bytes = 0;
  if (B == 0 || Lq == 0 || H == 0) return FL_OK;
  int splits = 1;
  FL_RETURN_IF_ERROR(fl::attn::kvcache_splits(B, Lq, H, D, Lmax, &splits));
  if (splits > 1) *bytes = static_cast<size_t>(splits) * B * H * Lq * (D + 1) * sizeof(float);
  return FL_OK;
}

extern "C" fl_status fl_attention_kvcache_fwd(const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                              void* k_cache, int64_t kc_b, int64_t kc_l, int64_t kc_h,
                                              void* v_cache, int64_t vc_b, int64_t vc_l, int64_t vc_h,
                                              const int32_t* cache_seqlens, const int32_t* cache_leftpad,
                                              const int32_t* block_table, int64_t max_num_blocks,
                                              int64_t num_blocks, int64_t page_block_size,
                                              const void* k_new, int64_t kn_b, int64_t kn_l, int64_t kn_h,
                                              const void* v_new, int64_t vn_b, int64_t vn_l, int64_t vn_h,
                                              void* o, int64_t o_b, int64_t o_l, int64_t o_h,
                                              void* workspace, size_t workspace_bytes,
                                              int64_t B, int64_t Lq, int64_t Lmax, int64_t H, int64_t D,
                                              float softmax_scale, int32_t causal, int32_t dtype, void* stream) {
  FL_REQUIRE(B >= 0 && Lq >= 0 && Lmax >= 0 && H >= 0,
             "fl_attention_kvcache_fwd: sizes must be >= 0, got B=%lld Lq=%lld Lmax=%lld H=%lld",
             (long long)B, (long long)Lq, (long long)Lmax, (long long)H);
  FL_REQUIRE(B < (1ll << 31) && H < (1ll << 31) && Lmax < (1ll << 31) && Lq < (1ll << 31),
             "fl_attention_kvcache_fwd: B, H, Lq and Lmax must be < 2^31, got B=%lld H=%lld Lq=%lld Lmax=%lld",
             (long long)B, (long long)H, (long long)Lq, (long long)Lmax);
  FL_REQUIRE((k_new == nullptr) == (v_new == nullptr), "fl_attention_kvcache_fwd: k_new and v_new must both be given or both be NULL");
  const bool paged = block_table != nullptr;
  if (paged) {
    FL_REQUIRE(page_block_size >= 1 && page_block_size < (1ll << 31) && max_num_blocks >= 0 &&
                   max_num_blocks < (1ll << 31) && num_blocks >= 0,
               "fl_attention_kvcache_fwd: block_table needs page_block_size in [1, 2^31), max_num_blocks in [0, 2^31) "
               "and num_blocks >= 0, got page_block_size=%lld max_num_blocks=%lld num_blocks=%lld",
               (long long)page_block_size, (long long)max_num_blocks, (long long)num_blocks);
    FL_REQUIRE(Lmax == max_num_blocks * page_block_size,
               "fl_attention_kvcache_fwd: with block_table Lmax must be the logical max_num_blocks * page_block_size = "
               "%lld, got %lld", (long long)(max_num_blocks * page_block_size), (long long)Lmax);
  }
  if (B == 0 || Lq == 0 || H == 0) return FL_OK;
  FL_REQUIRE(cache_seqlens != nullptr, "fl_attention_kvcache_fwd: cache_seqlens is NULL");
  FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: q", q, q_b, q_l, q_h);
  FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: o", o, o_b, o_l, o_h);
  if (Lmax > 0 && (!paged || num_blocks > 0)) {  // (no page at all: every used page id is out of range, none read)
    FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: k_cache", k_cache, kc_b, kc_l, kc_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: v_cache", v_cache, vc_b, vc_l, vc_h);
  }
  if (k_new != nullptr) {  // (Lq > Lmax makes every batch row's length bad: NaN rows, no writes)
    FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: k_new", k_new, kn_b, kn_l, kn_h);
    FL_ATTN_REQUIRE_ROWS("fl_attention_kvcache_fwd: v_new", v_new, vn_b, vn_l, vn_h);
  }
  int splits = 1;
  FL_RETURN_IF_ERROR(fl::attn::kvcache_splits(B, Lq, H, D, Lmax, &splits));
  size_t need = 0;
  FL_RETURN_IF_ERROR(fl_attention_kvcache_workspace_size(B, Lq, H, D, Lmax, &need));
  FL_REQUIRE(workspace_bytes >= need && (need == 0 || workspace != nullptr),
             "fl_attention_kvcache_fwd: workspace must hold %zu bytes (fl_attention_kvcache_workspace_size), got %zu",
             need, workspace_bytes);
  FL_REQUIRE(need == 0 || fl::attn::aligned16(workspace), "fl_attention_kvcache_fwd: workspace must be 16-byte aligned");

  Params p{};
  p.q = q; p.q_b = q_b; p.q_l = q_l; p.q_h = q_h;
  p.k = k_cache; p.k_b = kc_b; p.k_l = kc_l; p.k_h = kc_h;
  p.v = v_cache; p.v_b = vc_b; p.v_l = vc_l; p.v_h = vc_h;
  p.o = o; p.o_b = o_b; p.o_l = o_l; p.o_h = o_h;
  p.lse = nullptr;
  p.B = (int)B; p.H = (int)H; p.Lq = (int)Lq; p.Lk = (int)Lmax;
  p.seqlens_k = cache_seqlens;
  p.seqlens_add = k_new != nullptr ? (int)Lq : 0;
  p.leftpad_k = cache_leftpad;  // NULL: every row attends from slot 0
  if (paged) {
    p.block_table = block_table;
    p.table_stride = max_num_blocks;
    p.page_size = static_cast<int>(page_block_size);
    // page ids are int32: more pages than 2^31 - 1 make every non-negative id valid
    p.num_blocks = static_cast<int>(std::min<int64_t>(num_blocks, 2147483647));
  }
  p.scale = softmax_scale; p.scale_log2 = softmax_scale * 1.442695040888963407f;
  p.causal = causal != 0;
  p.dropout_rescale = 1.f;
  p.num_splits = splits;
  if (splits > 1) {
    p.o_part = static_cast<float*>(workspace);
    p.lse_part = p.o_part + static_cast<size_t>(splits) * B * H * Lq * D;
  }
  cudaStream_t st = fl::as_stream(stream);
  return FL_DISPATCH_HALF(dtype, "fl_attention_kvcache_fwd", [&] {
    return FL_ATTN_DISPATCH_HEAD_DIM(D, "fl_attention_kvcache_fwd", [&] {
      if (k_new != nullptr) {
        fl::attn::LaunchGrid grid;
        FL_RETURN_IF_ERROR(fl::attn::launch_grid(FL_ATTENTION_KERNEL_KVCACHE_APPEND, B, Lq, Lmax, H, kHeadDim, 1, &grid));
        const auto append = paged ? fl::attn::attention_append_kv_kernel<scalar_t, true>
                                  : fl::attn::attention_append_kv_kernel<scalar_t, false>;
        append<<<fl::attn::to_dim3(grid), 256, 0, st>>>(
            p, static_cast<const scalar_t*>(k_new), kn_b, kn_l, kn_h, static_cast<const scalar_t*>(v_new),
            vn_b, vn_l, vn_h, (int)Lq, kHeadDim);
        FL_RETURN_IF_ERROR(fl::check_launch("attention_append_kv_kernel"));
      }
      return fl::attn::launch_fwd<kHeadDim, scalar_t>(p, st);
    });
  });
}

extern "C" fl_status fl_attention_grid(int32_t kernel, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                       int64_t num_splits, int64_t* grid) {
  FL_REQUIRE(grid != nullptr, "fl_attention_grid: grid is NULL");
  fl::attn::LaunchGrid g;
  FL_RETURN_IF_ERROR(fl::attn::launch_grid(kernel, B, Lq, Lk, H, D, num_splits, &g));
  grid[0] = g.x;
  grid[1] = g.y;
  grid[2] = g.z;
  return FL_OK;
}
