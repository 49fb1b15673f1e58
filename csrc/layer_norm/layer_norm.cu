// layer_norm.cu -- LayerNorm / RMSNorm with a fused residual add, forward and backward, behind the
// C ABI of fastlayers.h (fl_layer_norm_fwd, fl_layer_norm_bwd_workspace_size, fl_layer_norm_bwd,
// fl_layer_norm_launch_dims).
//
// Layout: (rows, cols) matrices, inner stride 1, any row stride (in elements, 0 included);
// weight/bias (cols,) contiguous.  Element types: T (x, residual, y, residual_out, dy, ds) and P
// (weight, bias, dweight, dbias) with P = T or P = float (fp16/bf16 activations with fp32
// parameters); only those (T, P) pairs are instantiated.  Statistics and every accumulation in fp32.
// Callers: pytorch_ext/cuda_ops/layer_norm.py.
//
// Grids: every launch's grid and block come from fwd_launch / bwd_launches ((rows, cols, vector
// width) only), which fl_layer_norm_launch_dims reports, so CPU tests check the limits for any
// shape.  Row-parallel grids are capped at kMaxGrid and walked by grid-stride loops with 64-bit
// row indices; the other axes are bounded by cols (<= 65536) and the partial-row counts.
//
// Kernel choice depends on cols only (plus whether 16-byte vectors are legal), so the number of
// dweight/dbias partial rows -- and hence the workspace size -- is a function of (rows, cols):
//   forward   cols <= 1024      one row per warp, the row cached in registers (two-pass stats)
//             cols <= 16384     one row per block of 128/256/512 threads, row in registers
//             larger            one row per block, chunked Welford pass + a second (L2-hot) pass
//   backward  cols <= 512       one row per warp, 8 warps a block, warp partials summed in shared
//             cols <= 8192      one row per block, row in registers
//             larger            a row-sums kernel, then a column-tiled kernel (two reads)
// dweight/dbias: every block of the main backward kernel owns one fp32 row of partial sums in the
// workspace (its rows are fixed by the grid, which depends on (rows, cols) only); a reduce kernel
// sums the partial rows in a fixed order, so results are bitwise reproducible run to run.
// Vector loads: 16 bytes when every pointer is 16-byte aligned and every row stride is a multiple
// of the vector width; the ragged end of a row (cols not a multiple of it) is loaded element-wise.
#include <algorithm>
#include <cmath>
#include <initializer_list>

#include "common.cuh"

namespace fl {
namespace {

constexpr int kMaxCols = 65536;
constexpr int kFwdMaxEpt = 32;              // fp32 values one thread caches in the forward
constexpr int kBwdMaxEpt = 16;              // ... in the backward (s, dy and two partials each)
constexpr int kFwdWarpRows = 4;             // rows (warps) per block of the forward warp kernel
constexpr int kBwdWarpRows = 8;             // rows (warps) per block of the backward warp kernel
constexpr int kFwdWarpMaxCols = 32 * kFwdMaxEpt;   // 1024
constexpr int kFwdBlockMaxCols = 512 * kFwdMaxEpt; // 16384
constexpr int kBwdWarpMaxCols = 32 * kBwdMaxEpt;   // 512
constexpr int kBwdBlockMaxCols = 512 * kBwdMaxEpt; // 8192
constexpr int kLoopThreads = 512;           // one-row-per-block loop kernels (large cols)
constexpr int kColThreads = 256;            // column-tiled backward kernel
constexpr int64_t kMaxGrid = 1 << 20;       // grid-stride loops cover the rest
// Partial-row counts of the backward (fixed per (rows, cols): never the device's SM count).
constexpr int64_t kWarpPartials = 1024, kBlockPartials = 512, kColPartials = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class BwdPath { kWarp, kBlock, kCols };

BwdPath bwd_path(int64_t cols) {
  if (cols <= kBwdWarpMaxCols) return BwdPath::kWarp;
  if (cols <= kBwdBlockMaxCols) return BwdPath::kBlock;
  return BwdPath::kCols;
}

int64_t bwd_partials(int64_t rows, int64_t cols) {
  switch (bwd_path(cols)) {
    case BwdPath::kWarp: return std::min(ceil_div(rows, kBwdWarpRows), kWarpPartials);
    case BwdPath::kBlock: return std::min(rows, kBlockPartials);
    default: return std::min(rows, kColPartials);
  }
}

// Workspace: dweight partials (P, cols) | dbias partials (P, cols) | row sums (rows, 2) (kCols only).
size_t bwd_workspace_bytes(int64_t rows, int64_t cols) {
  if (rows == 0) return 0;
  size_t n = 2 * static_cast<size_t>(bwd_partials(rows, cols)) * static_cast<size_t>(cols);
  if (bwd_path(cols) == BwdPath::kCols) n += 2 * static_cast<size_t>(rows);
  return n * sizeof(float);
}

// ------------------------------------------------------------------------------------ vector IO
template <typename T, int VW>
struct alignas(sizeof(T) * VW) Pack {
  T v[VW];
};

// VW elements of `row` from column `col` (a multiple of VW) as floats; zeros past `cols`. Accesses
// are at most 16 bytes (VW float parameters beside VW = 8 half activations take two).
template <typename T, int VW>
__device__ __forceinline__ void load_floats(const T* row, int col, int cols, float (&out)[VW]) {
  constexpr int kChunk = VW * sizeof(T) > 16 ? 16 / static_cast<int>(sizeof(T)) : VW;
  static_assert(VW % kChunk == 0, "vector width must be a multiple of the 16-byte chunk");
  if (col + VW <= cols) {
#pragma unroll
    for (int c = 0; c < VW; c += kChunk) {
      const Pack<T, kChunk> p = *reinterpret_cast<const Pack<T, kChunk>*>(row + col + c);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[c + j] = to_float<T>(p.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) out[j] = col + j < cols ? to_float<T>(row[col + j]) : 0.f;
  }
}

// Like load_floats, `fill` for a NULL row (weight 1, bias 0).
template <typename T, int VW>
__device__ __forceinline__ void load_or(const T* row, int col, int cols, float fill, float (&out)[VW]) {
  if (row) {
    load_floats<T, VW>(row, col, cols, out);
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) out[j] = fill;
  }
}

template <typename T, int VW>
__device__ __forceinline__ void store_floats(T* row, int col, int cols, const float (&in)[VW]) {
  if (col + VW <= cols) {
    Pack<T, VW> p;
#pragma unroll
    for (int j = 0; j < VW; ++j) p.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Pack<T, VW>*>(row + col) = p;
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j)
      if (col + j < cols) row[col + j] = from_float<T>(in[j]);
  }
}

// Sum over the threads sharing a row: a warp (TPR 32) or the whole block (TPR = blockDim.x).
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  if constexpr (TPR == 32) {
    return warp_sum(v);
  } else {
    return block_sum(v, scratch);
  }
}

