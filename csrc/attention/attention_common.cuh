// attention_common.cuh -- what the attention kernels share: per-head-dim traits, the head-dim
// static switch, the launch grids, warp-level tensor-core primitives (ldmatrix, mma.sync.m16n8k16,
// cp.async), the tile loader, the philox dropout mask and the kernel parameter block.
//
// Layouts (all tensors row-major in the last dim, head dim D contiguous):
//   q, o (B, Lq, H, D), k, v (B, Lk, H, D) with (b, l, h) strides in elements;
//   lse, delta (B, H, Lq) fp32 contiguous; key_padding_mask (B, Lk) uint8 with (b, l) strides.
//   Paged kv-cache (Params::block_table): k, v (num_blocks, P, H, D) pages, logical slot j of batch
//   b at page block_table[b, j / P], row j % P (load_kv_tiles_paged); only the forward split kernel
//   and the append kernel of attention_fwd.cu read them.
// Grids (launch_grid): axis x (limit 2^31 - 1) carries tiles, axes y and z (limit 65535 each) the
// flattened (b, h[, split]) index, so every size the ABI accepts launches (B*H up to 65535^2).
// Masked keys (key_padding_mask, kv-cache slots past a row's length or before its cache_leftpad) are
// zero-filled when their K/V tiles are loaded, never read: NaN / inf there cannot reach o, lse or
// any gradient.
// Dropout state: rng_state = device int64 [seed, offset], read by the kernels at run time.
// Shared-memory tiles are row-major with a row stride of D + 8 elements: the 16-byte pad puts the
// 8 rows an ldmatrix reads in 8 different 4-bank groups (row stride in words is 4 mod 32 for every
// D that is a multiple of 64 and 20 mod 32 for D = 32, 96), so ldmatrix is conflict-free without
// a swizzle.
// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs and f32 accumulators; g = lane/4,
// t = lane%4): A regs {a0..a3} hold (row g, cols 2t..2t+1), (row g+8, cols 2t..), (row g, cols
// 8+2t..), (row g+8, cols 8+2t..); B regs {b0, b1} hold (k rows 2t..2t+1, col g), (k 8+2t.., col g);
// C holds c0,c1 = (row g, cols 2t, 2t+1) and c2,c3 = (row g+8, cols 2t, 2t+1).
#pragma once

#include "common.cuh"

