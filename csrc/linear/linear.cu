// linear.cu -- C ABI of the linear layer with a fused epilogue (fl_linear_fwd, fl_linear_bwd_dx,
// fl_linear_bwd_dw, and the launch-plan query fl_linear_grid): argument checks, the choice of tile
// config and aligned/unaligned variant (plan_mma: the one function that plans an mma.sync launch,
// used by the entry points and by fl_linear_grid alike), and compile-time dispatch on dtype and
// activation (written once, in run_gemm below).
// All three entry points run the one kernel of linear_gemm.cuh; see it for layouts and the
// fused epilogue / act' prologue. Never allocates, never synchronises, launches on `stream`.
#include <algorithm>
#include <atomic>
#include <climits>
#include <string>

#include "linear/linear_gemm.cuh"
#include "linear/linear_plan.h"
#include "linear/linear_wgmma.h"

namespace fl {
namespace linear {
namespace {

// Sizes are int inside the kernel (tile origins + tile size must not overflow).
constexpr int64_t kMaxDim = INT_MAX - 1024;
static_assert(kMaxDim == 2147482623LL, "keep \"max_dim\" of the build info below in step");

const bool kInfoRegistered = register_info(
    "linear",
    "{\"dtypes\": [\"float16\", \"bfloat16\"], \"activations\": [null, \"gelu\", \"gelu_tanh\", \"relu\"], "
    "\"min_arch\": 80, \"tiles\": [[128, 128, 32], [64, 64, 32]], \"max_dim\": 2147482623}");

int sm_count() {
  static std::atomic<int> cached[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 1;
  if (dev < 64) {
    int v = cached[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int n = 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) n = 1;
  if (dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// An operand can be moved in 16-byte chunks when its base is 16-byte aligned and every stored
// row starts 16-byte aligned (row stride a multiple of 8 elements; irrelevant with one row).
bool chunk_aligned(const void* p, int64_t ld, int64_t stored_rows) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (stored_rows <= 1 || ld % 8 == 0);
}
bool pair_aligned(const void* p, int64_t ld) {
  return p == nullptr || ((reinterpret_cast<uintptr_t>(p) % 4 == 0) && ld % 2 == 0);
}

}  // namespace

// The launch of an mma.sync GEMM with an (M x N) output (M, N as in GemmParams): 128x128 tiles when
// the operands are 16-byte aligned and those tiles alone fill every SM once, else 64x64 (4x the
// CTAs for small M or N, e.g. decode; unaligned operands always take the 64x64 element-wise-load
// variant); a 1-D grid of one CTA per tile (at least one tile column: row sums with N == 0). The
// grid's x axis takes up to 2^31 - 1 CTAs, i.e. outputs up to ~2^43 elements -- beyond any GPU's
// memory -- so FL_ERR_INVALID here is a guard, never a valid tensor's fate.
fl_status plan_mma(int64_t M, int64_t N, bool aligned, int num_sms, MmaPlan* plan, const char* name) {
  const int64_t big_tiles = ((M + 127) / 128) * ((N + 127) / 128);
  plan->big = aligned && big_tiles >= std::max(num_sms, 1);
  const int64_t bm = plan->big ? BigTile::BM : SmallTile::BM, bn = plan->big ? BigTile::BN : SmallTile::BN;
  const int64_t tiles = ((M + bm - 1) / bm) * std::max<int64_t>((N + bn - 1) / bn, 1);
  FL_REQUIRE(tiles <= kMaxGridX, "%s: %lld output tiles exceed the grid limit (%lld CTAs)", name,
             (long long)tiles, (long long)kMaxGridX);
  plan->grid = tiles;
  return FL_OK;
}

namespace {

template <typename T, class Cfg, int MODE, int ACT, bool AK, bool BKM, bool ALIGNED>
fl_status launch_one(const GemmParams& p, int64_t grid, cudaStream_t stream, const char* name) {
  using G = Gemm<T, Cfg, MODE, ACT, AK, BKM, ALIGNED>;
  auto kernel = linear_gemm_kernel<T, Cfg, MODE, ACT, AK, BKM, ALIGNED>;
  // The opt-in above 48 KiB of dynamic shared memory is per device; remember where it was set.
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  FL_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(G::SMEM_BYTES)));
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  // grid: plan_mma's, one CTA per tile (the kernel maps blockIdx.x to its tile).
  kernel<<<static_cast<unsigned>(grid), Cfg::THREADS, G::SMEM_BYTES, stream>>>(p);
  return check_launch(name);
}

template <typename T, int MODE, int ACT, bool AK, bool BKM>
fl_status launch_gemm(const GemmParams& p, bool aligned, cudaStream_t stream, const char* name) {
  MmaPlan plan;
  FL_RETURN_IF_ERROR(plan_mma(p.M, p.N, aligned, sm_count(), &plan, name));
  if (plan.big) return launch_one<T, BigTile, MODE, ACT, AK, BKM, true>(p, plan.grid, stream, name);
  if (aligned) return launch_one<T, SmallTile, MODE, ACT, AK, BKM, true>(p, plan.grid, stream, name);
  return launch_one<T, SmallTile, MODE, ACT, AK, BKM, false>(p, plan.grid, stream, name);
}

// Runtime (dtype, activation) -> template parameters, for all three entry points.
template <int MODE, bool AK, bool BKM>
fl_status run_gemm(const GemmParams& p, bool aligned, int32_t activation, int32_t dtype,
                   void* stream, const char* name) {
  return FL_DISPATCH_HALF(dtype, name, [&] {
    const cudaStream_t s = as_stream(stream);
    switch (activation) {
      case FL_ACT_NONE: return launch_gemm<scalar_t, MODE, FL_ACT_NONE, AK, BKM>(p, aligned, s, name);
      case FL_ACT_GELU: return launch_gemm<scalar_t, MODE, FL_ACT_GELU, AK, BKM>(p, aligned, s, name);
      case FL_ACT_GELU_TANH: return launch_gemm<scalar_t, MODE, FL_ACT_GELU_TANH, AK, BKM>(p, aligned, s, name);
      case FL_ACT_RELU: return launch_gemm<scalar_t, MODE, FL_ACT_RELU, AK, BKM>(p, aligned, s, name);
      default:
        return set_error(FL_ERR_INVALID, std::string(name) +
                                             ": activation must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (relu), got " +
                                             std::to_string(activation));
    }
  });
}

}  // namespace
}  // namespace linear
}  // namespace fl

using fl::linear::chunk_aligned;
using fl::linear::GemmParams;
using fl::linear::kMaxDim;
using fl::linear::pair_aligned;

#define FL_LINEAR_CHECK_SIZES(fn)                                                                   \
  FL_REQUIRE(M >= 0 && M <= kMaxDim, fn ": M must be in [0, %lld], got %lld", (long long)kMaxDim, (long long)M); \
  FL_REQUIRE(N >= 0 && N <= kMaxDim, fn ": N must be in [0, %lld], got %lld", (long long)kMaxDim, (long long)N); \
  FL_REQUIRE(K >= 0 && K <= kMaxDim, fn ": K must be in [0, %lld], got %lld", (long long)kMaxDim, (long long)K); \
  FL_REQUIRE(activation >= FL_ACT_NONE && activation <= FL_ACT_RELU,                               \
             fn ": activation must be 0..3, got %d", (int)activation)

#define FL_LINEAR_CHECK_STRIDE(fn, name, ld, rows, cols)                                            \
  FL_REQUIRE((rows) <= 1 || (ld) >= (cols), fn ": " name " must be >= %lld (the row length), got %lld", \
             (long long)(cols), (long long)(ld))
// Read-only operands may also broadcast one row (row stride 0, e.g. torch's expand of a gradient).
#define FL_LINEAR_CHECK_IN_STRIDE(fn, name, ld, rows, cols)                                         \
  FL_REQUIRE((rows) <= 1 || (ld) == 0 || (ld) >= (cols),                                             \
             fn ": " name " must be 0 (broadcast row) or >= %lld (the row length), got %lld",       \
             (long long)(cols), (long long)(ld))

extern "C" {

FL_API fl_status fl_linear_fwd(const void* x, int64_t x_row_stride, const void* weight,
                               int64_t weight_row_stride, const void* bias, const void* residual,
                               int64_t residual_row_stride, void* y, int64_t y_row_stride, void* preact,
                               int64_t preact_row_stride, int64_t M, int64_t N, int64_t K,
                               int32_t activation, int32_t impl, int32_t dtype, void* stream) {
  const char* fn = "fl_linear_fwd";
  FL_LINEAR_CHECK_SIZES("fl_linear_fwd");
  FL_REQUIRE(impl >= FL_LINEAR_IMPL_AUTO && impl <= FL_LINEAR_IMPL_WGMMA,
             "fl_linear_fwd: impl must be 0 (auto), 1 (mma) or 2 (wgmma), got %d", (int)impl);
  if (M == 0 || N == 0) return FL_OK;
  FL_REQUIRE(K == 0 || (x && weight), "fl_linear_fwd: x and weight must be non-null when K > 0");
  FL_REQUIRE(y != nullptr, "fl_linear_fwd: y must be non-null");
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_fwd", "x_row_stride", x_row_stride, M, K);
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_fwd", "weight_row_stride", weight_row_stride, N, K);
  FL_LINEAR_CHECK_STRIDE("fl_linear_fwd", "y_row_stride", y_row_stride, M, N);
  if (residual) FL_LINEAR_CHECK_IN_STRIDE("fl_linear_fwd", "residual_row_stride", residual_row_stride, M, N);
  if (preact) FL_LINEAR_CHECK_STRIDE("fl_linear_fwd", "preact_row_stride", preact_row_stride, M, N);

  GemmParams p{};
  p.a = x; p.lda = x_row_stride;
  p.b = weight; p.ldb = weight_row_stride;
  p.c = y; p.ldc = y_row_stride;
  p.bias = bias;
  p.residual = residual; p.ldr = residual_row_stride;
  p.preact_out = preact; p.ldp = preact_row_stride;
  p.M = int(M); p.N = int(N); p.K = int(K);
  p.pair_ok = pair_aligned(y, y_row_stride) && pair_aligned(residual, residual_row_stride) &&
              pair_aligned(preact, preact_row_stride);
  if (impl != FL_LINEAR_IMPL_MMA) {
    // sm_90a wgmma/TMA kernel (linear_wgmma.cu): auto takes it when it can run the case and M >= 64
    // (below that, the mma.sync kernel's 64x64 tiles spread the work better); an explicit request
    // that cannot run is an error, never a silent switch.
    const std::string why = fl::linear::wgmma_fwd_unsupported(p);
    if (why.empty() && (impl == FL_LINEAR_IMPL_WGMMA || M >= 64))
      return fl::linear::launch_wgmma_fwd(p, activation, dtype, fl::as_stream(stream), fn);
    if (impl == FL_LINEAR_IMPL_WGMMA)
      return fl::set_error(FL_ERR_UNSUPPORTED, std::string(fn) + ": impl 2 (wgmma) cannot run here: " + why);
  }
  const bool aligned = chunk_aligned(x, x_row_stride, M) && chunk_aligned(weight, weight_row_stride, N);
  return fl::linear::run_gemm<fl::linear::kForward, true, true>(p, aligned, activation, dtype, stream, fn);
}

FL_API fl_status fl_linear_bwd_dx(const void* dy, int64_t dy_row_stride, const void* preact,
                                  int64_t preact_row_stride, const void* weight, int64_t weight_row_stride,
                                  void* dx, int64_t dx_row_stride, int64_t M, int64_t N, int64_t K,
                                  int32_t activation, int32_t dtype, void* stream) {
  const char* fn = "fl_linear_bwd_dx";
  FL_LINEAR_CHECK_SIZES("fl_linear_bwd_dx");
  if (M == 0 || K == 0) return FL_OK;
  FL_REQUIRE(dx != nullptr, "fl_linear_bwd_dx: dx must be non-null");
  FL_REQUIRE(N == 0 || (dy && weight), "fl_linear_bwd_dx: dy and weight must be non-null when N > 0");
  FL_REQUIRE(activation == FL_ACT_NONE || N == 0 || preact != nullptr,
             "fl_linear_bwd_dx: preact must be non-null with activation %d", (int)activation);
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dx", "dy_row_stride", dy_row_stride, M, N);
  if (activation != FL_ACT_NONE)
    FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dx", "preact_row_stride", preact_row_stride, M, N);
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dx", "weight_row_stride", weight_row_stride, N, K);
  FL_LINEAR_CHECK_STRIDE("fl_linear_bwd_dx", "dx_row_stride", dx_row_stride, M, K);

  // dx (M, K) = dz (M, N) @ W (N, K): GEMM (M, K, reduction N); A = dz K-major, B = W MN-major.
  GemmParams p{};
  p.a = dy; p.lda = dy_row_stride;
  p.a_pre = activation != FL_ACT_NONE ? preact : nullptr; p.lda_pre = preact_row_stride;
  p.b = weight; p.ldb = weight_row_stride;
  p.c = dx; p.ldc = dx_row_stride;
  p.M = int(M); p.N = int(K); p.K = int(N);
  p.pair_ok = pair_aligned(dx, dx_row_stride);
  const bool aligned = chunk_aligned(dy, dy_row_stride, M) &&
                       (p.a_pre == nullptr || chunk_aligned(preact, preact_row_stride, M)) &&
                       chunk_aligned(weight, weight_row_stride, N);
  return fl::linear::run_gemm<fl::linear::kGradient, true, false>(p, aligned, activation, dtype, stream, fn);
}

FL_API fl_status fl_linear_bwd_dw(const void* dy, int64_t dy_row_stride, const void* preact,
                                  int64_t preact_row_stride, const void* x, int64_t x_row_stride,
                                  void* dweight, int64_t dweight_row_stride, void* dbias, int64_t M,
                                  int64_t N, int64_t K, int32_t activation, int32_t dtype, void* stream) {
  const char* fn = "fl_linear_bwd_dw";
  FL_LINEAR_CHECK_SIZES("fl_linear_bwd_dw");
  if (N == 0) return FL_OK;
  // With K == 0, dweight (N, 0) and x (M, 0) are empty (torch gives them null data pointers).
  FL_REQUIRE(K == 0 || dweight != nullptr, "fl_linear_bwd_dw: dweight must be non-null when K > 0");
  FL_REQUIRE(M == 0 || (dy && (K == 0 || x)), "fl_linear_bwd_dw: dy and x must be non-null when M > 0");
  FL_REQUIRE(activation == FL_ACT_NONE || M == 0 || preact != nullptr,
             "fl_linear_bwd_dw: preact must be non-null with activation %d", (int)activation);
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dw", "dy_row_stride", dy_row_stride, M, N);
  if (activation != FL_ACT_NONE)
    FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dw", "preact_row_stride", preact_row_stride, M, N);
  FL_LINEAR_CHECK_IN_STRIDE("fl_linear_bwd_dw", "x_row_stride", x_row_stride, M, K);
  FL_LINEAR_CHECK_STRIDE("fl_linear_bwd_dw", "dweight_row_stride", dweight_row_stride, N, K);
  if (K == 0 && dbias == nullptr) return FL_OK;
  // With K == 0 the GEMM still runs (N x 0 output, no stores) so dbias gets its row sums.

  // dW (N, K) = dz^T (N, M) @ x (M, K): GEMM (N, K, reduction M); A(n, m) = dz[m][n] (MN-major),
  // B(k, m) = x[m][k] (MN-major). dbias (N,) = row sums of A, written by the same kernel.
  GemmParams p{};
  p.a = dy; p.lda = dy_row_stride;
  p.a_pre = activation != FL_ACT_NONE ? preact : nullptr; p.lda_pre = preact_row_stride;
  p.b = x; p.ldb = x_row_stride;
  p.c = dweight; p.ldc = dweight_row_stride;
  p.row_sum = dbias;
  p.M = int(N); p.N = int(K); p.K = int(M);
  p.pair_ok = pair_aligned(dweight, dweight_row_stride);
  const bool aligned = chunk_aligned(dy, dy_row_stride, M) &&
                       (p.a_pre == nullptr || chunk_aligned(preact, preact_row_stride, M)) &&
                       chunk_aligned(x, x_row_stride, M);
  return fl::linear::run_gemm<fl::linear::kGradient, false, false>(p, aligned, activation, dtype, stream, fn);
}

FL_API fl_status fl_linear_grid(int32_t kernel, int64_t M, int64_t N, int64_t K, int32_t aligned,
                                int32_t num_sms, int64_t* grid) {
  const int32_t activation = FL_ACT_NONE;  // the plan does not depend on it
  FL_LINEAR_CHECK_SIZES("fl_linear_grid");
  FL_REQUIRE(grid != nullptr, "fl_linear_grid: grid must be non-null (int64_t[3])");
  FL_REQUIRE(num_sms >= 1, "fl_linear_grid: num_sms must be >= 1, got %d", (int)num_sms);
  grid[0] = grid[1] = grid[2] = 0;
  // The (rows x cols) output each entry point hands to its GEMM, and when it launches nothing.
  int64_t rows = 0, cols = 0;
  bool empty = false;
  switch (kernel) {
    case FL_LINEAR_KERNEL_FWD:
    case FL_LINEAR_KERNEL_FWD_WGMMA: rows = M; cols = N; empty = M == 0 || N == 0; break;
    case FL_LINEAR_KERNEL_BWD_DX: rows = M; cols = K; empty = M == 0 || K == 0; break;  // N == 0: zeros
    case FL_LINEAR_KERNEL_BWD_DW: rows = N; cols = K; empty = N == 0; break;  // K == 0: dbias row sums
    default:
      return fl::set_error(FL_ERR_INVALID, "fl_linear_grid: kernel must be 0 (fwd), 1 (bwd_dx), 2 (bwd_dw) or "
                                           "3 (fwd_wgmma), got " + std::to_string(kernel));
  }
  if (empty) return FL_OK;
  int64_t gx = 0;
  if (kernel == FL_LINEAR_KERNEL_FWD_WGMMA) {
    FL_REQUIRE(K >= 1, "fl_linear_grid: the wgmma forward needs K >= 1, got %lld", (long long)K);
    bool pingpong = false;
    FL_RETURN_IF_ERROR(fl::linear::plan_wgmma_fwd(rows, cols, K, num_sms, &pingpong, &gx, "fl_linear_grid"));
  } else {
    fl::linear::MmaPlan plan;
    FL_RETURN_IF_ERROR(fl::linear::plan_mma(rows, cols, aligned != 0, num_sms, &plan, "fl_linear_grid"));
    gx = plan.grid;
  }
  grid[0] = gx;
  grid[1] = grid[2] = 1;
  return FL_OK;
}

}  // extern "C"
