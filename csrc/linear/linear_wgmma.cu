// linear_wgmma.cu -- the Hopper (sm_90a) forward of the linear layer: y = act(x @ W^T + b) + residual
// (optionally preact = x @ W^T + b), fp16/bf16 in, fp32 accumulation. Called by fl_linear_fwd
// (linear.cu) through linear_wgmma.h; the backward stays on linear_gemm.cuh's mma.sync kernel.
//
// Kernel: a persistent grid (one CTA per SM; CTA b takes tiles b, b + gridDim.x, ... in grouped
// order), 3 warpgroups per CTA, 128-row tiles, 64-wide k tiles; two schedules (see WgTile):
// cooperative 128 x 256 (both consumer warpgroups on every tile, 64 rows each) and ping-pong
// 128 x 128 (the consumer warpgroups take alternate tiles, so one's epilogue overlaps the other's
// wgmmas).
//  - warpgroup 0 (producer, registers lowered with setmaxnreg): one thread issues, per k tile, two
//    TMA loads (cp.async.bulk.tensor.2d) of the x tile (128 x 64, K-major) and the W tile (BN x 64,
//    K-major) into a STAGES-deep shared-memory ring, 128-byte swizzled, completing on the stage's
//    "full" mbarrier (arrive.expect_tx with the stage's byte count). Rows / columns past M, N, K are
//    zero-filled by TMA, so ragged tails add nothing to the dot products.
//  - warpgroups 1, 2 (consumers) issue wgmma m64nBNk16 with both operands described in shared
//    memory, keep one wgmma group in flight, and free a stage (its "empty" mbarrier, one arrival per
//    consumer warp that read it) once the group that read it has completed. The epilogue (bias,
//    preact, activation, residual) runs on the accumulator registers: when y / preact / residual /
//    bias allow 16-byte accesses, quad shuffles first regroup each lane's column pairs into 8
//    contiguous columns (epilogue_vec8); otherwise predicated pairs (epilogue_pair, shared with the
//    mma.sync kernel). Same math and rounding either way. Meanwhile the producer loads ahead.
// Shared-memory layout of a stage: A tile then B tile, each row 64 elements = 128 bytes, 16-byte
// chunk c of row r stored at chunk c ^ (r % 8) (TMA SWIZZLE_128B, tile bases 1024-byte aligned);
// the wgmma descriptor names it "128B swizzle, 8-row groups 1024 bytes apart" and advances 32
// bytes per k16 step inside the 128-byte row (the hardware swizzles the computed address).
// Requirements (host checks, wgmma_fwd_unsupported): sm_90 device, sm_90a code in the build, x and
// W 16-byte aligned with nonzero row strides multiples of 8 elements (no broadcast rows), K >= 1.
#include <algorithm>
#include <atomic>
#include <climits>
#include <string>

#include "common/hopper.cuh"  // CUtensorMap, mbarrier / TMA / wgmma wrappers, host TMA helpers
#include "linear/linear_plan.h"
#include "linear/linear_wgmma.h"
#include "linear/wgmma_ops.cuh"

