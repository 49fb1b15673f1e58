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
 * rows may be strided (inner stride 1, row stride >= 0), with an optional fused residual add:
 *   s = residual ? x + residual (rounded to dtype, written to residual_out) : x
 *   y = (s - mean) * rstd * weight + bias      (rms: y = s * rstd * weight, mean unused)
 * Statistics in fp32; mean/rstd (rows,) fp32 are written for the backward (mean NULL when rms).
 * weight/bias (cols,) contiguous, may be NULL (no affine / no bias).  x, residual, y, residual_out
 * (and dy, ds, dresidual_out) have `dtype`; weight, bias (and dweight, dbias) have `param_dtype`,
 * which is `dtype` or FL_F32 (fp16/bf16 activations with fp32 parameters). */
FL_API fl_status fl_layer_norm_fwd(const void* x, int64_t x_row_stride,
                                   const void* residual, int64_t residual_row_stride,
                                   const void* weight, const void* bias,
                                   void* y, int64_t y_row_stride,
                                   void* residual_out, int64_t residual_out_row_stride,
                                   float* mean, float* rstd,
                                   int64_t rows, int64_t cols, float eps, int32_t rms,
                                   int32_t dtype, int32_t param_dtype, void* stream);
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
                                   int32_t dtype, int32_t param_dtype, void* stream);
/* The launches fl_layer_norm_fwd (backward = 0) or fl_layer_norm_bwd (backward = 1, dweight or
 * dbias wanted) makes for (rows, cols) at vector width vector_width (16 / element size when every
 * pointer is 16-byte aligned and every row stride a multiple of it, else 1): *count (<= 3; 0 when
 * rows == 0) rows of {grid.x, grid.y, grid.z, block.x, block.y, block.z} written to dims (room for
 * 18). The entry points launch exactly these, so tests check grid limits without a GPU. */
FL_API fl_status fl_layer_norm_launch_dims(int64_t rows, int64_t cols, int32_t backward,
                                           int32_t vector_width, int64_t* dims, int32_t* count);

/* ---------------------------------------------------------------- attention
 * Scaled dot-product attention, FlashAttention-2 style, fp16 / bf16 (dtype 1 / 2), head dims as
 * published in fl_build_info()["attention_head_dims"].
 * q, o (B, Lq, H, D); k, v (B, Lk, H, D): each with (b, l, h) strides in elements (multiples of
 * 8) and a contiguous, 16-byte aligned head dim.  lse (B, H, Lq) fp32 contiguous: natural log of
 * sum_j exp(scale q.k_j) over attended keys; +inf (and o = 0) for a row that attends no key.
 * key_padding_mask (B, Lk) uint8 / bool with (b, l) strides, nonzero = attend, NULL = none.  A
 * masked key never affects o, lse or any gradient, whatever its k / v rows hold (NaN, inf): its
 * rows are zero-filled on load, never read; its dk, dv are 0.  (Causally hidden keys are real
 * tokens: no such guarantee.)
 * causal != 0: bottom-right aligned, query i attends key j iff j <= i + Lk - Lq.
 * Dropout (0 <= dropout_p < 1) on the normalised probabilities, kept values scaled by 1/(1-p),
 * keep iff ((philox4x32-10(key (seed_lo, seed_hi), counter (c_lo, c_hi, 0, 0)).x >> 8) * 2^-24
 * >= dropout_p with c = offset + ((b*H + h)*Lq + i)*Lk + j (the mask of every fastlayers backend).
 * rng_state: DEVICE pointer to int64 [seed, offset] (seed in [0, 2^62)), read by the kernels when
 * they run -- so a captured CUDA graph replayed after the state was redrawn in place draws a fresh
 * mask; may be NULL when dropout_p == 0.
 * Any B, H, Lq, Lk below 2^31 launches (B*H up to 65535^2): fl_attention_grid gives each kernel's grid.
 * impl picks the kernel (stateless; the Python launcher reads FASTLAYERS_CUDA_ATTENTION):
 * FL_ATTENTION_IMPL_AUTO = the sm_90a wgmma/TMA kernel when the build has it, the device is
 * sm_90, D is 64 or 128, dropout_p == 0, no key_padding_mask and the tensors suit TMA, else the
 * mma.sync kernel;
 * _MMA = always the mma.sync kernel; _WGMMA = the wgmma kernel or FL_ERR_UNSUPPORTED with the
 * reason.  fl_build_info()["attention_fwd_impls"] lists the kernels this build has. */
