// common.cuh -- what every kernel file of fastlayers shares: error reporting for the C ABI,
// launch checks, compile-time dtype dispatch, fp32 load/store of fp16/bf16, warp/block sums.
// Invariants: entry points return fl_status and never throw across the C boundary; kernels
// launch on the caller's stream; nothing here allocates device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "fastlayers.h"

namespace fl {

// Records `msg` as this thread's last error and returns `code` (see fl_last_error()).
fl_status set_error(fl_status code, const std::string& msg);
// Registers one key of fl_build_info()'s JSON object (value is raw JSON). Call from a static
// initialiser in the op's .cu file so the library's info is assembled from the ops it holds.
bool register_info(const char* key, const char* json_value);

inline cudaStream_t as_stream(void* s) { return reinterpret_cast<cudaStream_t>(s); }

// Call right after a launch: turns a launch error into FL_ERR_CUDA with the kernel's name.
inline fl_status check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return set_error(FL_ERR_CUDA, std::string(what) + ": " + cudaGetErrorString(e));
  return FL_OK;
}

}  // namespace fl

// Argument checks at the C boundary: name the argument, the expectation and the value.
#define FL_REQUIRE(cond, ...)                                          \
  do {                                                                 \
    if (!(cond)) {                                                     \
      char fl_msg_[512];                                               \
      snprintf(fl_msg_, sizeof(fl_msg_), __VA_ARGS__);                 \
      return ::fl::set_error(FL_ERR_INVALID, fl_msg_);                 \
    }                                                                  \
  } while (0)

#define FL_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t fl_e_ = (expr);                                                          \
    if (fl_e_ != cudaSuccess)                                                            \
      return ::fl::set_error(FL_ERR_CUDA, std::string(#expr) + ": " + cudaGetErrorString(fl_e_)); \
  } while (0)

#define FL_RETURN_IF_ERROR(expr)        \
  do {                                  \
    fl_status fl_s_ = (expr);           \
    if (fl_s_ != FL_OK) return fl_s_;   \
  } while (0)

// Compile-time dtype dispatch, written once: runs the body with `scalar_t` bound to the element
// type of `code` (float, __half, __nv_bfloat16); an unknown code returns FL_ERR_INVALID.
#define FL_DISPATCH_DTYPE(code, name, ...)                                            \
  [&]() -> fl_status {                                                                \
    switch (code) {                                                                   \
      case FL_F32: { using scalar_t = float; return __VA_ARGS__(); }                  \
      case FL_F16: { using scalar_t = __half; return __VA_ARGS__(); }                 \
      case FL_BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }         \
      default:                                                                        \
        return ::fl::set_error(FL_ERR_INVALID, std::string(name) +                    \
                                               ": dtype code must be 0 (f32), 1 (f16) or 2 (bf16), got " + \
                                               std::to_string(code));                 \
    }                                                                                 \
  }()

// Same, for the half types only (tensor-core kernels).
#define FL_DISPATCH_HALF(code, name, ...)                                             \
  [&]() -> fl_status {                                                                \
    switch (code) {                                                                   \
      case FL_F16: { using scalar_t = __half; return __VA_ARGS__(); }                 \
      case FL_BF16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }         \
      default:                                                                        \
        return ::fl::set_error(FL_ERR_UNSUPPORTED, std::string(name) +                \
                                               ": this kernel takes fp16 or bf16 (dtype 1 or 2), got " + \
                                               std::to_string(code));                 \
    }                                                                                 \
  }()

namespace fl {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; `scratch` holds >= 32 floats of shared memory. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace fl