namespace fl {
namespace linear {

// Two schedules share the kernel (both: 128-row tiles, 64-wide k tiles, 128 fp32 accumulators per
// consumer thread, a ~192 KiB ring):
//  - cooperative (PINGPONG = false), 128 x 256 tiles: both consumer warpgroups work on every tile,
//    64 rows each (m64n256 wgmma). Fewest operand bytes per flop.
//  - ping-pong (PINGPONG = true), 128 x 128 tiles: consumer warpgroup c takes every other tile of the
//    CTA, all 128 rows (2 x m64n128 per k16), so one's epilogue runs while the other's wgmmas keep
//    the tensor cores busy.
template <bool PINGPONG_>
struct WgTile {
  static constexpr bool PINGPONG = PINGPONG_;
  static constexpr int BM = 128, BN = PINGPONG ? 128 : 256, BK = 64;
  static constexpr int CONSUMERS = 2;                 // consumer warpgroups
  static constexpr int MW = PINGPONG ? 2 : 1;         // m64 blocks per consumer warpgroup and tile
  static constexpr int THREADS = 128 * (1 + CONSUMERS);
  static constexpr int A_BYTES = BM * BK * 2;         // 16 KiB
  static constexpr int B_BYTES = BN * BK * 2;         // 32 or 16 KiB
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int STAGES = PINGPONG ? 6 : 4;     // 192 KiB of ring either way
  static constexpr int ACC = BN / 2;                  // fp32 accumulators per thread per m64 block
  static constexpr int EMPTY_ARRIVALS = 4 * (PINGPONG ? 1 : CONSUMERS);  // warps reading a stage
  // Ring + slack to align it to 1024 bytes + the mbarriers (full, empty per stage; 2 order).
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_BYTES + 1024 + 8 * (2 * STAGES + 2);
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzle atoms need 1024-byte alignment");
  static_assert(MW * ACC == 128, "128 accumulators per consumer thread");
};

// ------------------------------------------------------------------ sm_90a PTX wrappers
// (mbarrier, TMA, wgmma fence / commit / wait, setmaxnreg: fl::hopper, common/hopper.cuh)
#if FL_HOPPER_DEVICE
// Shared-memory matrix descriptor, K-major operand, 128-byte swizzle: start address >> 4 (bits
// 0-13), leading byte offset 1 (unused by swizzled K-major layouts, bits 16-29), stride byte
// offset 1024 >> 4 between 8-row groups (bits 32-45), base offset 0 (bases 1024-aligned), layout
// type 1 = 128B swizzle (bits 62-63).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return uint64_t((addr >> 4) & 0x3FFF) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}
#endif

// Pins the accumulators between wgmma groups: the compiler must not move them across the fence.
template <int N>
__device__ __forceinline__ void acc_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// 4 x 4 transpose of float pairs inside each quad of lanes (lane & 3 = t): on return out[u] is the
// in[t] of quad lane u. The wgmma fragment gives lane t the pairs at columns 8j + 2t, +1 of column
// groups j = 4q + u (u = 0..3); afterwards it holds columns 8(4q + t) + 0..7, ready for 16-byte IO.
// Indices that depend on the lane go through selects (no run-time register-array indexing).
__device__ __forceinline__ void quad_transpose(const float2 (&in)[4], float2 (&out)[4], int lane) {
  const int t = lane & 3, base = lane & ~3;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int si = (t + k) & 3;   // the pair this lane owes quad lane (t + k) & 3
    float2 send = in[0];
    send = si == 1 ? in[1] : send;
    send = si == 2 ? in[2] : send;
    send = si == 3 ? in[3] : send;
    const int src = (t - k) & 3;  // the quad lane whose pair for this lane arrives now
    float2 r;
    r.x = __shfl_sync(0xffffffffu, send.x, base | src);
    r.y = __shfl_sync(0xffffffffu, send.y, base | src);
#pragma unroll
    for (int u = 0; u < 4; ++u) out[u] = src == u ? r : out[u];
  }
}

// The forward epilogue of epilogue_pair (z = acc + bias -> preact; y = act(z) + residual) for
// C(row, col .. col + 7), with 16-byte loads and stores (the caller checked every pointer is 16-byte
// aligned and every row stride a multiple of 8). A group that crosses N goes pair by pair.
template <typename T, int ACT>
__device__ __forceinline__ void epilogue_vec8(const GemmParams& p, int row, int col, float (&v)[8]) {
  if (row >= p.M || col >= p.N) return;
  if (col + 8 > p.N) {
#pragma unroll
    for (int i = 0; i < 4; ++i) epilogue_pair<T, kForward, ACT>(p, row, col + 2 * i, v[2 * i], v[2 * i + 1]);
    return;
  }
  auto add8 = [&](const uint4 q) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack2<T>(w[i]);
      v[2 * i] += f.x;
      v[2 * i + 1] += f.y;
    }
  };
  auto pack8 = [&]() {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  };
  if (p.bias) add8(*reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(p.bias) + col));
  if (p.preact_out)
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(p.preact_out) + static_cast<int64_t>(row) * p.ldp + col) = pack8();
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = act_fwd<ACT>(v[i]);
  if (p.residual)
    add8(*reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(p.residual) + static_cast<int64_t>(row) * p.ldr + col));
  *reinterpret_cast<uint4*>(reinterpret_cast<T*>(p.c) + static_cast<int64_t>(row) * p.ldc + col) = pack8();
}

