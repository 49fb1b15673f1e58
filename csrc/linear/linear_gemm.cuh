// linear_gemm.cuh -- the one tensor-core GEMM behind fl_linear_* (sm_80+: mma.sync.m16n8k16,
// ldmatrix, cp.async multi-stage pipeline), fp16/bf16 in, fp32 accumulation.
//
// It computes C(m, n) = sum_k A(m, k) * B(n, k) for any M, N, K (predicated tails), where each
// operand is either K-major (A(m, k) = a[m * lda + k]) or MN-major (A(m, k) = a[k * lda + m]);
// the layout is a template parameter, so the three linear GEMMs share one kernel:
//   forward   y  = x @ W^T : A = x (K-major),        B = W (K-major)
//   grad x    dx = dz @ W  : A = dz (K-major),       B = W (MN-major)
//   grad W    dW = dz^T @ x: A = dz^T (MN-major),    B = x (MN-major)
// Shared memory holds each stage's tiles in their global layout (rows padded by 16 bytes, so the
// 8 row addresses of every ldmatrix hit 8 distinct 16-byte bank groups); MN-major tiles are read
// with ldmatrix.trans, which yields exactly the fragment a K-major tile gives without .trans.
//
// kForward epilogue (registers only): z = acc + bias; optionally store z (pre-activation);
// y = act(z) + residual; store y.
// kGradient: a PROLOGUE turns the A fragment dy into dz = dy * act'(preact) in registers (the
// preact tile is staged in shared memory in A's layout and read with the same ldmatrix, so the two
// fragments match element for element); dz is never written to memory. When row_sum is given,
// the CTAs of the first N-tile column also write row_sum[m] = sum_k dz(m, k) (the bias gradient
// when A = dz^T), summed in fp32 in a fixed order (deterministic, no atomics).
//
// Alignment: ALIGNED kernels move 16-byte chunks with cp.async (base pointers 16-byte aligned,
// row strides multiples of 8 elements; a chunk that straddles the end of a row is zero-filled via
// cp.async's src-size). The !ALIGNED variant loads element by element (same pipeline, synchronous
// copies) for any pointer and stride.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace fl {
namespace linear {

enum Mode { kForward = 0, kGradient = 1 };

// CTA tile BM x BN x 32, WARPS_M x WARPS_N warps, each warp owning a (BM/WARPS_M) x (BN/WARPS_N)
// block of C made of 16x8 mma tiles.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = 32;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int PAD = 8;  // elements (16 bytes) of padding per smem row
  // CTAs per SM the register budget must allow (<= 128 registers a thread: 2 x 256 or 4 x 128).
  static constexpr int MIN_CTAS = 512 / THREADS;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
};
using BigTile = TileConfig<128, 128, 4, 2>;   // 256 threads, warp tile 32x64
using SmallTile = TileConfig<64, 64, 2, 2>;   // 128 threads, warp tile 32x32 (small M or N)

// Elements of one operand tile in shared memory: K-major [rows][BK + PAD], MN-major [BK][rows + PAD].
template <bool KMAJOR, int ROWS, int BK, int PAD>
struct TileSmem {
  static constexpr int PITCH = KMAJOR ? BK + PAD : ROWS + PAD;
  static constexpr int ELEMS = KMAJOR ? ROWS * PITCH : BK * PITCH;
  static_assert((ELEMS * 2) % 16 == 0, "stage offsets must stay 16-byte aligned");
};

struct GemmParams {
  const void* a; int64_t lda;          // A operand (see layout above)
  const void* a_pre; int64_t lda_pre;  // kGradient with an activation: preact, in A's layout
  const void* b; int64_t ldb;          // B operand
  void* c; int64_t ldc;                // C (M, N), row-major, row stride ldc
  const void* bias;                    // kForward: (N,) or null
  const void* residual; int64_t ldr;   // kForward: (M, N) or null
  void* preact_out; int64_t ldp;       // kForward: (M, N) pre-activation output or null
  void* row_sum;                       // kGradient: (M,) = sum_k dz(m, k), or null
  int M, N, K;
  int pair_ok;  // C/residual/preact_out pointers 4-byte aligned and their strides even
};

// ------------------------------------------------------------------ PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; bytes beyond src_bytes (0..16) are zero-filled and not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, register j receives
// matrix j with lane l holding row l/4, columns 2(l%4), 2(l%4)+1 (transposed with TRANS).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
#endif
}

// d += a * b, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two 16-bit values in one register: low half = first (lower column) element.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t u);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 h; memcpy(&h, &u, 4); return __half22float2(h);
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  __nv_bfloat162 h; memcpy(&h, &u, 4); return __bfloat1622float2(h);
}
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi); uint32_t u; memcpy(&u, &h, 4); return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi); uint32_t u; memcpy(&u, &h, 4); return u;
}