enum { FL_ATTENTION_IMPL_AUTO = 0, FL_ATTENTION_IMPL_MMA = 1, FL_ATTENTION_IMPL_WGMMA = 2 };
FL_API fl_status fl_attention_fwd(const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                  const void* k, int64_t k_b, int64_t k_l, int64_t k_h,
                                  const void* v, int64_t v_b, int64_t v_l, int64_t v_h,
                                  void* o, int64_t o_b, int64_t o_l, int64_t o_h, float* lse,
                                  const uint8_t* key_padding_mask, int64_t kpm_b, int64_t kpm_l,
                                  int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                  float softmax_scale, int32_t causal, float dropout_p,
                                  const int64_t* rng_state, int32_t impl, int32_t dtype,
                                  void* stream);
/* Bytes of workspace fl_attention_bwd needs (delta, and the fp32 dq accumulator when
 * deterministic == 0); the workspace must be 256-byte aligned. */
FL_API fl_status fl_attention_bwd_workspace_size(int64_t B, int64_t Lq, int64_t H, int64_t D,
                                                 int32_t deterministic, size_t* bytes);
/* Gradients from dout and the forward's o and lse (same arguments as the forward).  dq, dk, dv
 * take the layouts of q, k, v.  deterministic != 0: no atomics, bitwise reproducible. */
FL_API fl_status fl_attention_bwd(const void* dout, int64_t do_b, int64_t do_l, int64_t do_h,
                                  const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                  const void* k, int64_t k_b, int64_t k_l, int64_t k_h,
                                  const void* v, int64_t v_b, int64_t v_l, int64_t v_h,
                                  const void* o, int64_t o_b, int64_t o_l, int64_t o_h,
                                  const float* lse,
                                  const uint8_t* key_padding_mask, int64_t kpm_b, int64_t kpm_l,
                                  void* dq, int64_t dq_b, int64_t dq_l, int64_t dq_h,
                                  void* dk, int64_t dk_b, int64_t dk_l, int64_t dk_h,
                                  void* dv, int64_t dv_b, int64_t dv_l, int64_t dv_h,
                                  void* workspace, size_t workspace_bytes,
                                  int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                  float softmax_scale, int32_t causal, float dropout_p,
                                  const int64_t* rng_state, int32_t deterministic,
                                  int32_t dtype, void* stream);
/* Bytes of fp32 workspace fl_attention_kvcache_fwd needs (split-KV partials; 0 when one split
 * suffices).  Depends on the current device's SM count; ask with the same device current.  With a
 * block_table, Lmax is the logical max_num_blocks * page_block_size (as fl_attention_kvcache_fwd's). */
FL_API fl_status fl_attention_kvcache_workspace_size(int64_t B, int64_t Lq, int64_t H, int64_t D,
                                                     int64_t Lmax, size_t* bytes);