// Epilogue of one m64 x BN accumulator block (layout: see wgmma_ops.cuh); `row` is this lane's
// first row (its second is row + 8).
template <typename T, int BN, int ACT>
__device__ __forceinline__ void store_block(const GemmParams& p, const float (&acc)[BN / 2], int row, int n0,
                                            int lane, int vec16) {
  if (vec16) {
    // Quad transposes turn the fragment's column pairs into 8 contiguous columns per lane:
    // 16-byte bias / residual loads and preact / y stores, a quad covering 64 bytes of a row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int q = 0; q < BN / 32; ++q) {
        float2 in[4], out[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          in[u] = make_float2(acc[4 * (4 * q + u) + 2 * h], acc[4 * (4 * q + u) + 2 * h + 1]);
        quad_transpose(in, out, lane);
        float v[8] = {out[0].x, out[0].y, out[1].x, out[1].y, out[2].x, out[2].y, out[3].x, out[3].y};
        epilogue_vec8<T, ACT>(p, row + 8 * h, n0 + 8 * (4 * q + lane % 4), v);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = n0 + 8 * j + 2 * (lane % 4);
      epilogue_pair<T, kForward, ACT>(p, row, col, acc[4 * j + 0], acc[4 * j + 1]);
      epilogue_pair<T, kForward, ACT>(p, row + 8, col, acc[4 * j + 2], acc[4 * j + 3]);
    }
  }
}

