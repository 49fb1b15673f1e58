// linear_wgmma.h -- host interface of the Hopper (sm_90a) forward GEMM of linear_wgmma.cu, called
// by fl_linear_fwd (linear.cu) only. The kernel computes exactly what the mma.sync forward of
// linear_gemm.cuh computes (same GemmParams, same epilogue), with TMA loads and wgmma.
#pragma once

#include <string>

#include "linear/linear_gemm.cuh"

namespace fl {
namespace linear {

// Why the sm_90a forward cannot run `p` (a kForward GemmParams) on the current device: "" when it
// can. Reasons: the build has no sm_90a code, the device is not compute capability 9.0, K == 0,
// or x / weight break TMA's rules (base 16-byte aligned, row stride a nonzero multiple of 16 bytes).
std::string wgmma_fwd_unsupported(const GemmParams& p);

// Launches the sm_90a forward on `stream` (the caller checked wgmma_fwd_unsupported(p) is "").
// FL_ERR_UNSUPPORTED when the driver lacks cuTensorMapEncodeTiled.
fl_status launch_wgmma_fwd(const GemmParams& p, int32_t activation, int32_t dtype, cudaStream_t stream,
                           const char* name);

}  // namespace linear
}  // namespace fl