/* Decode step: k_cache, v_cache (B, Lmax, H, D) are written in place at rows
 * cache_seqlens[b] .. cache_seqlens[b] + Lq - 1 from k_new, v_new (B, Lq, H, D) when those are
 * given (both or neither); q then attends slots cache_leftpad[b] .. cache_seqlens[b] (+ Lq with
 * new keys) - 1, bottom-right causal on the absolute slots when causal != 0 (query i attends slot j
 * iff j <= i + length - Lq).  cache_seqlens (B,) int32 contiguous stays on the device (no host
 * sync; the launch sequence depends on host sizes only, so it is CUDA-graph capturable).
 * cache_leftpad (B,) int32 contiguous, or NULL (= all 0): the left padding of each row, as
 * flash-attn's; a query with no slot to attend gets a zero row.  Slots before a row's
 * cache_leftpad and at / past its length are never read (NaN / inf there cannot leak in).  A row
 * whose lengths are bad -- cache_seqlens[b] < 0, cache_seqlens[b] + (Lq with new keys, else 0) >
 * Lmax, cache_leftpad[b] < 0 or cache_leftpad[b] > cache_seqlens[b] + (Lq with new keys) -- gets
 * nothing written to its caches and NaN output rows (loud and memory-safe).
 * Paged caches (flash-attn's block_table): block_table (B, max_num_blocks) int32 contiguous, or
 * NULL (then max_num_blocks, num_blocks and page_block_size are ignored: pass 0).  Given, k_cache
 * and v_cache are (num_blocks, page_block_size, H, D) pages -- kc_b / vc_b the page stride, kc_l /
 * vc_l the row stride inside a page -- and row b's LOGICAL slot j is page block_table[b, j /
 * page_block_size], row j % page_block_size (page_block_size >= 1, any value); Lmax is the logical
 * max_num_blocks * page_block_size (required), and every rule above counts logical slots.  Only
 * the entries covering the slots a row attends or writes ([min(cache_leftpad[b], cache_seqlens[b])
 * with new keys, else cache_leftpad[b], .. cache_seqlens[b] + new rows)) are read.  A row with one
 * of them out of [0, num_blocks) reads no page and gets NaN output rows (as a bad length); each of
 * its new rows is still written when its own page id is in range (one out of range is never
 * dereferenced).  Rows may share pages for reading (beams with a common prefix); two
 * rows writing the same physical slot in one call is undefined.
 * fl_build_info()["attention_kvcache_leftpad"] is true in builds whose entry point takes
 * cache_leftpad, and fl_build_info()["attention_kvcache_paged"] in builds that also take
 * block_table .. page_block_size (the Python bridge refuses older builds rather than shift the
 * arguments). */
FL_API fl_status fl_attention_kvcache_fwd(const void* q, int64_t q_b, int64_t q_l, int64_t q_h,
                                          void* k_cache, int64_t kc_b, int64_t kc_l, int64_t kc_h,
                                          void* v_cache, int64_t vc_b, int64_t vc_l, int64_t vc_h,
                                          const int32_t* cache_seqlens, const int32_t* cache_leftpad,
                                          const int32_t* block_table, int64_t max_num_blocks,
                                          int64_t num_blocks, int64_t page_block_size,
                                          const void* k_new, int64_t kn_b, int64_t kn_l, int64_t kn_h,
                                          const void* v_new, int64_t vn_b, int64_t vn_l, int64_t vn_h,
                                          void* o, int64_t o_b, int64_t o_l, int64_t o_h,
                                          void* workspace, size_t workspace_bytes,
                                          int64_t B, int64_t Lq, int64_t Lmax, int64_t H, int64_t D,
                                          float softmax_scale, int32_t causal, int32_t dtype,
                                          void* stream);

/* Launch grid of each attention kernel, as the entry points above compute it (so a CPU test can
 * check every axis against the CUDA limits -- x <= 2^31 - 1, y, z <= 65535 -- at extreme sizes):
 * grid[0..2] = (x, y, z).  num_splits: the kv-cache split count (>= 1; 1 elsewhere).  Returns
 * FL_ERR_INVALID when a size is out of range or an axis would exceed its limit. */
enum {
  FL_ATTENTION_KERNEL_FWD = 0,             /* forward, and the kv-cache split pass */
  FL_ATTENTION_KERNEL_FWD_SM90 = 1,        /* sm_90a wgmma/TMA forward */
  FL_ATTENTION_KERNEL_BWD_PREPROCESS = 2,  /* delta = rowsum(dO * O) */
  FL_ATTENTION_KERNEL_BWD_DKDV = 3,
  FL_ATTENTION_KERNEL_BWD_DQ = 4,          /* deterministic dq */
  FL_ATTENTION_KERNEL_BWD_DQ_CONVERT = 5,  /* atomic-mode dq: fp32 accumulator -> dtype */
  FL_ATTENTION_KERNEL_KVCACHE_APPEND = 6,
  FL_ATTENTION_KERNEL_KVCACHE_COMBINE = 7,
};
FL_API fl_status fl_attention_grid(int32_t kernel, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t D,
                                   int64_t num_splits, int64_t* grid);

/* ---------------------------------------------------------------- linear
 * y = act(x @ weight^T + bias) + residual on tensor cores (fp16/bf16 only, fp32 accumulation,
 * sm_80+), and its gradients. Shapes: x (M, K), weight (N, K) as nn.Linear stores it, y (M, N);
 * every matrix is row-major with unit inner stride and the given row stride (in elements); all
 * tensors share `dtype` (FL_F16 or FL_BF16; FL_F32 gives FL_ERR_UNSUPPORTED). `activation` is an
 * fl_activation. Any M, N, K >= 0 (tails are predicated); 16-byte aligned pointers and row strides
 * that are multiples of 8 take the fast cp.async path, anything else a slower element-wise-load
 * variant. Deterministic: no atomics, fixed summation order. */