namespace fl {
namespace attn {

constexpr int kNumThreads = 128;  // 4 warps; every kernel below uses this block size
constexpr int kWarps = 4;

// Everything that depends on the head dim, in one place.
template <int D_>
struct Traits {
  static constexpr int D = D_;
  static constexpr int kStride = D + 8;               // smem row stride (elements), see above
  static constexpr int kBlockM = 64;                  // forward / dq query tile: 4 warps x 16 rows
  static constexpr int kBlockN = D <= 64 ? 64 : 32;   // forward / dq key tile (registers + smem)
  static constexpr int kBwdBlockN = 64;               // dk/dv key tile: 4 warps x 16 keys
  static constexpr int kBwdBlockM = D <= 64 ? 64 : 32;  // dk/dv query tile
  static_assert(D % 32 == 0, "head dim must be a multiple of 32 (16-column ldmatrix pairs)");
};

// ------------------------------------------------------------------ launch grids
// What each launch of the attention entry points uses (the C ABI's fl_attention_grid answers the
// same function, so CPU tests check the limits at extreme shapes without a GPU).
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
struct LaunchGrid {
  int64_t x, y, z;
};
// `tiles` CTAs per head on x, `heads` heads spread over y (fast) and z: nz = cdiv(heads, 65535),
// ny = cdiv(heads, nz), so fewer than nz CTAs overhang (they return at once, see grid_head()).
inline LaunchGrid heads_grid(int64_t tiles, int64_t heads) {
  const int64_t z = heads > kMaxGridYZ ? (heads + kMaxGridYZ - 1) / kMaxGridYZ : 1;
  const int64_t y = heads > 0 ? (heads + z - 1) / z : 1;
  return {tiles > 0 ? tiles : 1, y, z};
}
// FL_ATTENTION_KERNEL_* of fastlayers.h -> the grid that kernel is launched with; FL_ERR_INVALID
// (with a message) when an axis would exceed its limit. Defined in attention_fwd.cu.
fl_status launch_grid(int32_t kernel, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                      int64_t num_splits, LaunchGrid* grid);
inline dim3 to_dim3(const LaunchGrid& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

// The head dims this build compiles; fl_build_info() publishes the same list (attention_fwd.cu).
#define FL_ATTN_HEAD_DIMS_JSON "[32, 64, 96, 128]"

// Runtime head dim -> `constexpr int kHeadDim` inside the body; unknown -> FL_ERR_UNSUPPORTED.
#define FL_ATTN_DISPATCH_HEAD_DIM(d, name, ...)                                               \
  [&]() -> fl_status {                                                                       \
    switch (d) {                                                                             \
      case 32: { constexpr int kHeadDim = 32; return __VA_ARGS__(); }                        \
      case 64: { constexpr int kHeadDim = 64; return __VA_ARGS__(); }                        \
      case 96: { constexpr int kHeadDim = 96; return __VA_ARGS__(); }                        \
      case 128: { constexpr int kHeadDim = 128; return __VA_ARGS__(); }                      \
      default:                                                                               \
        return ::fl::set_error(FL_ERR_UNSUPPORTED, std::string(name) +                       \
                                                       ": head dim must be one of " FL_ATTN_HEAD_DIMS_JSON \
                                                       ", got " + std::to_string(d));        \
    }                                                                                        \
  }()

// ------------------------------------------------------------------ parameters
struct Params {
  const void* q; const void* k; const void* v;
  int64_t q_b, q_l, q_h, k_b, k_l, k_h, v_b, v_l, v_h;
  void* o; int64_t o_b, o_l, o_h;           // forward output / dq output in the dq kernel
  float* lse;                               // (B, H, Lq)
  const uint8_t* kpm; int64_t kpm_b, kpm_l; // key_padding_mask or nullptr
  int B, H, Lq, Lk;                         // Lk: the (maximal) key count
  const int32_t* seqlens_k;                 // kvcache: per-batch key count = seqlens_k[b] + seqlens_add
  int seqlens_add;
  const int32_t* leftpad_k;                 // kvcache: first attended slot per batch (cache_leftpad), or nullptr
  // kvcache, paged (flash-attn's block_table): logical slot j of batch b lives at page
  // block_table[b * table_stride + j / page_size], row j % page_size; k / v then point at page 0
  // with k_b / v_b = the page stride and k_l / v_l = the row stride inside a page. nullptr = not paged.
  const int32_t* block_table;               // (B, table_stride) int32 contiguous
  int64_t table_stride;                     // max_num_blocks (row stride of block_table)
  int page_size;                            // P >= 1; Lk = table_stride * P (the logical Lmax)
  int num_blocks;                           // pages in the caches (clamped to 2^31 - 1): valid ids [0, num_blocks)
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): scores live in the exp2 domain
  int causal;         // bottom-right aligned: query i attends key j iff j <= i + Lk - Lq
  float dropout_p;    // 0 = no dropout
  float dropout_rescale;  // 1 / (1 - p)
  const int64_t* rng_state;  // device [seed, offset], read at run time (graph replays see redraws)
  // split-KV (kvcache): num_splits > 1 writes normalised partial o / lse here instead of o / lse
  int num_splits;
  float* o_part;      // (splits, B, H, Lq, D)
  float* lse_part;    // (splits, B, H, Lq)
  // backward
  const void* dout; int64_t do_b, do_l, do_h;
  const void* out; int64_t out_b, out_l, out_h;
  void* dq; int64_t dq_b, dq_l, dq_h;
  void* dk; int64_t dk_b, dk_l, dk_h;
  void* dv; int64_t dv_b, dv_l, dv_h;
  float* delta;       // (B, H, Lq)
  float* dq_accum;    // (B, Lq, H, D) fp32, atomic mode
};

// ------------------------------------------------------------------ philox dropout mask
// philox4x32-10 with key (seed_lo, seed_hi) and counter (c_lo, c_hi, 0, 0), word 0 -- the same
// stream as Triton's tl.randint(seed, c) for int64 seed and c (the spec: kernels/philox.py).
__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint32_t philox_word0(uint64_t seed, uint64_t c) {
  uint32_t c0 = static_cast<uint32_t>(c), c1 = static_cast<uint32_t>(c >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// keep = u >= p with u = (r >> 8) * 2^-24, exact in fp32.
__host__ __device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t c, float p) {
  const float u = static_cast<float>(philox_word0(seed, c) >> 8) * 5.9604644775390625e-08f;
  return u >= p;
}

#if defined(__CUDACC__)
// ------------------------------------------------------------------ tensor-core primitives
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T> struct MmaOp;
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two fp32 -> one register of two T (low half = first element, i.e. the lower column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past the end: a zero K/V row keeps
// 0 * garbage from turning into NaN in P.V).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Loads rows [row0, row0 + ROWS) of a (L, D) slice with row stride `ld` (elements) into a smem
// tile with row stride D + 8; rows < row_lo, rows >= nrows, and rows whose byte in `row_mask`
// (stride mask_ld; NULL = none) is 0, are zero-filled without being read -- a masked key's K/V row
// may hold NaN or inf, and 0 * NaN in P V (or in dS) would poison the unmasked rows. All 128
// threads take part.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t ld, int row0, int nrows,
                                                const uint8_t* row_mask = nullptr, int64_t mask_ld = 0,
                                                int row_lo = 0) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kNumThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    bool ok = row0 + r < nrows && row0 + r >= row_lo;
    if (ok && row_mask != nullptr) ok = row_mask[static_cast<int64_t>(row0 + r) * mask_ld] != 0;
    const T* src = ok ? gmem + static_cast<int64_t>(row0 + r) * ld + col : gmem;
    cp_async_16(smem + r * (D + 8) + col, src, ok ? 16 : 0);
  }
}

// Paged K/V (p.block_table != nullptr): rows [row0, row0 + ROWS) of one head's LOGICAL key slots
// into sK and sV (row stride D + 8); k, v point at page 0 of that head. Slot j is read at
// k + table[j / P] * k_b + (j % P) * k_l (same for v), so K and V share one table read and one
// division per chunk. Rows outside [row_lo, nrows) are zero-filled without being read (as in
// load_tile_async); a row whose page id is out of [0, num_blocks) is never dereferenced: its smem
// rows are set to NaN with plain stores (visible after the __syncthreads that precedes every use,
// like the cp.async rows), so a lookup the caller's page check missed would still be loud. All 128
// threads take part.
template <typename T> __device__ __forceinline__ uint32_t nan_pair();
template <> __device__ __forceinline__ uint32_t nan_pair<__half>() { return 0x7e007e00u; }
template <> __device__ __forceinline__ uint32_t nan_pair<__nv_bfloat16>() { return 0x7fc07fc0u; }

__device__ __forceinline__ bool page_in_range(const Params& p, int32_t page) {
  return static_cast<uint32_t>(page) < static_cast<uint32_t>(p.num_blocks);  // page < 0 wraps high
}

template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_kv_tiles_paged(T* sK, T* sV, const T* k, const T* v, const Params& p,
                                                    const int32_t* table, int row0, int nrows, int row_lo) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kNumThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8, j = row0 + r;
    T* dk = sK + r * (D + 8) + col;
    T* dv = sV + r * (D + 8) + col;
    if (j < nrows && j >= row_lo) {
      const int page_idx = j / p.page_size, in_page = j - page_idx * p.page_size;
      const int32_t page = __ldg(table + page_idx);
      if (page_in_range(p, page)) {
        cp_async_16(dk, k + page * p.k_b + static_cast<int64_t>(in_page) * p.k_l + col, 16);
        cp_async_16(dv, v + page * p.v_b + static_cast<int64_t>(in_page) * p.v_l + col, 16);
      } else {
        const uint32_t n = nan_pair<T>();
        *reinterpret_cast<uint4*>(dk) = make_uint4(n, n, n, n);
        *reinterpret_cast<uint4*>(dv) = make_uint4(n, n, n, n);
      }
    } else {
      cp_async_16(dk, k, 0);
      cp_async_16(dv, v, 0);
    }
  }
}