template <typename T, bool PINGPONG, int ACT>
__global__ void __launch_bounds__(WgTile<PINGPONG>::THREADS, 1)
linear_wgmma_fwd_kernel(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w,
                        const GemmParams p, const int vec16) {
#if FL_HOPPER_DEVICE
  using C = WgTile<PINGPONG>;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, STAGES = C::STAGES, MW = C::MW;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128-byte swizzle pattern is a function of address bits 4-9: align the ring to 1024 bytes.
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;
  const uint32_t a_base = ring;                                   // STAGES x A tile
  const uint32_t b_base = ring + STAGES * C::A_BYTES;             // STAGES x B tile
  const uint32_t bars = ring + STAGES * C::STAGE_BYTES;  // full[STAGES], empty[STAGES], order[2]
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (STAGES + s); };
  auto order = [&](int c) { return bars + 8u * (2 * STAGES + c); };

  // Persistent grid: CTA b runs tiles b, b + gridDim.x, ... in grouped order (GROUP consecutive M
  // tiles sweep the N tiles together, so the concurrently running tiles share W tiles in L2).
  constexpr int GROUP = 8;
  const int tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const int tiles = tiles_m * tiles_n;
  auto tile_origin = [&](int t, int& m0, int& n0) {
    const int width = GROUP * tiles_n;
    const int first_m = (t / width) * GROUP;
    const int gsize = min(tiles_m - first_m, GROUP);
    m0 = (first_m + (t % width) % gsize) * BM;
    n0 = ((t % width) / gsize) * BN;
  };
  const int KT = (p.K + BK - 1) / BK;

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      hopper::mbar_init(full(s), 1);                    // the producer's arrive.expect_tx
      hopper::mbar_init(empty(s), C::EMPTY_ARRIVALS);   // one arrival per consumer warp that reads it
    }
    // order(c): one arrival per warp of the other consumer warpgroup (see the ping-pong wait below).
    hopper::mbar_init(order(0), 4);
    hopper::mbar_init(order(1), 4);
    // Make the initialised barriers visible to the async proxy (TMA completes on them).
    hopper::fence_mbarrier_init();
    hopper::fence_proxy_async_shared();
  }
  __syncthreads();

  // The producer walks this CTA's tiles q = 0, 1, ... (tile blockIdx.x + q * gridDim.x) and their k
  // tiles; step it = q * KT + kt uses stage it % STAGES in its (it / STAGES)-th round. Consumers
  // compute the same `it` for the steps they consume.
  if (wg == 0) {
    // Producer warpgroup: 40 registers are plenty for address arithmetic.
    hopper::setmaxnreg_dec<40>();
    if (tid == 0) {
      hopper::prefetch_tensormap(&tm_x);
      hopper::prefetch_tensormap(&tm_w);
      uint32_t it = 0;
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        int m0, n0;
        tile_origin(t, m0, n0);
        for (int kt = 0; kt < KT; ++kt, ++it) {
          const int s = it % STAGES;
          // Wait until the consumers released the stage's previous round (a fresh barrier passes
          // parity 1 at once, so the first round does not wait).
          hopper::mbar_wait_or_trap(empty(s), ((it / STAGES) & 1) ^ 1);
          hopper::mbar_arrive_expect_tx(full(s), C::STAGE_BYTES);  // OOB zero-filled bytes count too
          hopper::tma_load_2d(a_base + s * C::A_BYTES, &tm_x, full(s), kt * BK, m0);
          hopper::tma_load_2d(b_base + s * C::B_BYTES, &tm_w, full(s), kt * BK, n0);
        }
      }
    }
  } else {
    // Consumer warpgroups: the accumulators need the registers the producer gave up.
    hopper::setmaxnreg_inc<232>();
    const int cw = wg - 1;
    const int warp = (tid / 32) % 4, lane = tid % 32;
    // Cooperative: every tile, rows cw*64 .. cw*64+63. Ping-pong: tiles q = cw, cw + 2, ..., all rows.
    const int q_first = PINGPONG ? cw : 0, q_step = PINGPONG ? 2 : 1;
    const int row_off = PINGPONG ? 0 : cw * 64;
    for (int q = q_first;; q += q_step) {
      const int t = blockIdx.x + q * gridDim.x;
      if (t >= tiles) break;
      int m0, n0;
      tile_origin(t, m0, n0);
      float acc[MW][C::ACC];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int i = 0; i < C::ACC; ++i) acc[mw][i] = 0.f;

      // Ping-pong: start this tile's mainloop only once the other warpgroup has issued all of tile
      // q-1 (order(cw) completes once per tile of the other warpgroup; tile q needs its (q+cw)/2-th
      // completion). Besides keeping the two mainloops apart (one's epilogue overlaps the other's
      // wgmmas), this is what makes the parity waits below sound: a stage's previous round has
      // always been waited for before its next round is (the producer never runs a round ahead).
      // Every warp arrives (count 4), not one per warpgroup: warps of a warpgroup are not in lockstep,
      // and with a single arrival the other warpgroup could complete order(cw) twice while a lagging
      // warp here still waits for the first (parity aliasing: that warp would hang). With four, the
      // other warpgroup's next arrival follows its own order wait, which needs all of this
      // warpgroup's warps past this wait.
      if (PINGPONG && q > 0) hopper::mbar_wait_or_trap(order(cw), ((q + cw) / 2 + 1) & 1);
      const uint32_t it0 = uint32_t(q) * uint32_t(KT);
      for (int kt = 0; kt < KT; ++kt) {
        const uint32_t it = it0 + kt;
        const int s = it % STAGES;
        hopper::mbar_wait_or_trap(full(s), (it / STAGES) & 1);
        const uint32_t a_s = a_base + s * C::A_BYTES + row_off * 128;  // rows of 128 bytes
        const uint32_t b_s = b_base + s * C::B_BYTES;
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) acc_fence(acc[mw]);
        hopper::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          // k16 step kk = bytes 32kk .. 32kk+31 of every (unswizzled) 128-byte row; m64 block mw
          // starts 64 rows (8 KiB) further.
#pragma unroll
          for (int mw = 0; mw < MW; ++mw)
            Wgmma<T, BN>::mma(acc[mw], smem_desc_sw128(a_s + mw * 64 * 128 + 32 * kk),
                              smem_desc_sw128(b_s + 32 * kk));
        }
        hopper::wgmma_commit();
        // Keep this group in flight; after the wait the previous group (step it - 1) has read its
        // stage, which goes back to the producer.
        hopper::wgmma_wait<1>();
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) acc_fence(acc[mw]);
        if (kt > 0 && lane == 0) hopper::mbar_arrive(empty((it - 1) % STAGES));
      }
      // All of this warp's wgmmas of the tile are issued, and it has seen every one of its stages'
      // "full" rounds complete: once all four warps say so, the other warpgroup may start its next tile.
      if (PINGPONG && lane == 0) hopper::mbar_arrive(order(1 - cw));
      hopper::wgmma_wait<0>();
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) acc_fence(acc[mw]);
      if (lane == 0) hopper::mbar_arrive(empty((it0 + KT - 1) % STAGES));  // the tile's last stage (KT >= 1)

      // Epilogue straight from the registers, while the producer already fills the ring for the
      // next tiles (and, ping-pong, the other warpgroup runs its wgmmas).