// Two sums at once (one shuffle tree, one block barrier pair). scratch: >= 64 floats.
template <int TPR>
__device__ __forceinline__ void row_sum2(float& a, float& b, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) {
      scratch[warp] = a;
      scratch[32 + warp] = b;
    }
    __syncthreads();
    a = lane < TPR / 32 ? scratch[lane] : 0.f;
    b = lane < TPR / 32 ? scratch[32 + lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
  }
}

// Chan et al. merge of (count, mean, M2) summaries.
__device__ __forceinline__ void welford_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
  const float n_ab = n + nb;
  if (n_ab == 0.f) return;
  const float delta = mb - m;
  const float fb = nb / n_ab;
  m += delta * fb;
  m2 += m2b + delta * delta * n * fb;
  n = n_ab;
}

// Block-wide merge; every thread gets the block's (mean, M2). scratch: >= 3 * 32 floats.
// Every warp merges the per-warp summaries in the same order, so all threads agree bitwise.
__device__ __forceinline__ void block_welford(float& n, float& m, float& m2, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    welford_merge(n, m, m2, __shfl_xor_sync(0xffffffffu, n, o), __shfl_xor_sync(0xffffffffu, m, o),
                  __shfl_xor_sync(0xffffffffu, m2, o));
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
    scratch[warp] = n;
    scratch[32 + warp] = m;
    scratch[64 + warp] = m2;
  }
  __syncthreads();
  n = lane < nwarps ? scratch[lane] : 0.f;
  m = lane < nwarps ? scratch[32 + lane] : 0.f;
  m2 = lane < nwarps ? scratch[64 + lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    welford_merge(n, m, m2, __shfl_xor_sync(0xffffffffu, n, o), __shfl_xor_sync(0xffffffffu, m, o),
                  __shfl_xor_sync(0xffffffffu, m2, o));
  m = __shfl_sync(0xffffffffu, m, 0);  // xor merges may differ in the last bit across lanes
  m2 = __shfl_sync(0xffffffffu, m2, 0);
}

// -------------------------------------------------------------------------------------- forward
struct FwdArgs {
  const void* x;
  int64_t x_stride;
  const void* residual;  // NULL: no residual add
  int64_t residual_stride;
  const void* weight;  // NULL: weight 1
  const void* bias;    // NULL: bias 0
  void* y;
  int64_t y_stride;
  void* residual_out;  // written iff residual
  int64_t residual_out_stride;
  float* mean;  // (rows,) or NULL
  float* rstd;  // (rows,) or NULL
  int64_t rows;
  int cols;
  float eps;
  bool rms;
};

// Loads x (+ residual, rounded to T and written to residual_out) for one VW-vector.
template <typename T, int VW>
__device__ __forceinline__ void load_input(const FwdArgs& a, int64_t row, int col, float (&v)[VW]) {
  load_floats<T, VW>(static_cast<const T*>(a.x) + row * a.x_stride, col, a.cols, v);
  if (a.residual) {
    float r[VW];
    load_floats<T, VW>(static_cast<const T*>(a.residual) + row * a.residual_stride, col, a.cols, r);
#pragma unroll
    for (int j = 0; j < VW; ++j) v[j] = to_float<T>(from_float<T>(v[j] + r[j]));
    store_floats<T, VW>(static_cast<T*>(a.residual_out) + row * a.residual_out_stride, col, a.cols, v);
  }
}

template <typename T, typename P, int VW>
__device__ __forceinline__ void store_output(const FwdArgs& a, int64_t row, int col, float mu, float rs,
                                             const float (&v)[VW]) {
  float w[VW], b[VW], out[VW];
  load_or<P, VW>(static_cast<const P*>(a.weight), col, a.cols, 1.f, w);
  load_or<P, VW>(static_cast<const P*>(a.bias), col, a.cols, 0.f, b);
#pragma unroll
  for (int j = 0; j < VW; ++j) out[j] = (v[j] - mu) * rs * w[j] + b[j];
  store_floats<T, VW>(static_cast<T*>(a.y) + row * a.y_stride, col, a.cols, out);
}

