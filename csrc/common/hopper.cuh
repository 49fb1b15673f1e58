// hopper.cuh -- the Hopper (sm_90a) plumbing shared by the wgmma/TMA kernels
// (attention/attention_fwd_sm90.cu, linear/linear_wgmma.cu):
//  - host: cuTensorMapEncodeTiled reached through cudart's driver entry point (the library links
//    cudart statically and never links libcuda), and a cached "is this device exactly sm_90" check
//    (both defined in hopper.cu);
//  - device: inline-PTX wrappers of mbarrier, fences, TMA tile loads, wgmma group control and
//    setmaxnreg. They exist only when compiling for sm_90a (FL_HOPPER_DEVICE == 1); callers guard
//    their kernel bodies with the same condition.
// mbarriers and TMA destinations are 32-bit shared-memory addresses (cvta.to.shared), as the callers
// compute them.
#pragma once

#include <cstdint>

#include <cuda.h>  // CUtensorMap and its enums only: libcuda is not linked
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FL_HOPPER_DEVICE 1
#else
#define FL_HOPPER_DEVICE 0
#endif

namespace fl {
namespace hopper {

// ------------------------------------------------------------------ host (hopper.cu)
using EncodeTiledFn = PFN_cuTensorMapEncodeTiled_v12000;
// cuTensorMapEncodeTiled from the driver the runtime loaded; nullptr when the driver lacks it (a
// failed lookup is not cached and its runtime error is cleared).
EncodeTiledFn encode_tiled_fn();
// Compute capability (major * 10 + minor) of device `dev`, cached per device (dev < 64); -1 when
// the query fails (its runtime error is cleared).
int device_cc(int dev);
// Whether device `dev` is exactly compute capability 9.0 (what sm_90a code runs on).
inline bool device_is_sm90(int dev) { return device_cc(dev) == 90; }

// ------------------------------------------------------------------ device (sm_90a only)
#if FL_HOPPER_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes initialised mbarriers visible to the async proxy (TMA completes on them): call both, in
// this order, after the mbar_init calls and before the __syncthreads that publishes them.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Both waits return once the phase with the given parity has completed (a fresh barrier counts as
// having completed the phase of parity 1, so producers start by waiting on parity 1 of "empty").
// Two variants on purpose:
//  - mbar_wait: a plain try_wait spin (the attention kernel's);
//  - mbar_wait_or_trap: the same with a watchdog (the linear kernel's): every wait there lasts
//    microseconds, so one that outlasts kWaitTimeoutNs means a broken pipeline and the kernel traps
//    (a CUDA error the caller sees) rather than hanging the process.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
constexpr uint64_t kWaitTimeoutNs = 10ull * 1000 * 1000 * 1000;
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait_or_trap(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_ns();
  for (uint32_t n = 1;; ++n) {
    if (mbar_try_wait(bar, parity)) return;
    if ((n & 1023u) == 0 && global_ns() - t0 > kWaitTimeoutNs) asm volatile("trap;\n");
  }
}

__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Tiled TMA loads of `map` into shared memory at dst, completing their bytes on mbarrier `bar`
// (out-of-range elements are zero-filled and count too). c0 is the innermost coordinate.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Warpgroup register reallocation (producer gives registers up, consumers take them).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif  // FL_HOPPER_DEVICE

}  // namespace hopper
}  // namespace fl
