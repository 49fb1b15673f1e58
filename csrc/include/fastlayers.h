/* fastlayers.h -- the whole C ABI of libfastlayers_cuda.so.
 *
 * Guarantees, for every entry point:
 *  - extern "C", raw device pointers, sizes and strides as int64_t counted in ELEMENTS, a dtype
 *    code from fl_dtype, and the caller's stream (a cudaStream_t passed as void*).
 *  - it validates its arguments, launches on that stream only, checks every launch, never
 *    synchronises, never allocates: outputs and workspaces come from the caller (torch's caching
 *    allocator), sized by the matching fl_<op>_workspace_size call.
 *  - it returns FL_OK (0) or an error code; fl_last_error() then gives a message for this thread.
 *  - the library links the CUDA runtime statically and nothing of torch or Python, so one binary
 *    serves every torch and Python version.
 * Python reads this ABI through ONE signature table (pytorch_ext/_cuda.py); keep the two in step.
 */
#ifndef FASTLAYERS_H_
#define FASTLAYERS_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FL_API __attribute__((visibility("default")))

typedef int32_t fl_status;
enum {
  FL_OK = 0,
  FL_ERR_INVALID = 1,     /* an argument is out of range or inconsistent */
  FL_ERR_UNSUPPORTED = 2, /* a valid case this build does not implement (e.g. a head dim) */
  FL_ERR_CUDA = 3,        /* a CUDA runtime error (launch failure, no device, ...) */
};

/* Element types; the values are shared with Python (pytorch_ext/_cuda.py DTYPE_CODES). */
typedef enum fl_dtype { FL_F32 = 0, FL_F16 = 1, FL_BF16 = 2 } fl_dtype;

/* Epilogue activations for fl_linear_*; shared with Python (ACTIVATION_CODES). */
typedef enum fl_activation {
  FL_ACT_NONE = 0,
  FL_ACT_GELU = 1,      /* 0.5 x (1 + erf(x / sqrt 2)) */
  FL_ACT_GELU_TANH = 2, /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's gelu_new */
  FL_ACT_RELU = 3,
} fl_activation;

/* ---------------------------------------------------------------- library */
FL_API const char* fl_last_error(void); /* message of this thread's last failed call, or "" */
FL_API const char* fl_version(void);    /* "MAJOR.MINOR.PATCH" */
/* What this build supports, as a JSON object, e.g.
 * {"version": "0.1.0", "archs": [80, 90], "attention_head_dims": [32, 64, 96, 128], ...}.
 * Python parses it once; no C++ constant is ever re-stated in Python. */
FL_API const char* fl_build_info(void);
/* FL_OK when the current device can run this build's code (an arch of the build is <= its arch
 * and of the same major family); otherwise FL_ERR_UNSUPPORTED / FL_ERR_CUDA with a message. */
FL_API fl_status fl_check_device(int32_t device);

/* ---------------------------------------------------------------- layer norm
 * LayerNorm (rms = 0) or RMSNorm (rms = 1) over the last dimension of a (rows, cols) matrix whose
 * rows may be strided (inner stride 1), with an optional fused residual add:
 *   s = residual ? x + residual (rounded to dtype, written to residual_out) : x
 *   y = (s - mean) * rstd * weight + bias      (rms: y = s * rstd * weight, mean unused)
 * Statistics in fp32; mean/rstd (rows,) fp32 are written for the backward (mean NULL when rms).
 * weight/bias may be NULL (no affine / no bias).  All tensors share `dtype`. */
FL_API fl_status fl_layer_norm_fwd(const void* x, int64_t x_row_stride,
                                   const void* residual, int64_t residual_row_stride,
                                   const void* weight, const void* bias,
                                   void* y, int64_t y_row_stride,
                                   void* residual_out, int64_t residual_out_row_stride,
                                   float* mean, float* rstd,
                                   int64_t rows, int64_t cols, float eps, int32_t rms,
                                   int32_t dtype, void* stream);
/* Bytes of workspace fl_layer_norm_bwd needs (fp32 partial sums of dweight/dbias). */
FL_API fl_status fl_layer_norm_bwd_workspace_size(int64_t rows, int64_t cols, size_t* bytes);
/* Gradients.  s is the normalised input saved by the forward (x, or residual_out).
 * dresidual_out (may be NULL) is the incoming gradient of residual_out; it is added to ds.
 * ds is the gradient w.r.t. s, i.e. both dx and dresidual.  dweight/dbias may be NULL; they are
 * reduced deterministically (per-block fp32 partials, then a fixed-order sum). */
FL_API fl_status fl_layer_norm_bwd(const void* dy, int64_t dy_row_stride,
                                   const void* s, int64_t s_row_stride,
                                   const void* weight, const float* mean, const float* rstd,
                                   const void* dresidual_out, int64_t dresidual_out_row_stride,
                                   void* ds, int64_t ds_row_stride,
                                   void* dweight, void* dbias,
                                   void* workspace, size_t workspace_bytes,
                                   int64_t rows, int64_t cols, int32_t rms,
                                   int32_t dtype, void* stream);

/* ---------------------------------------------------------------- attention
 * (section owned by the attention work; declarations follow the conventions above) */

/* ---------------------------------------------------------------- linear
 * (section owned by the linear work; declarations follow the conventions above) */

#ifdef __cplusplus
}
#endif
#endif /* FASTLAYERS_H_ */