// TPR threads per row (32: a warp, RPB rows per block; else the block, RPB = 1); each thread holds
// NV vectors of VW elements at columns (i * TPR + lane) * VW.
template <typename T, typename P, int VW, int NV, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB) layer_norm_fwd_kernel(const FwdArgs a) {
  static_assert(RPB == 1 || TPR == 32, "several rows per block only with one warp per row");
  __shared__ float scratch[32];
  const int lane = threadIdx.x % TPR;
  const float inv_cols = 1.f / a.cols;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    float v[NV][VW];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = (i * TPR + lane) * VW;
      if (col < a.cols) {
        load_input<T, VW>(a, row, col, v[i]);
      } else {
#pragma unroll
        for (int j = 0; j < VW; ++j) v[i][j] = 0.f;
      }
    }
    // Reduced for RMSNorm too: keeps every shuffle out of divergent code (ptxas would otherwise
    // call a slow emulation of shfl.sync in some instantiations).
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) sum += v[i][j];
    sum = row_sum<TPR>(sum, scratch);
    const float mu = a.rms ? 0.f : sum * inv_cols;
    float sq = 0.f;  // columns past the end hold 0, which must not enter (0 - mu)^2
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        const float d = v[i][j] - mu;
        sq += (i * TPR + lane) * VW + j < a.cols ? d * d : 0.f;
      }
    const float rs = rsqrtf(row_sum<TPR>(sq, scratch) * inv_cols + a.eps);
    if (lane == 0) {
      if (a.mean) a.mean[row] = mu;
      if (a.rstd) a.rstd[row] = rs;
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = (i * TPR + lane) * VW;
      if (col < a.cols) store_output<T, P, VW>(a, row, col, mu, rs, v[i]);
    }
  }
}

// Large cols: one row per block; a chunked Welford pass, then a second pass that re-reads the row
// (from residual_out when there is a residual: this thread wrote exactly those columns).
template <typename T, typename P, int VW>
__global__ void __launch_bounds__(kLoopThreads) layer_norm_fwd_loop_kernel(const FwdArgs a) {
  __shared__ float scratch[3 * 32];
  const int step = kLoopThreads * VW;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    float n = 0.f, mu = 0.f, m2 = 0.f;
    for (int col = threadIdx.x * VW; col < a.cols; col += step) {
      float v[VW];
      load_input<T, VW>(a, row, col, v);
      const int cnt = min(VW, a.cols - col);
      if (a.rms) {
#pragma unroll
        for (int j = 0; j < VW; ++j) m2 += v[j] * v[j];  // past-the-end entries are 0
      } else {
        float cs = 0.f;
#pragma unroll
        for (int j = 0; j < VW; ++j) cs += v[j];
        const float cm = cs / cnt;
        float cq = 0.f;
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          const float d = v[j] - cm;
          cq += j < cnt ? d * d : 0.f;
        }
        welford_merge(n, mu, m2, static_cast<float>(cnt), cm, cq);
      }
    }
    float var;
    if (a.rms) {
      mu = 0.f;
      var = block_sum(m2, scratch) / a.cols;
    } else {
      block_welford(n, mu, m2, scratch);
      var = m2 / a.cols;
    }
    const float rs = rsqrtf(var + a.eps);
    if (threadIdx.x == 0) {
      if (a.mean) a.mean[row] = mu;
      if (a.rstd) a.rstd[row] = rs;
    }
    const T* src = a.residual ? static_cast<const T*>(a.residual_out) + row * a.residual_out_stride
                              : static_cast<const T*>(a.x) + row * a.x_stride;
    for (int col = threadIdx.x * VW; col < a.cols; col += step) {
      float v[VW];
      load_floats<T, VW>(src, col, a.cols, v);
      store_output<T, P, VW>(a, row, col, mu, rs, v);
    }
  }
}

// ------------------------------------------------------------------------------- launch plans
// Grid and block of every launch, from (rows, cols, vector width) alone. The launchers below take
// their dims from here (and refuse a kernel whose block size disagrees); fl_layer_norm_launch_dims
// reports the same values, so a CPU test can check the grid limits for shapes no GPU could hold.
struct Launch {
  dim3 grid, block;
};

unsigned grid_1d(int64_t blocks) { return static_cast<unsigned>(std::min(blocks, kMaxGrid)); }

// Threads per row of the one-row-per-block kernels: the fewest that cover cols at max_ept each.
unsigned block_threads(int64_t cols, int max_ept) {
  if (cols <= 128 * max_ept) return 128;
  if (cols <= 256 * max_ept) return 256;
  return 512;
}

Launch fwd_launch(int64_t rows, int64_t cols) {
  if (cols <= kFwdWarpMaxCols) return {dim3(grid_1d(ceil_div(rows, kFwdWarpRows))), dim3(32 * kFwdWarpRows)};
  if (cols <= kFwdBlockMaxCols) return {dim3(grid_1d(rows)), dim3(block_threads(cols, kFwdMaxEpt))};
  return {dim3(grid_1d(rows)), dim3(kLoopThreads)};
}

inline fl_status check_block(const Launch& l, int threads, const char* kernel) {
  if (l.block.x * l.block.y * l.block.z != static_cast<unsigned>(threads))
    return set_error(FL_ERR_INVALID, std::string(kernel) + ": launch plan and kernel disagree on the block size "
                                     "(a bug in layer_norm.cu)");
  return FL_OK;
}

template <typename T, typename P, int VW, int NV, int TPR, int RPB>
fl_status run_fwd(const FwdArgs& a, const Launch& l, cudaStream_t st) {
  FL_RETURN_IF_ERROR(check_block(l, TPR * RPB, "layer_norm_fwd_kernel"));
  layer_norm_fwd_kernel<T, P, VW, NV, TPR, RPB><<<l.grid, l.block, 0, st>>>(a);
  return check_launch("layer_norm_fwd_kernel");
}