#pragma unroll
      for (int mw = 0; mw < MW; ++mw)
        store_block<T, BN, ACT>(p, acc[mw], m0 + row_off + mw * 64 + warp * 16 + lane / 4, n0, lane, vec16);
    }
  }
#endif
}

// ------------------------------------------------------------------ host side
namespace {

// The forward kernels this build has (fl_linear_fwd's impl argument; Python reads the list).
const bool kImplsRegistered = register_info("linear_fwd_impls",
#if FL_HAS_SM90A
                                            "[\"mma\", \"wgmma\"]"
#else
                                            "[\"mma\"]"
#endif
);

#if FL_HAS_SM90A
// Compute capability (major * 10 + minor) of the current device (cached per device in
// fl::hopper::device_cc); -1 on error.
int device_cc(int* dev_out) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
    cudaGetLastError();  // clear the sticky-free error so later launches report their own
    return -1;
  }
  *dev_out = dev;
  return hopper::device_cc(dev);
}

int sm_count_of(int dev) {
  static std::atomic<int> cached[64];
  if (dev >= 0 && dev < 64) {
    const int v = cached[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int n = 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) n = 1;
  if (dev >= 0 && dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// TMA's rules for a row-major (rows, K) operand: base 16-byte aligned, row stride (bytes) a nonzero
// multiple of 16 below 2^40 -- irrelevant for a single row (make_map then states a valid one). A
// broadcast row (stride 0, which fl_linear_fwd accepts for x and weight) cannot be a tensor map.
bool tma_ok(const void* ptr, int64_t ld, int64_t rows) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 &&
         (rows <= 1 || (ld > 0 && ld % 8 == 0 && ld < (int64_t(1) << 38)));
}

// Row-major (rows, K) matrix with row stride ld elements, read in (box_rows x 64) tiles.
fl_status make_map(CUtensorMap* map, hopper::EncodeTiledFn encode, int32_t dtype, const void* ptr,
                   int64_t rows, int64_t K, int64_t ld, int box_rows, const char* name, const char* what) {
  const cuuint64_t dims[2] = {cuuint64_t(K), cuuint64_t(rows)};
  // Row stride in bytes (dims 1.. only); one row is never stepped over, so state the smallest valid one.
  const cuuint64_t strides[1] = {cuuint64_t(rows <= 1 ? (K + 7) / 8 * 8 : ld) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, dtype == FL_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return set_error(FL_ERR_CUDA, std::string(name) + ": cuTensorMapEncodeTiled failed for " + what +
                                      " (CUresult " + std::to_string(int(r)) + ")");
  return FL_OK;
}

template <typename T, bool PINGPONG, int ACT>
fl_status launch_tile(const CUtensorMap& mx, const CUtensorMap& mw, const GemmParams& p, int vec16, int dev,
                      int64_t grid, cudaStream_t stream, const char* name) {
  using C = WgTile<PINGPONG>;
  auto kernel = linear_wgmma_fwd_kernel<T, PINGPONG, ACT>;
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
  if (bit == 0 || !(configured.load(std::memory_order_relaxed) & bit)) {
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(C::SMEM_BYTES)));
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
  // grid: plan_wgmma_fwd's (persistent, min(tiles, SMs); the kernel strides over its tiles).
  kernel<<<static_cast<unsigned>(grid), C::THREADS, C::SMEM_BYTES, stream>>>(mx, mw, p, vec16);
  return check_launch(name);
}

template <typename T, int ACT>
fl_status launch_act(const GemmParams& p, int32_t dtype, cudaStream_t stream, const char* name) {
  const auto encode = hopper::encode_tiled_fn();
  if (encode == nullptr)
    return set_error(FL_ERR_UNSUPPORTED, std::string(name) +
                                             ": the sm_90a kernel needs cuTensorMapEncodeTiled, which the "
                                             "driver does not provide");
  int dev = 0;
  FL_CUDA_CHECK(cudaGetDevice(&dev));
  bool pingpong = false;
  int64_t grid = 0;
  FL_RETURN_IF_ERROR(plan_wgmma_fwd(p.M, p.N, p.K, sm_count_of(dev), &pingpong, &grid, name));
  const int bn = pingpong ? WgTile<true>::BN : WgTile<false>::BN;
  CUtensorMap mx, mw;
  FL_RETURN_IF_ERROR(make_map(&mx, encode, dtype, p.a, p.M, p.K, p.lda, 128, name, "x"));
  FL_RETURN_IF_ERROR(make_map(&mw, encode, dtype, p.b, p.N, p.K, p.ldb, bn, name, "weight"));
  // 16-byte epilogue IO when every output / epilogue operand allows it (else 4-byte pairs).
  auto io16 = [](const void* q, int64_t ld) {
    return q == nullptr || (reinterpret_cast<uintptr_t>(q) % 16 == 0 && ld % 8 == 0);
  };
  const int vec16 = io16(p.c, p.ldc) && io16(p.residual, p.ldr) && io16(p.preact_out, p.ldp) &&
                    io16(p.bias, 0);
  if (pingpong) return launch_tile<T, true, ACT>(mx, mw, p, vec16, dev, grid, stream, name);
  return launch_tile<T, false, ACT>(mx, mw, p, vec16, dev, grid, stream, name);
}
#endif  // FL_HAS_SM90A

}  // namespace

// Schedule (a first guess, to be tuned on the GPU): ping-pong 128 x 128 when the epilogue weighs
// (K <= 1024: a tile's wgmmas last only ~16 k steps) or when 128 x 256 tiles would leave SMs idle;
// else cooperative 128 x 256 (fewer operand bytes per flop). Persistent grid: min(tiles, SMs) CTAs
// (the ring takes most of an SM's shared memory); the kernel strides over the tiles, whose index
// is an int, hence the limit.
fl_status plan_wgmma_fwd(int64_t M, int64_t N, int64_t K, int num_sms, bool* pingpong, int64_t* grid,
                         const char* name) {
  const int64_t sms = std::max(num_sms, 1);
  const int64_t coop_tiles = ((M + WgTile<false>::BM - 1) / WgTile<false>::BM) *
                             ((N + WgTile<false>::BN - 1) / WgTile<false>::BN);
  *pingpong = K <= 1024 || coop_tiles < sms;
  const int64_t bm = *pingpong ? WgTile<true>::BM : WgTile<false>::BM;
  const int64_t bn = *pingpong ? WgTile<true>::BN : WgTile<false>::BN;
  const int64_t tiles = ((M + bm - 1) / bm) * ((N + bn - 1) / bn);
  FL_REQUIRE(tiles <= INT_MAX - sms, "%s: %lld output tiles exceed the int tile index", name, (long long)tiles);
  *grid = std::max<int64_t>(std::min(tiles, sms), 1);
  static_assert(WgTile<true>::BM == 128 && WgTile<false>::BM == 128, "tile heights of the schedule");
  return FL_OK;
}

std::string wgmma_fwd_unsupported(const GemmParams& p) {
#if !FL_HAS_SM90A
  (void)p;
  return "this build has no sm_90a code (FASTLAYERS_CUDA_ARCHS lacks 90a)";
#else
  int dev = -1;
  const int cc = device_cc(&dev);
  if (cc < 0) return "no usable CUDA device";
  if (cc != 90)
    return "the wgmma/TMA kernel needs a compute capability 9.0 device (sm_90a), device " +
           std::to_string(dev) + " is " + std::to_string(cc / 10) + "." + std::to_string(cc % 10);
  if (p.K < 1) return "K == 0 (nothing for TMA to load)";
  if (!tma_ok(p.a, p.lda, p.M))
    return "TMA needs x 16-byte aligned with a nonzero row stride that is a multiple of 8 elements, got address " +
           std::to_string(reinterpret_cast<uintptr_t>(p.a)) + " and row stride " + std::to_string(p.lda);
  if (!tma_ok(p.b, p.ldb, p.N))
    return "TMA needs weight 16-byte aligned with a nonzero row stride that is a multiple of 8 elements, got address " +
           std::to_string(reinterpret_cast<uintptr_t>(p.b)) + " and row stride " + std::to_string(p.ldb);
  // The ring's step counter (tiles of a CTA x k tiles) is a uint32 whose stage / parity sequence
  // must not wrap: a bound far beyond any practical GEMM (~10^18 FLOPs), checked so it never hangs.
  bool pingpong = false;
  int64_t grid = 0;
  if (plan_wgmma_fwd(p.M, p.N, p.K, sm_count_of(dev), &pingpong, &grid, "wgmma") != FL_OK)
    return "too many output tiles for the persistent kernel's int tile index";
  const int64_t bm = 128, bn = pingpong ? WgTile<true>::BN : WgTile<false>::BN;
  const int64_t tiles = ((p.M + bm - 1) / bm) * ((p.N + bn - 1) / bn);
  if ((tiles + grid - 1) / grid * ((p.K + 63) / 64) >= (int64_t(1) << 31))
    return "more than 2^31 k-tile steps per CTA (the pipeline's step counter)";
  return "";
#endif
}

fl_status launch_wgmma_fwd(const GemmParams& p, int32_t activation, int32_t dtype, cudaStream_t stream,
                           const char* name) {
#if !FL_HAS_SM90A
  (void)p; (void)activation; (void)dtype; (void)stream;
  return set_error(FL_ERR_UNSUPPORTED, std::string(name) + ": this build has no sm_90a code");
#else
  return FL_DISPATCH_HALF(dtype, name, [&] {
    switch (activation) {
      case FL_ACT_NONE: return launch_act<scalar_t, FL_ACT_NONE>(p, dtype, stream, name);
      case FL_ACT_GELU: return launch_act<scalar_t, FL_ACT_GELU>(p, dtype, stream, name);
      case FL_ACT_GELU_TANH: return launch_act<scalar_t, FL_ACT_GELU_TANH>(p, dtype, stream, name);
      case FL_ACT_RELU: return launch_act<scalar_t, FL_ACT_RELU>(p, dtype, stream, name);
      default:
        return set_error(FL_ERR_INVALID, std::string(name) + ": activation must be 0..3, got " +
                                             std::to_string(activation));
    }
  });
#endif
}

}  // namespace linear
}  // namespace fl