// ------------------------------------------------------------------ warp GEMMs
// Every warp GEMM below computes a 16-row slab: acc[N/8][4] += A (16 x K) * B (K x N), where acc
// is in the C layout (acc[j] covers columns 8j..8j+7).

// B operand from smem for k rows k0..k0+15 and output columns n0..n0+15, as b[0..1] (cols n0..)
// and b[2..3] (cols n0+8..).
//   B_NK: smem holds B transposed, row n = output column, contiguous in k (K of S = Q K^T).
//   otherwise: smem holds B row-major, row = k, contiguous in n (V of O = P V): ldmatrix.trans.
template <bool B_NK, typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* smem, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  if (B_NK) {
    // matrices: (n0, k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8)
    const int n = n0 + (lane & 7) + ((lane >> 4) << 3), k = k0 + (((lane >> 3) & 1) << 3);
    ldmatrix_x4(b, smem + n * ld + k);
  } else {
    // matrices (transposed on load): (k0, n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8)
    const int k = k0 + (lane & 7) + (((lane >> 3) & 1) << 3), n = n0 + ((lane >> 4) << 3);
    ldmatrix_x4_trans(b, smem + k * ld + n);
  }
}

// A operand (16 rows x 16 k) from smem.
//   row-major A (A_T = false): smem row = A row, contiguous in k.
//   A_T: smem holds A transposed (row = k, contiguous in A rows), e.g. dS^T when computing dQ = dS K.
template <bool A_T, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* smem, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  if (!A_T) {
    // matrices: (m0, k0), (m0+8, k0), (m0, k0+8), (m0+8, k0+8)
    ldmatrix_x4(a, smem + (m0 + (lane & 15)) * ld + k0 + ((lane >> 4) << 3));
  } else {
    // A^T rows are k: matrices (k0, m0), (k0, m0+8), (k0+8, m0), (k0+8, m0+8), transposed on load
    const int k = k0 + (lane & 7) + ((lane >> 4) << 3), m = m0 + (((lane >> 3) & 1) << 3);
    ldmatrix_x4_trans(a, smem + k * ld + m);
  }
}