// Smallest NV (doubling) whose warp covers cols.
template <typename T, typename P, int VW, int NV>
fl_status fwd_warp(const FwdArgs& a, const Launch& l, cudaStream_t st) {
  if constexpr (NV * 2 * VW <= kFwdMaxEpt) {
    if (a.cols > 32 * VW * NV) return fwd_warp<T, P, VW, NV * 2>(a, l, st);
  }
  return run_fwd<T, P, VW, NV, 32, kFwdWarpRows>(a, l, st);
}

template <typename T, typename P, int VW>
fl_status fwd_vw(const FwdArgs& a, cudaStream_t st) {
  constexpr int NV = kFwdMaxEpt / VW;
  const Launch l = fwd_launch(a.rows, a.cols);
  if (a.cols <= kFwdWarpMaxCols) return fwd_warp<T, P, VW, 1>(a, l, st);
  if (a.cols <= 128 * kFwdMaxEpt) return run_fwd<T, P, VW, NV, 128, 1>(a, l, st);
  if (a.cols <= 256 * kFwdMaxEpt) return run_fwd<T, P, VW, NV, 256, 1>(a, l, st);
  if (a.cols <= kFwdBlockMaxCols) return run_fwd<T, P, VW, NV, 512, 1>(a, l, st);
  FL_RETURN_IF_ERROR(check_block(l, kLoopThreads, "layer_norm_fwd_loop_kernel"));
  layer_norm_fwd_loop_kernel<T, P, VW><<<l.grid, l.block, 0, st>>>(a);
  return check_launch("layer_norm_fwd_loop_kernel");
}

bool aligned16(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides, int vw) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;  // NULL is aligned
  for (int64_t s : strides)
    if (s % vw != 0) return false;
  return true;
}

// ------------------------------------------------------------------------------------- backward
struct BwdArgs {
  const void* dy;
  int64_t dy_stride;
  const void* s;
  int64_t s_stride;
  const void* weight;  // NULL: weight 1
  const float* mean;   // (rows,), unused when rms
  const float* rstd;   // (rows,)
  const void* dres;    // NULL: no incoming residual_out gradient
  int64_t dres_stride;
  void* ds;
  int64_t ds_stride;
  float* dw_part;   // (P, cols) or NULL when dweight is not wanted
  float* db_part;   // (P, cols) or NULL when dbias is not wanted
  float* row_sums;  // (rows, 2) mean(w dy), mean(w dy xhat): column-tiled path only
  int64_t rows;
  int cols;
  bool rms;
};

// ds for one vector given xhat, w*dy and the row's mean(w dy) (c1) and mean(w dy xhat) (c2).
template <typename T, int VW>
__device__ __forceinline__ void store_ds(const BwdArgs& a, int64_t row, int col, float rs, float c1, float c2,
                                         const float (&xhat)[VW], const float (&wdy)[VW]) {
  float d[VW];
  if (a.dres) {
    load_floats<T, VW>(static_cast<const T*>(a.dres) + row * a.dres_stride, col, a.cols, d);
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) d[j] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < VW; ++j) d[j] += rs * (wdy[j] - c1 - xhat[j] * c2);
  store_floats<T, VW>(static_cast<T*>(a.ds) + row * a.ds_stride, col, a.cols, d);
}

// Rows as in the forward kernel; the block accumulates dweight/dbias over its rows in registers
// and writes one partial row (warps of a block are summed in warp order through shared memory).
template <typename T, typename P, int VW, int NV, int TPR, int RPB>
__global__ void __launch_bounds__(TPR * RPB) layer_norm_bwd_kernel(const BwdArgs a) {
  static_assert(RPB == 1 || TPR == 32, "several rows per block only with one warp per row");
  constexpr int kCap = TPR * NV * VW;  // columns one row group covers
  __shared__ float scratch[64];
  __shared__ float part[RPB > 1 ? 2 * RPB * kCap : 1];
  const int lane = threadIdx.x % TPR, group = threadIdx.x / TPR;
  const float inv_cols = 1.f / a.cols;
  const P* weight = static_cast<const P*>(a.weight);
  float dw[NV][VW], db[NV][VW];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VW; ++j) dw[i][j] = db[i][j] = 0.f;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + group; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const T* s_row = static_cast<const T*>(a.s) + row * a.s_stride;
    const T* dy_row = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const float mu = a.rms ? 0.f : a.mean[row];
    const float rs = a.rstd[row];
    float xhat[NV][VW], wdy[NV][VW];  // past-the-end columns: dy = 0, so they add nothing
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = (i * TPR + lane) * VW;
      float g[VW], w[VW];
      if (col < a.cols) {
        load_floats<T, VW>(s_row, col, a.cols, xhat[i]);
        load_floats<T, VW>(dy_row, col, a.cols, g);
        load_or<P, VW>(weight, col, a.cols, 1.f, w);
      } else {
#pragma unroll
        for (int j = 0; j < VW; ++j) xhat[i][j] = g[j] = w[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        xhat[i][j] = (xhat[i][j] - mu) * rs;
        wdy[i][j] = w[j] * g[j];
        dw[i][j] += g[j] * xhat[i][j];
        db[i][j] += g[j];
      }
    }
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        s1 += wdy[i][j];
        s2 += wdy[i][j] * xhat[i][j];
      }
    row_sum2<TPR>(s1, s2, scratch);
    const float c1 = a.rms ? 0.f : s1 * inv_cols;
    const float c2 = s2 * inv_cols;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = (i * TPR + lane) * VW;
      if (col < a.cols) store_ds<T, VW>(a, row, col, rs, c1, c2, xhat[i], wdy[i]);
    }
  }

  const int64_t out = static_cast<int64_t>(blockIdx.x) * a.cols;
  if constexpr (RPB == 1) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int col = (i * TPR + lane) * VW;
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        if (col + j < a.cols) {
          if (a.dw_part) a.dw_part[out + col + j] = dw[i][j];
          if (a.db_part) a.db_part[out + col + j] = db[i][j];
        }
      }
    }
  } else {
    float* pw = part + group * kCap;
    float* pb = part + (RPB + group) * kCap;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        pw[(i * TPR + lane) * VW + j] = dw[i][j];
        pb[(i * TPR + lane) * VW + j] = db[i][j];
      }
    __syncthreads();
    for (int c = threadIdx.x; c < a.cols; c += TPR * RPB) {
      float sw = 0.f, sb = 0.f;
#pragma unroll
      for (int g = 0; g < RPB; ++g) {  // fixed warp order: deterministic
        sw += part[g * kCap + c];
        sb += part[(RPB + g) * kCap + c];
      }
      if (a.dw_part) a.dw_part[out + c] = sw;
      if (a.db_part) a.db_part[out + c] = sb;
    }
  }
}

