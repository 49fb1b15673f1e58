// library.cu -- the library-wide part of the C ABI: errors, version, build info, device check.
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "common.cuh"

#ifndef FL_VERSION
#define FL_VERSION "0.0.0"
#endif
#ifndef FL_ARCHS
#define FL_ARCHS ""  // set by the build, e.g. "80,90"
#endif

namespace fl {
namespace {
thread_local std::string g_last_error;
std::map<std::string, std::string>& info_registry() {
  static std::map<std::string, std::string> r;  // function-local: safe from static-init order
  return r;
}
std::mutex& info_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

fl_status set_error(fl_status code, const std::string& msg) {
  g_last_error = msg;
  return code;
}

bool register_info(const char* key, const char* json_value) {
  std::lock_guard<std::mutex> lock(info_mutex());
  info_registry()[key] = json_value;
  return true;
}
}  // namespace fl

extern "C" {

const char* fl_last_error(void) { return fl::g_last_error.c_str(); }

const char* fl_version(void) { return FL_VERSION; }

const char* fl_build_info(void) {
  static std::string info;
  static std::once_flag once;
  std::call_once(once, [] {
    std::lock_guard<std::mutex> lock(fl::info_mutex());
    std::ostringstream os;
    os << "{\"version\": \"" << FL_VERSION << "\", \"archs\": [" << FL_ARCHS << "]"
       << ", \"cuda_runtime\": " << CUDART_VERSION;
    for (const auto& kv : fl::info_registry()) os << ", \"" << kv.first << "\": " << kv.second;
    os << "}";
    info = os.str();
  });
  return info.c_str();
}

fl_status fl_check_device(int32_t device) {
  cudaDeviceProp prop;
  cudaError_t e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess)
    return fl::set_error(FL_ERR_CUDA, std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(e));
  const int cc = prop.major * 10 + prop.minor;
  // A cubin for sm_XY runs on devices of the same major with minor >= Y; the sm_90a cubin runs on
  // sm_90 only.  (PTX is not embedded: the build names its targets.)
  std::istringstream archs(FL_ARCHS);
  std::string tok;
  while (std::getline(archs, tok, ',')) {
    const int a = std::stoi(tok);
    if (a / 10 == prop.major && a % 10 <= prop.minor) return FL_OK;
  }
  return fl::set_error(FL_ERR_UNSUPPORTED, std::string("this build of libfastlayers_cuda targets sm_{") + FL_ARCHS +
                                               "}, the device is sm_" + std::to_string(cc) +
                                               " (rebuild with FASTLAYERS_CUDA_ARCHS)");
}

}  // extern "C"