/* impl picks the forward kernel (stateless; the Python launcher reads FASTLAYERS_CUDA_GEMM):
 * FL_LINEAR_IMPL_AUTO = the sm_90a wgmma/TMA kernel when the build has it, the device is sm_90,
 * M >= 64, K >= 1 and x / weight suit TMA (16-byte aligned, row strides multiples of 8), else the
 * mma.sync kernel; _MMA = always the mma.sync kernel; _WGMMA = the wgmma kernel (any M) or
 * FL_ERR_UNSUPPORTED with the reason. Both agree up to fp32 summation order; the backward always
 * runs mma.sync. fl_build_info()["linear_fwd_impls"] lists the kernels this build has. */
enum { FL_LINEAR_IMPL_AUTO = 0, FL_LINEAR_IMPL_MMA = 1, FL_LINEAR_IMPL_WGMMA = 2 };
/* bias (N,) / residual (M, N) may be NULL. preact (M, N), may be NULL: receives z = x @ W^T + bias
 * (rounded to dtype), the input of act' in the backward. y = act(z) + residual (z kept in fp32). */
FL_API fl_status fl_linear_fwd(const void* x, int64_t x_row_stride,
                               const void* weight, int64_t weight_row_stride,
                               const void* bias,
                               const void* residual, int64_t residual_row_stride,
                               void* y, int64_t y_row_stride,
                               void* preact, int64_t preact_row_stride,
                               int64_t M, int64_t N, int64_t K, int32_t activation,
                               int32_t impl, int32_t dtype, void* stream);
/* dx (M, K) = dz @ weight with dz = dy * act'(preact) formed in registers while loading dy
 * (preact (M, N) required unless activation is FL_ACT_NONE; dy (M, N)). */
FL_API fl_status fl_linear_bwd_dx(const void* dy, int64_t dy_row_stride,
                                  const void* preact, int64_t preact_row_stride,
                                  const void* weight, int64_t weight_row_stride,
                                  void* dx, int64_t dx_row_stride,
                                  int64_t M, int64_t N, int64_t K, int32_t activation,
                                  int32_t dtype, void* stream);
/* dweight (N, K) = dz^T @ x and, when dbias (N,) is non-NULL, dbias = sum over rows of dz, in the
 * same kernel (fp32 sums in a fixed order). No workspace. M == 0 writes zeros. */
FL_API fl_status fl_linear_bwd_dw(const void* dy, int64_t dy_row_stride,
                                  const void* preact, int64_t preact_row_stride,
                                  const void* x, int64_t x_row_stride,
                                  void* dweight, int64_t dweight_row_stride, void* dbias,
                                  int64_t M, int64_t N, int64_t K, int32_t activation,
                                  int32_t dtype, void* stream);
/* The launch grid (x, y, z) of one linear kernel, computed by the same planner its entry point
 * launches with, for a device with num_sms SMs; touches no device (CPU tests check it against
 * CUDA's limits on extreme shapes). kernel: FL_LINEAR_KERNEL_FWD (mma.sync forward), _BWD_DX,
 * _BWD_DW (with dbias), _FWD_WGMMA (the sm_90a forward); M, N, K as the entry points take them;
 * aligned != 0: the operands take the 16-byte path (ignored by _FWD_WGMMA). grid = (0, 0, 0) when
 * the entry point launches nothing. FL_ERR_INVALID for a size out of range, or a grid past CUDA's
 * limits (x <= 2^31 - 1, y, z <= 65535), which the entry point refuses the same way. */
enum { FL_LINEAR_KERNEL_FWD = 0, FL_LINEAR_KERNEL_BWD_DX = 1, FL_LINEAR_KERNEL_BWD_DW = 2,
       FL_LINEAR_KERNEL_FWD_WGMMA = 3 };
FL_API fl_status fl_linear_grid(int32_t kernel, int64_t M, int64_t N, int64_t K, int32_t aligned,
                                int32_t num_sms, int64_t* grid);

#ifdef __cplusplus
}
#endif
#endif /* FASTLAYERS_H_ */