// acc (16 x N) += A (smem, rows m0..m0+15) * B (smem); K, N multiples of 16.
template <int N, int K, bool A_T, bool B_NK, typename T>
__device__ __forceinline__ void gemm_ss(float (&acc)[N / 8][4], const T* a, int lda, int m0,
                                        const T* b, int ldb, int n_off) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    load_a<A_T>(af, a, lda, m0, kk * 16);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t bf[4];
      load_b<B_NK>(bf, b, ldb, kk * 16, n_off + nn * 16);
      MmaOp<T>::run(acc[2 * nn], af, bf[0], bf[1]);
      MmaOp<T>::run(acc[2 * nn + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x N) += A (registers, A layout, a[K/16][4]) * B (smem).
template <int N, int K, bool B_NK, typename T>
__device__ __forceinline__ void gemm_rs(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                        const T* b, int ldb, int n_off) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t bf[4];
      load_b<B_NK>(bf, b, ldb, kk * 16, n_off + nn * 16);
      MmaOp<T>::run(acc[2 * nn], a[kk], bf[0], bf[1]);
      MmaOp<T>::run(acc[2 * nn + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// C-layout accumulator (16 x N fp32) -> A-layout registers (16 x N as K) in T: the two 8-column
// C blocks 2kk, 2kk+1 form A chunk kk.
template <int N, typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// (b, h[, split]) index of this CTA from grid axes y and z (heads_grid); >= the count past the end.
__device__ __forceinline__ int64_t grid_head() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

// kvcache: batch b's lengths are bad (cache_seqlens[b] < 0, cache_seqlens[b] + new rows > Lmax,
// cache_leftpad[b] < 0 or cache_leftpad[b] > cache_seqlens[b] + new rows): nothing is written or
// read for it and its output rows are NaN.
__device__ __forceinline__ bool kv_bad(const Params& p, int b) {
  if (p.seqlens_k == nullptr) return false;
  const int64_t len = p.seqlens_k[b];
  if (len < 0 || len + p.seqlens_add > p.Lk) return true;
  if (p.leftpad_k == nullptr) return false;
  const int64_t pad = p.leftpad_k[b];
  return pad < 0 || pad > len + p.seqlens_add;
}

// Number of keys batch b attends, counted from slot 0 (kvcache: device-side lengths, clamped to
// Lmax; 0 when bad): its keys are slots [first_key_of_batch, keys_of_batch).
__device__ __forceinline__ int keys_of_batch(const Params& p, int b) {
  if (p.seqlens_k == nullptr) return p.Lk;
  if (kv_bad(p, b)) return 0;
  return min(p.seqlens_k[b] + p.seqlens_add, p.Lk);
}

// First slot batch b attends (kvcache with cache_leftpad: its left padding; else, or when bad, 0).
__device__ __forceinline__ int first_key_of_batch(const Params& p, int b) {
  if (p.leftpad_k == nullptr || kv_bad(p, b)) return 0;
  return p.leftpad_k[b];
}

// Paged kvcache: whether any page id of batch b covering logical slots [lo, hi) is out of
// [0, num_blocks); reads only those entries. Every thread of the CTA must call it (a barrier).
__device__ __forceinline__ bool pages_bad_cta(const Params& p, int b, int lo, int hi) {
  bool bad = false;
  if (lo < hi) {
    const int32_t* table = p.block_table + b * p.table_stride;
    const int last = (hi - 1) / p.page_size;
#pragma unroll 4
    for (int e = lo / p.page_size + static_cast<int>(threadIdx.x); e <= last; e += blockDim.x)
      bad |= !page_in_range(p, __ldg(table + e));
  }
  return __syncthreads_or(bad) != 0;
}

// Whether query i may attend key j (batch b, keys k_first .. nk - 1; causal on the absolute j).
__device__ __forceinline__ bool attends(const Params& p, int b, int i, int j, int nk, int nq, int k_first = 0) {
  if (j >= nk || j < k_first) return false;
  if (p.causal && j > i + nk - nq) return false;
  if (p.kpm != nullptr && p.kpm[b * p.kpm_b + static_cast<int64_t>(j) * p.kpm_l] == 0) return false;
  return true;
}

// The dropout key and the counter base of head (b, h), offset + (b*H + h)*Lq*Lk, read from
// p.rng_state (device memory) when the kernel runs.  The forward reads it inside its tile loop,
// after a barrier, so the compiler reloads it (two cached loads) instead of holding 4 registers
// across the GEMMs; the backward kernels read it once per CTA (ptxas: fewer registers there).
// Element (i, j) has counter base + i*Lk + j.
struct DropoutState {
  uint64_t seed, base;
};
__device__ __forceinline__ DropoutState dropout_state(const Params& p, int b, int h) {
  return {static_cast<uint64_t>(p.rng_state[0]),
          static_cast<uint64_t>(p.rng_state[1]) + (static_cast<uint64_t>(b) * p.H + h) * p.Lq * static_cast<uint64_t>(p.Lk)};
}
__device__ __forceinline__ uint64_t dropout_counter(const Params& p, const DropoutState& ds, int i, int j) {
  return ds.base + static_cast<uint64_t>(i) * p.Lk + j;
}
#endif  // __CUDACC__

}  // namespace attn
}  // namespace fl
