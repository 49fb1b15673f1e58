// hopper.cu -- host helpers of hopper.cuh for the sm_90a kernels: the driver's
// cuTensorMapEncodeTiled through cudart's entry point (libcuda is never linked) and a per-device
// cached compute capability. Thread-safe (lock-free caches); no GPU is touched until called.
#include "common/hopper.cuh"

#include <atomic>

namespace fl {
namespace hopper {

EncodeTiledFn encode_tiled_fn() {
  static std::atomic<EncodeTiledFn> cached{nullptr};
  EncodeTiledFn fn = cached.load(std::memory_order_acquire);
  if (fn) return fn;
  void* sym = nullptr;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &sym, 12000, cudaEnableDefault, &q);
#else
  const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &sym, cudaEnableDefault, &q);
#endif
  if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || sym == nullptr) {
    cudaGetLastError();  // the failed lookup must not surface as a later launch's error
    return nullptr;
  }
  fn = reinterpret_cast<EncodeTiledFn>(sym);
  cached.store(fn, std::memory_order_release);
  return fn;
}

int device_cc(int dev) {
  static std::atomic<int> cached[64];
  if (dev < 0) return -1;
  if (dev < 64) {
    const int v = cached[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  const int cc = major * 10 + minor;
  if (dev < 64) cached[dev].store(cc, std::memory_order_relaxed);
  return cc;
}

}  // namespace hopper
}  // namespace fl
