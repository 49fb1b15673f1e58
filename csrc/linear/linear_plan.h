// linear_plan.h -- host-side launch plans of the linear GEMMs: which tile variant runs and with what
// grid. The entry points (linear.cu, linear_wgmma.cu) launch exactly what these return, and the C ABI
// query fl_linear_grid reports the same numbers to CPU tests, which check them against CUDA's grid
// limits on extreme shapes. Pure arithmetic: no device is touched.
#pragma once

#include <cstdint>

#include "fastlayers.h"

namespace fl {
namespace linear {

// CUDA's grid limit on axis x (the linear kernels use a 1-D grid: y = z = 1).
constexpr int64_t kMaxGridX = 2147483647;

struct MmaPlan {
  bool big;      // 128x128 tiles (BigTile), else 64x64 (SmallTile)
  int64_t grid;  // CTAs on axis x, one per output tile
};

// The mma.sync GEMM (linear_gemm.cuh) with an (M x N) output (GemmParams' M, N), on a device with
// num_sms SMs; aligned: the operands take the 16-byte cp.async path. FL_ERR_INVALID (message
// naming `name`) if the grid would exceed kMaxGridX.
fl_status plan_mma(int64_t M, int64_t N, bool aligned, int num_sms, MmaPlan* plan, const char* name);

// The sm_90a forward (linear_wgmma.cu) for x (M, K) @ W (N, K)^T, K >= 1: ping-pong 128x128 or
// cooperative 128x256 tiles, a persistent grid of min(tiles, num_sms) CTAs.
fl_status plan_wgmma_fwd(int64_t M, int64_t N, int64_t K, int num_sms, bool* pingpong, int64_t* grid,
                         const char* name);

}  // namespace linear
}  // namespace fl