// Large cols, step 1: per row mean(w dy) and mean(w dy xhat) into row_sums.
template <typename T, typename P, int VW>
__global__ void __launch_bounds__(kLoopThreads) layer_norm_bwd_row_sums_kernel(const BwdArgs a) {
  __shared__ float scratch[32];
  const P* weight = static_cast<const P*>(a.weight);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* s_row = static_cast<const T*>(a.s) + row * a.s_stride;
    const T* dy_row = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const float mu = a.rms ? 0.f : a.mean[row];
    const float rs = a.rstd[row];
    float s1 = 0.f, s2 = 0.f;
    for (int col = threadIdx.x * VW; col < a.cols; col += kLoopThreads * VW) {
      float x[VW], g[VW], w[VW];
      load_floats<T, VW>(s_row, col, a.cols, x);
      load_floats<T, VW>(dy_row, col, a.cols, g);
      load_or<P, VW>(weight, col, a.cols, 1.f, w);
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        const float wdy = w[j] * g[j];
        s1 += wdy;
        s2 += wdy * (x[j] - mu) * rs;
      }
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
      a.row_sums[2 * row] = a.rms ? 0.f : s1 / a.cols;
      a.row_sums[2 * row + 1] = s2 / a.cols;
    }
  }
}

// Large cols, step 2: block (x: a tile of kColThreads * VW columns, y: partial p) handles rows
// p, p + P, ...; ds from row_sums, dweight/dbias partials of its tile in registers.
template <typename T, typename P, int VW>
__global__ void __launch_bounds__(kColThreads) layer_norm_bwd_cols_kernel(const BwdArgs a) {
  const int col = (blockIdx.x * kColThreads + threadIdx.x) * VW;
  if (col >= a.cols) return;  // no block-wide synchronisation below
  float w[VW], dw[VW], db[VW];
  load_or<P, VW>(static_cast<const P*>(a.weight), col, a.cols, 1.f, w);
#pragma unroll
  for (int j = 0; j < VW; ++j) dw[j] = db[j] = 0.f;
  for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
    const float mu = a.rms ? 0.f : a.mean[row];
    const float rs = a.rstd[row];
    float xhat[VW], g[VW], wdy[VW];
    load_floats<T, VW>(static_cast<const T*>(a.s) + row * a.s_stride, col, a.cols, xhat);
    load_floats<T, VW>(static_cast<const T*>(a.dy) + row * a.dy_stride, col, a.cols, g);
#pragma unroll
    for (int j = 0; j < VW; ++j) {
      xhat[j] = (xhat[j] - mu) * rs;
      wdy[j] = w[j] * g[j];
      dw[j] += g[j] * xhat[j];
      db[j] += g[j];
    }
    store_ds<T, VW>(a, row, col, rs, a.row_sums[2 * row], a.row_sums[2 * row + 1], xhat, wdy);
  }
  const int64_t out = static_cast<int64_t>(blockIdx.y) * a.cols;
#pragma unroll
  for (int j = 0; j < VW; ++j) {
    if (col + j < a.cols) {
      if (a.dw_part) a.dw_part[out + col + j] = dw[j];
      if (a.db_part) a.db_part[out + col + j] = db[j];
    }
  }
}

// out[c] = sum_p part[p, c] in a fixed order (8 strided lanes of p, then the lanes in order).
// blockIdx.y: 0 -> dweight, 1 -> dbias; P: the parameters' type.
template <typename P>
__global__ void __launch_bounds__(256) layer_norm_bwd_reduce_kernel(const float* dw_part, const float* db_part,
                                                                    P* dweight, P* dbias, int64_t partials,
                                                                    int cols) {
  const float* part = blockIdx.y == 0 ? dw_part : db_part;
  P* out = blockIdx.y == 0 ? dweight : dbias;
  if (part == nullptr) return;  // uniform over the block
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.f;
  if (col < cols)
    for (int64_t p = threadIdx.y; p < partials; p += 8) sum += part[p * cols + col];
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += acc[k][threadIdx.x];
    out[col] = from_float<P>(total);
  }
}