// ------------------------------------------------------------------ activations (fp32)
template <int ACT>
__device__ __forceinline__ float act_fwd(float x) {
  if constexpr (ACT == FL_ACT_GELU) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else if constexpr (ACT == FL_ACT_GELU_TANH) {
    // 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)). Not tanhf: under --use_fast_math it is
    // tanh.approx.f32 (relative error ~2^-11), and 1 + tanh(u) cancels for x < 0 (x = -3: up to 20% off).
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.f + __expf(-2.f * u));
  } else if constexpr (ACT == FL_ACT_RELU) {
    return x < 0.f ? 0.f : x;  // NaN stays NaN, as torch.clamp_min / F.relu
  } else {
    return x;
  }
}

// d act / d x at x.
template <int ACT>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (ACT == FL_ACT_GELU) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = 0.3989422804014327f * __expf(-0.5f * x * x);
    return cdf + x * pdf;
  } else if constexpr (ACT == FL_ACT_GELU_TANH) {
    // With s = 0.5 (1 + tanh(u)) = sigmoid(2u): 1 - tanh^2 = 4 s (1 - s) (no tanhf, see act_fwd).
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    const float s = 1.f / (1.f + __expf(-2.f * k0 * (x + k1 * x * x * x)));
    return s + 2.f * x * s * (1.f - s) * k0 * (1.f + 3.f * k1 * x * x);
  } else if constexpr (ACT == FL_ACT_RELU) {
    return x > 0.f ? 1.f : 0.f;
  } else {
    return 1.f;
  }
}

// ------------------------------------------------------------------ global -> shared
// Copies the (ROWS x BK) tile of an operand starting at (mn0, k0) into `smem` (its global layout,
// padded rows). Out-of-range elements become 0, so they add nothing to the dot products.
template <typename T, bool KMAJOR, bool ALIGNED, int ROWS, int BK, int PAD, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ld, int mn0, int k0, int MN,
                                          int K, int tid) {
  using S = TileSmem<KMAJOR, ROWS, BK, PAD>;
  constexpr int CHUNKS_PER_ROW = (KMAJOR ? BK : ROWS) / 8;
  constexpr int CHUNKS = (KMAJOR ? ROWS : BK) * CHUNKS_PER_ROW;
  static_assert(CHUNKS % THREADS == 0, "tile chunks must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < CHUNKS / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int r = c / CHUNKS_PER_ROW, cc = (c % CHUNKS_PER_ROW) * 8;
    // r indexes the stored rows (mn for K-major, k for MN-major); cc the contiguous dim.
    int valid;
    int64_t off;
    if (KMAJOR) {
      const int mn = mn0 + r, k = k0 + cc;
      valid = mn < MN ? min(max(K - k, 0), 8) : 0;
      off = static_cast<int64_t>(mn) * ld + k;
    } else {
      const int k = k0 + r, mn = mn0 + cc;
      valid = k < K ? min(max(MN - mn, 0), 8) : 0;
      off = static_cast<int64_t>(k) * ld + mn;
    }
    T* dst = smem + r * S::PITCH + cc;
    if (valid == 0) {
      // Wholly outside the operand (which may then be empty, its pointer null): store zeros.
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else if (ALIGNED) {
      cp_async_16(dst, g + off, valid * 2);
    } else {
      const T* src = g + off;
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
      uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = e < valid ? s16[e] : uint16_t(0);
      uint4 q;
      q.x = v[0] | (uint32_t(v[1]) << 16);
      q.y = v[2] | (uint32_t(v[3]) << 16);
      q.z = v[4] | (uint32_t(v[5]) << 16);
      q.w = v[6] | (uint32_t(v[7]) << 16);
      *reinterpret_cast<uint4*>(dst) = q;
    }
  }
}

// ------------------------------------------------------------------ epilogue helpers
template <typename T>
__device__ __forceinline__ float load_elem(const void* p, int64_t i) {
  return to_float(reinterpret_cast<const T*>(p)[i]);
}
template <typename T>
__device__ __forceinline__ void store_elem(void* p, int64_t i, float v) {
  reinterpret_cast<T*>(p)[i] = from_float<T>(v);
}

// Finishes C(row, col) and C(row, col + 1) (col even) from two fp32 accumulators.
template <typename T, int MODE, int ACT>
__device__ __forceinline__ void epilogue_pair(const GemmParams& p, int row, int col, float v0, float v1) {
  if (row >= p.M || col >= p.N) return;
  const bool two = col + 1 < p.N;
  const bool pair = two && p.pair_ok;
  if (MODE == kForward) {
    if (p.bias) {
      v0 += load_elem<T>(p.bias, col);
      if (two) v1 += load_elem<T>(p.bias, col + 1);
    }
    if (p.preact_out) {
      const int64_t i = static_cast<int64_t>(row) * p.ldp + col;
      if (pair) {
        *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.preact_out) + i) = pack2<T>(v0, v1);
      } else {
        store_elem<T>(p.preact_out, i, v0);
        if (two) store_elem<T>(p.preact_out, i + 1, v1);
      }
    }
    v0 = act_fwd<ACT>(v0);
    v1 = act_fwd<ACT>(v1);
    if (p.residual) {
      const int64_t i = static_cast<int64_t>(row) * p.ldr + col;
      if (pair) {
        const float2 r = unpack2<T>(*reinterpret_cast<const uint32_t*>(reinterpret_cast<const T*>(p.residual) + i));
        v0 += r.x;
        v1 += r.y;
      } else {
        v0 += load_elem<T>(p.residual, i);
        if (two) v1 += load_elem<T>(p.residual, i + 1);
      }
    }
  }
  const int64_t i = static_cast<int64_t>(row) * p.ldc + col;
  if (pair) {
    *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.c) + i) = pack2<T>(v0, v1);
  } else {
    store_elem<T>(p.c, i, v0);
    if (two) store_elem<T>(p.c, i + 1, v1);
  }
}