// Backward launches, in order: [row sums (column-tiled path only)], the main kernel, the reduce
// (run when dweight or dbias is wanted). Returns their count (<= kMaxBwdLaunches).
constexpr int kMaxBwdLaunches = 3;
int bwd_launches(int64_t rows, int64_t cols, int vw, Launch (&out)[kMaxBwdLaunches]) {
  const unsigned partials = static_cast<unsigned>(bwd_partials(rows, cols));  // <= kWarpPartials
  int n = 0;
  switch (bwd_path(cols)) {
    case BwdPath::kWarp: out[n++] = {dim3(partials), dim3(32 * kBwdWarpRows)}; break;
    case BwdPath::kBlock: out[n++] = {dim3(partials), dim3(block_threads(cols, kBwdMaxEpt))}; break;
    default:
      out[n++] = {dim3(grid_1d(rows)), dim3(kLoopThreads)};
      out[n++] = {dim3(static_cast<unsigned>(ceil_div(cols, kColThreads * vw)), partials), dim3(kColThreads)};
  }
  out[n++] = {dim3(static_cast<unsigned>(ceil_div(cols, 32)), 2), dim3(32, 8)};
  return n;
}

template <typename T, typename P, int VW, int NV, int TPR, int RPB>
fl_status run_bwd(const BwdArgs& a, const Launch& l, cudaStream_t st) {
  FL_RETURN_IF_ERROR(check_block(l, TPR * RPB, "layer_norm_bwd_kernel"));
  layer_norm_bwd_kernel<T, P, VW, NV, TPR, RPB><<<l.grid, l.block, 0, st>>>(a);
  return check_launch("layer_norm_bwd_kernel");
}

template <typename T, typename P, int VW, int NV>
fl_status bwd_warp(const BwdArgs& a, const Launch& l, cudaStream_t st) {
  if constexpr (NV * 2 * VW <= kBwdMaxEpt) {
    if (a.cols > 32 * VW * NV) return bwd_warp<T, P, VW, NV * 2>(a, l, st);
  }
  return run_bwd<T, P, VW, NV, 32, kBwdWarpRows>(a, l, st);
}

// Every launch of the backward, the reduce included; P: the parameters' type.
template <typename T, typename P, int VW>
fl_status bwd_vw(const BwdArgs& a, P* dweight, P* dbias, int64_t partials, cudaStream_t st) {
  constexpr int NV = kBwdMaxEpt / VW;
  Launch l[kMaxBwdLaunches];
  const int n = bwd_launches(a.rows, a.cols, VW, l);
  switch (bwd_path(a.cols)) {
    case BwdPath::kWarp: FL_RETURN_IF_ERROR((bwd_warp<T, P, VW, 1>(a, l[0], st))); break;
    case BwdPath::kBlock:
      if (a.cols <= 128 * kBwdMaxEpt) {
        FL_RETURN_IF_ERROR((run_bwd<T, P, VW, NV, 128, 1>(a, l[0], st)));
      } else if (a.cols <= 256 * kBwdMaxEpt) {
        FL_RETURN_IF_ERROR((run_bwd<T, P, VW, NV, 256, 1>(a, l[0], st)));
      } else {
        FL_RETURN_IF_ERROR((run_bwd<T, P, VW, NV, 512, 1>(a, l[0], st)));
      }
      break;
    default:
      FL_RETURN_IF_ERROR(check_block(l[0], kLoopThreads, "layer_norm_bwd_row_sums_kernel"));
      layer_norm_bwd_row_sums_kernel<T, P, VW><<<l[0].grid, l[0].block, 0, st>>>(a);
      FL_RETURN_IF_ERROR(check_launch("layer_norm_bwd_row_sums_kernel"));
      FL_RETURN_IF_ERROR(check_block(l[1], kColThreads, "layer_norm_bwd_cols_kernel"));
      layer_norm_bwd_cols_kernel<T, P, VW><<<l[1].grid, l[1].block, 0, st>>>(a);
      FL_RETURN_IF_ERROR(check_launch("layer_norm_bwd_cols_kernel"));
  }
  if (dweight == nullptr && dbias == nullptr) return FL_OK;
  const Launch& r = l[n - 1];
  layer_norm_bwd_reduce_kernel<P><<<r.grid, r.block, 0, st>>>(a.dw_part, a.db_part, dweight, dbias, partials,
                                                               a.cols);
  return check_launch("layer_norm_bwd_reduce_kernel");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Runs body(TypeTag<T>, TypeTag<P>) for the (T, P) pair of (dtype, param_dtype): P = T or float
// (param_dtype is validated by the caller). T = float gives one pair, so only (half, float) and
// (bfloat16, float) are added to the same-type instantiations.
template <typename Body>
fl_status dispatch_types(int32_t dtype, int32_t param_dtype, const char* name, Body&& body) {
  return FL_DISPATCH_DTYPE(dtype, name, [&]() -> fl_status {
    if (param_dtype == dtype) return body(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
    return body(TypeTag<scalar_t>{}, TypeTag<float>{});
  });
}

const bool kInfoRegistered = register_info(
    "layer_norm", "{\"max_cols\": 65536, \"dtypes\": [\"float32\", \"float16\", \"bfloat16\"], "
                  "\"param_dtypes\": [\"dtype\", \"float32\"]}");

}  // namespace
}  // namespace fl

extern "C" {

fl_status fl_layer_norm_fwd(const void* x, int64_t x_row_stride, const void* residual, int64_t residual_row_stride,
                            const void* weight, const void* bias, void* y, int64_t y_row_stride,
                            void* residual_out, int64_t residual_out_row_stride, float* mean, float* rstd,
                            int64_t rows, int64_t cols, float eps, int32_t rms, int32_t dtype,
                            int32_t param_dtype, void* stream) {
  using namespace fl;
  FL_REQUIRE(rows >= 0, "fl_layer_norm_fwd: rows must be >= 0, got %lld", (long long)rows);
  FL_REQUIRE(cols >= 1 && cols <= kMaxCols, "fl_layer_norm_fwd: cols must be in [1, %d], got %lld", kMaxCols,
             (long long)cols);
  FL_REQUIRE(rms == 0 || rms == 1, "fl_layer_norm_fwd: rms must be 0 or 1, got %d", (int)rms);
  FL_REQUIRE(eps >= 0.f && eps < INFINITY, "fl_layer_norm_fwd: eps must be finite and >= 0, got %g", (double)eps);
  FL_REQUIRE(dtype >= FL_F32 && dtype <= FL_BF16, "fl_layer_norm_fwd: dtype must be 0, 1 or 2, got %d", (int)dtype);
  FL_REQUIRE(param_dtype == dtype || param_dtype == FL_F32,
             "fl_layer_norm_fwd: param_dtype must be dtype (%d) or 0 (f32), got %d", (int)dtype, (int)param_dtype);
  if (rows == 0) return FL_OK;
  FL_REQUIRE(x != nullptr, "fl_layer_norm_fwd: x must not be NULL");
  FL_REQUIRE(y != nullptr, "fl_layer_norm_fwd: y must not be NULL");
  FL_REQUIRE(x_row_stride >= 0, "fl_layer_norm_fwd: x_row_stride must be >= 0, got %lld", (long long)x_row_stride);
  FL_REQUIRE(y_row_stride >= cols, "fl_layer_norm_fwd: y_row_stride must be >= cols (%lld), got %lld",
             (long long)cols, (long long)y_row_stride);
  if (residual) {
    FL_REQUIRE(residual_out != nullptr, "fl_layer_norm_fwd: residual_out must not be NULL when residual is given");
    FL_REQUIRE(residual_row_stride >= 0, "fl_layer_norm_fwd: residual_row_stride must be >= 0, got %lld",
               (long long)residual_row_stride);
    FL_REQUIRE(residual_out_row_stride >= cols,
               "fl_layer_norm_fwd: residual_out_row_stride must be >= cols (%lld), got %lld", (long long)cols,
               (long long)residual_out_row_stride);
  }
  FwdArgs a{x, x_row_stride, residual, residual ? residual_row_stride : 0, weight, bias, y, y_row_stride,
            residual ? residual_out : nullptr, residual ? residual_out_row_stride : 0,
            rms ? nullptr : mean, rstd, rows, static_cast<int>(cols), eps, rms != 0};
  const cudaStream_t st = as_stream(stream);
  return dispatch_types(dtype, param_dtype, "fl_layer_norm_fwd", [&](auto t, auto p) -> fl_status {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    constexpr int VW = 16 / sizeof(T);
    if (aligned16({a.x, a.residual, a.weight, a.bias, a.y, a.residual_out},
                  {a.x_stride, a.residual_stride, a.y_stride, a.residual_out_stride}, VW))
      return fwd_vw<T, P, VW>(a, st);
    return fwd_vw<T, P, 1>(a, st);
  });
}

fl_status fl_layer_norm_bwd_workspace_size(int64_t rows, int64_t cols, size_t* bytes) {
  using namespace fl;
  FL_REQUIRE(bytes != nullptr, "fl_layer_norm_bwd_workspace_size: bytes must not be NULL");
  FL_REQUIRE(rows >= 0, "fl_layer_norm_bwd_workspace_size: rows must be >= 0, got %lld", (long long)rows);
  FL_REQUIRE(cols >= 1 && cols <= kMaxCols, "fl_layer_norm_bwd_workspace_size: cols must be in [1, %d], got %lld",
             kMaxCols, (long long)cols);
  *bytes = bwd_workspace_bytes(rows, cols);
  return FL_OK;
}

fl_status fl_layer_norm_launch_dims(int64_t rows, int64_t cols, int32_t backward, int32_t vector_width,
                                    int64_t* dims, int32_t* count) {
  using namespace fl;
  FL_REQUIRE(dims != nullptr && count != nullptr, "fl_layer_norm_launch_dims: dims and count must not be NULL");
  FL_REQUIRE(rows >= 0, "fl_layer_norm_launch_dims: rows must be >= 0, got %lld", (long long)rows);
  FL_REQUIRE(cols >= 1 && cols <= kMaxCols, "fl_layer_norm_launch_dims: cols must be in [1, %d], got %lld",
             kMaxCols, (long long)cols);
  FL_REQUIRE(backward == 0 || backward == 1, "fl_layer_norm_launch_dims: backward must be 0 or 1, got %d",
             (int)backward);
  FL_REQUIRE(vector_width == 1 || vector_width == 4 || vector_width == 8,
             "fl_layer_norm_launch_dims: vector_width must be 1, 4 (f32) or 8 (f16/bf16), got %d", (int)vector_width);
  Launch l[kMaxBwdLaunches];
  int n = 0;
  if (rows > 0) {
    if (backward) {
      n = bwd_launches(rows, cols, vector_width, l);
    } else {
      l[0] = fwd_launch(rows, cols);
      n = 1;
    }
  }
  for (int i = 0; i < n; ++i) {
    const unsigned v[6] = {l[i].grid.x, l[i].grid.y, l[i].grid.z, l[i].block.x, l[i].block.y, l[i].block.z};
    for (int k = 0; k < 6; ++k) dims[6 * i + k] = v[k];
  }
  *count = n;
  return FL_OK;
}

fl_status fl_layer_norm_bwd(const void* dy, int64_t dy_row_stride, const void* s, int64_t s_row_stride,
                            const void* weight, const float* mean, const float* rstd, const void* dresidual_out,
                            int64_t dresidual_out_row_stride, void* ds, int64_t ds_row_stride, void* dweight,
                            void* dbias, void* workspace, size_t workspace_bytes, int64_t rows, int64_t cols,
                            int32_t rms, int32_t dtype, int32_t param_dtype, void* stream) {
  using namespace fl;
  FL_REQUIRE(rows >= 0, "fl_layer_norm_bwd: rows must be >= 0, got %lld", (long long)rows);
  FL_REQUIRE(cols >= 1 && cols <= kMaxCols, "fl_layer_norm_bwd: cols must be in [1, %d], got %lld", kMaxCols,
             (long long)cols);
  FL_REQUIRE(rms == 0 || rms == 1, "fl_layer_norm_bwd: rms must be 0 or 1, got %d", (int)rms);
  FL_REQUIRE(dtype >= FL_F32 && dtype <= FL_BF16, "fl_layer_norm_bwd: dtype must be 0, 1 or 2, got %d", (int)dtype);
  FL_REQUIRE(param_dtype == dtype || param_dtype == FL_F32,
             "fl_layer_norm_bwd: param_dtype must be dtype (%d) or 0 (f32), got %d", (int)dtype, (int)param_dtype);
  FL_REQUIRE(dweight == nullptr || weight != nullptr, "fl_layer_norm_bwd: dweight given but weight is NULL");
  const cudaStream_t st = as_stream(stream);
  const size_t elem = param_dtype == FL_F32 ? 4 : 2;
  if (rows == 0) {  // no rows: the parameter gradients are zero (all-zero bits in every dtype)
    if (dweight) FL_CUDA_CHECK(cudaMemsetAsync(dweight, 0, elem * cols, st));
    if (dbias) FL_CUDA_CHECK(cudaMemsetAsync(dbias, 0, elem * cols, st));
    return FL_OK;
  }
  FL_REQUIRE(dy != nullptr, "fl_layer_norm_bwd: dy must not be NULL");
  FL_REQUIRE(s != nullptr, "fl_layer_norm_bwd: s must not be NULL");
  FL_REQUIRE(ds != nullptr, "fl_layer_norm_bwd: ds must not be NULL");
  FL_REQUIRE(rstd != nullptr, "fl_layer_norm_bwd: rstd must not be NULL");
  FL_REQUIRE(rms || mean != nullptr, "fl_layer_norm_bwd: mean must not be NULL for LayerNorm (rms = 0)");
  FL_REQUIRE(dy_row_stride >= 0, "fl_layer_norm_bwd: dy_row_stride must be >= 0, got %lld", (long long)dy_row_stride);
  FL_REQUIRE(s_row_stride >= 0, "fl_layer_norm_bwd: s_row_stride must be >= 0, got %lld", (long long)s_row_stride);
  FL_REQUIRE(ds_row_stride >= cols, "fl_layer_norm_bwd: ds_row_stride must be >= cols (%lld), got %lld",
             (long long)cols, (long long)ds_row_stride);
  FL_REQUIRE(dresidual_out == nullptr || dresidual_out_row_stride >= 0,
             "fl_layer_norm_bwd: dresidual_out_row_stride must be >= 0, got %lld",
             (long long)dresidual_out_row_stride);
  const size_t need = bwd_workspace_bytes(rows, cols);
  FL_REQUIRE(workspace_bytes >= need, "fl_layer_norm_bwd: workspace_bytes must be >= %zu "
             "(fl_layer_norm_bwd_workspace_size), got %zu", need, workspace_bytes);
  FL_REQUIRE(workspace != nullptr, "fl_layer_norm_bwd: workspace must not be NULL (%zu bytes needed)", need);
  FL_REQUIRE(reinterpret_cast<uintptr_t>(workspace) % 16 == 0, "fl_layer_norm_bwd: workspace must be 16-byte aligned");

  const int64_t partials = bwd_partials(rows, cols);
  float* ws = static_cast<float*>(workspace);
  BwdArgs a{dy, dy_row_stride, s, s_row_stride, weight, rms ? nullptr : mean, rstd, dresidual_out,
            dresidual_out ? dresidual_out_row_stride : 0, ds, ds_row_stride,
            dweight ? ws : nullptr, dbias ? ws + partials * cols : nullptr,
            bwd_path(cols) == BwdPath::kCols ? ws + 2 * partials * cols : nullptr,
            rows, static_cast<int>(cols), rms != 0};
  return dispatch_types(dtype, param_dtype, "fl_layer_norm_bwd", [&](auto t, auto p) -> fl_status {
    using T = typename decltype(t)::type;
    using P = typename decltype(p)::type;
    constexpr int VW = 16 / sizeof(T);
    P* dw = static_cast<P*>(dweight);
    P* db = static_cast<P*>(dbias);
    if (aligned16({a.dy, a.s, a.weight, a.dres, a.ds}, {a.dy_stride, a.s_stride, a.dres_stride, a.ds_stride}, VW))
      return bwd_vw<T, P, VW>(a, dw, db, partials, st);
    return bwd_vw<T, P, 1>(a, dw, db, partials, st);
  });
}

}  // extern "C"