// ------------------------------------------------------------------ the kernel
template <typename T, class Cfg, int MODE, int ACT, bool A_KMAJOR, bool B_KMAJOR, bool ALIGNED>
struct Gemm {
  static constexpr bool PROLOGUE = MODE == kGradient && ACT != FL_ACT_NONE;
  static constexpr int STAGES = PROLOGUE ? 3 : 4;
  using SA = TileSmem<A_KMAJOR, Cfg::BM, Cfg::BK, Cfg::PAD>;
  using SB = TileSmem<B_KMAJOR, Cfg::BN, Cfg::BK, Cfg::PAD>;
  static constexpr int STAGE_ELEMS = SA::ELEMS * (PROLOGUE ? 2 : 1) + SB::ELEMS;
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_ELEMS * sizeof(T);
};

template <typename T, class Cfg, int MODE, int ACT, bool A_KMAJOR, bool B_KMAJOR, bool ALIGNED>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_CTAS)
linear_gemm_kernel(const GemmParams p) {
  using G = Gemm<T, Cfg, MODE, ACT, A_KMAJOR, B_KMAJOR, ALIGNED>;
  using SA = typename G::SA;
  using SB = typename G::SB;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, PAD = Cfg::PAD, THREADS = Cfg::THREADS;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, STAGES = G::STAGES;
  constexpr bool PROLOGUE = G::PROLOGUE;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  // Stage s: [A tile][preact tile (PROLOGUE)][B tile].
  auto sA = [&](int s) { return smem + s * G::STAGE_ELEMS; };
  auto sP = [&](int s) { return smem + s * G::STAGE_ELEMS + SA::ELEMS; };
  auto sB = [&](int s) { return smem + s * G::STAGE_ELEMS + SA::ELEMS * (PROLOGUE ? 2 : 1); };

  // Grouped tile order: GROUP consecutive M-tiles sweep the N-tiles together, so the B tiles
  // they share stay in L2.
  constexpr int GROUP = 8;
  // N == 0 still gets one tile column (fl_linear_bwd_dw with K == 0 needs its row sums).
  const int tiles_m = (p.M + BM - 1) / BM, tiles_n = max((p.N + BN - 1) / BN, 1);
  const int pid = blockIdx.x;
  const int width = GROUP * tiles_n;
  const int first_m = (pid / width) * GROUP;
  const int gsize = min(tiles_m - first_m, GROUP);
  const int tm = first_m + (pid % width) % gsize;
  const int tn = (pid % width) / gsize;
  const int m0 = tm * BM, n0 = tn * BN;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;

  const T* A = reinterpret_cast<const T*>(p.a);
  const T* P = reinterpret_cast<const T*>(p.a_pre);
  const T* B = reinterpret_cast<const T*>(p.b);
  const int KT = (p.K + BK - 1) / BK;

  auto load_stage = [&](int kt, int s) {
    const int k0 = kt * BK;
    load_tile<T, A_KMAJOR, ALIGNED, BM, BK, PAD, THREADS>(sA(s), A, p.lda, m0, k0, p.M, p.K, tid);
    if (PROLOGUE)
      load_tile<T, A_KMAJOR, ALIGNED, BM, BK, PAD, THREADS>(sP(s), P, p.lda_pre, m0, k0, p.M, p.K, tid);
    load_tile<T, B_KMAJOR, ALIGNED, BN, BK, PAD, THREADS>(sB(s), B, p.ldb, n0, k0, p.N, p.K, tid);
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  // Row sums of dz (bias gradient): one warp column of the first N-tile column owns them.
  const bool do_row_sum = MODE == kGradient && p.row_sum != nullptr && tn == 0 && wn == 0;
  float rsum[MI][2];
#pragma unroll
  for (int i = 0; i < MI; ++i) rsum[i][0] = rsum[i][1] = 0.f;

  // Prologue of the pipeline: STAGES-1 tiles in flight (empty groups keep the count uniform).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix lane roles: lane l addresses row (l % 8) of 8x8 matrix j = l / 8.
  const int lj = lane >> 3, lr = lane & 7;

  for (int kt = 0; kt < KT; ++kt) {
    // Groups committed so far: STAGES-1+kt; leaving STAGES-2 pending means tile kt has landed.
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt-1's stage
    {
      const int next = kt + STAGES - 1;
      if (next < KT) load_stage(next, next % STAGES);
      cp_async_commit();
    }
    const int s = kt % STAGES;
    const T* a_s = sA(s);
    const T* p_s = sP(s);
    const T* b_s = sB(s);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // A fragment regs: 0 = (rows 0-7, k 0-7), 1 = (rows 8-15, k 0-7), 2 = (rows 0-7, k 8-15),
        // 3 = (rows 8-15, k 8-15) of this 16x16 block; matrix j = lj covers rows +8*(j&1), k +8*(j>>1).
        const int mrow = wm * Cfg::WM + mi * 16;
        int off;
        if (A_KMAJOR) off = (mrow + (lj & 1) * 8 + lr) * SA::PITCH + kk + (lj >> 1) * 8;
        else off = (kk + (lj >> 1) * 8 + lr) * SA::PITCH + mrow + (lj & 1) * 8;
        ldmatrix_x4<!A_KMAJOR>(af[mi], a_s + off);
        if (PROLOGUE) {
          uint32_t pf[4];
          ldmatrix_x4<!A_KMAJOR>(pf, p_s + off);
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const float2 dy = unpack2<T>(af[mi][r]);
            const float2 z = unpack2<T>(pf[r]);
            const float d0 = dy.x * act_grad<ACT>(z.x), d1 = dy.y * act_grad<ACT>(z.y);
            if (do_row_sum) rsum[mi][r & 1] += d0 + d1;  // regs 0, 2: row g; 1, 3: row g + 8
            af[mi][r] = pack2<T>(d0, d1);
          }
        } else if (MODE == kGradient) {
          if (do_row_sum) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const float2 dy = unpack2<T>(af[mi][r]);
              rsum[mi][r & 1] += dy.x + dy.y;
            }
          }
        }
      }
      uint32_t bf[NI][2];
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        // Two n8 blocks per ldmatrix: matrix j covers n +8*(j>>1), k +8*(j&1); regs (0,1) are the
        // (k 0-7, k 8-15) halves of n-block 2nj, regs (2,3) those of n-block 2nj+1.
        const int ncol = wn * Cfg::WN + nj * 16;
        int off;
        if (B_KMAJOR) off = (ncol + (lj >> 1) * 8 + lr) * SB::PITCH + kk + (lj & 1) * 8;
        else off = (kk + (lj & 1) * 8 + lr) * SB::PITCH + ncol + (lj >> 1) * 8;
        uint32_t r[4];
        ldmatrix_x4<!B_KMAJOR>(r, b_s + off);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  // Accumulator (mi, ni): regs 0, 1 at (row g, cols 2t, 2t+1), regs 2, 3 at row g + 8.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    const int row = m0 + wm * Cfg::WM + mi * 16 + g;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int col = n0 + wn * Cfg::WN + ni * 8 + 2 * t;
      epilogue_pair<T, MODE, ACT>(p, row, col, acc[mi][ni][0], acc[mi][ni][1]);
      epilogue_pair<T, MODE, ACT>(p, row + 8, col, acc[mi][ni][2], acc[mi][ni][3]);
    }
  }

  if (MODE == kGradient && do_row_sum) {
    // The four lanes of a quad hold disjoint k columns of the same rows: fixed-order butterfly.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = rsum[mi][h];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        const int row = m0 + wm * Cfg::WM + mi * 16 + g + 8 * h;
        if (t == 0 && row < p.M) store_elem<T>(p.row_sum, row, v);
      }
  }
}

}  // namespace linear
}  // namespace fl
