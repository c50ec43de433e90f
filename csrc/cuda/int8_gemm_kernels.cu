// INT8 tensor-core GEMM with the fused W8A8 epilogue, for sm_80 and newer (mma.sync).
//
//   out[m, n] = (sum_k a[m, k] * b[n, k], exact int32) * a_scale[m] * b_scale[n] + bias[n]
//
// Layout: a int8[M, K] (row stride lda), b int8[N, K] contiguous — both K-major, which is
// what mma.m16n8k32 .row.col consumes, so the canonical weight needs no prepack.
// Algorithm: one block per BM x BN output tile (Tile<> in int8_gemm_layout.h, chosen by M
// from a three-entry whitelist). A STAGES-deep cp.async pipeline copies 128-k slices of A
// and B into XOR-swizzled shared memory (16-byte chunks, zero-filled past M, N and K);
// each warp loads its fragments with ldmatrix.x4 and issues mma.sync.m16n8k32 s8 x s8 ->
// s32 into MI x NI register tiles. The epilogue runs in fp32 in the reference's order with
// explicitly rounded operations (no FMA contraction): acc * a_scale[m] * b_scale[n] +
// bias[n], then one cast to the output type — bit-equal to lowbit.reference.
// Limits: K % 16 == 0 and 16-byte aligned rows (lda % 16 == 0, aligned base pointers);
// the launcher (int8_gemm.cpp) copies other operands into that form. M, N and K tails
// are handled by zero-fill and store masks.
// On Hopper, from 129 rows, int8_gemm_wgmma_kernel (below) takes over: the same pipeline
// and shared-memory layout, read by warpgroup MMAs (wgmma) through matrix descriptors.
#include <atomic>
#include <cstdint>

#include "cuda/float_convert.cuh"
#include "cuda/int8_gemm_kernels.cuh"
#include "cuda/int8_gemm_layout.h"
#include "cuda/ptx.cuh"
#include "cuda/smem_opt_in.cuh"

namespace lowbit::cuda {
namespace {

using namespace int8_gemm;

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Copies the rows x 128-k slice starting at (row0, k0) of a K-major int8 matrix into a
// swizzled shared tile; rows past `rows` and k past K are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint8_t* tile, const int8_t* src, int64_t ld, int row0, int rows,
                                          int k0, int k) {
  constexpr int kPerThread = ROWS * kChunks / THREADS;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int row = c / kChunks, chunk = c % kChunks;
    const int grow = row0 + row, gk = k0 + chunk * 16;
    const bool ok = grow < rows && gk < k;
    // An out-of-range chunk still needs a valid address; the copy reads 0 bytes from it.
    const int8_t* from = ok ? src + grow * ld + gk : src;
    cp_async_16(tile + smem_offset(row, chunk), from, ok ? 16 : 0);
  }
}

template <typename T, typename OutT>
__global__ void __launch_bounds__(T::THREADS)
    int8_gemm_kernel(const int8_t* __restrict__ a, int64_t lda, const int8_t* __restrict__ b,
                     const float* __restrict__ a_scale, int64_t a_scale_stride,
                     const float* __restrict__ b_scale, const float* __restrict__ bias,
                     OutT* __restrict__ out, int m, int n, int k) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int m0 = blockIdx.y * T::BM, n0 = blockIdx.x * T::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm0 = (warp / T::WARPS_N) * T::WM, wn0 = (warp % T::WARPS_N) * T::WN;
  const int k_tiles = (k + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* sa = smem + stage * T::STAGE_BYTES;
    load_tile<T::BM, T::THREADS>(sa, a, lda, m0, m, kt * kBK, k);
    load_tile<T::BN, T::THREADS>(sa + T::BM * kBK, b, k, n0, n, kt * kBK, k);
  };

#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  int32_t acc[T::MI][T::NI][4] = {};
  for (int kt = 0; kt < k_tiles; ++kt) {
    // Groups committed so far: STAGES - 1 + kt; this stage's is number kt.
    cp_async_wait<T::STAGES - 2>();
    __syncthreads();  // stage kt is visible to all; everyone is done reading stage kt - 1
    const int next = kt + T::STAGES - 1;
    if (next < k_tiles) load_stage(next % T::STAGES, next);
    cp_async_commit();

    const uint8_t* sa = smem + (kt % T::STAGES) * T::STAGE_BYTES;
    const uint8_t* sb = sa + T::BM * kBK;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t af[T::MI][4];
      uint32_t bf[T::NI][2];
#pragma unroll
      for (int mi = 0; mi < T::MI; ++mi) ldmatrix_x4(af[mi], sa + a_ldmatrix_offset(lane, wm0 + mi * 16, kk));
#pragma unroll
      for (int np = 0; np < T::NI / 2; ++np) {
        uint32_t r[4];
        ldmatrix_x4(r, sb + b_ldmatrix_offset(lane, wn0 + np * 16, kk));
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NI; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < T::NI; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int gm = m0 + wm0 + mi * 16 + acc_row(lane, i);
        const int gn = n0 + wn0 + ni * 8 + acc_col(lane, i);
        if (gm < m && gn < n) {
          float v = __fmul_rn(__fmul_rn(__int2float_rn(acc[mi][ni][i]), a_scale[gm * a_scale_stride]), b_scale[gn]);
          if (bias != nullptr) v = __fadd_rn(v, bias[gn]);
          out[static_cast<int64_t>(gm) * n + gn] = from_float<OutT>(v);
        }
      }
}

template <typename T, typename OutT>
cudaError_t launch_tile(const Int8GemmArgs& p, cudaStream_t stream) {
  constexpr auto kernel = int8_gemm_kernel<T, OutT>;
  if (const cudaError_t attr = allow_shared_memory<kernel>(T::SMEM_BYTES); attr != cudaSuccess) return attr;
  const dim3 grid((p.n + T::BN - 1) / T::BN, (p.m + T::BM - 1) / T::BM);
  kernel<<<grid, T::THREADS, T::SMEM_BYTES, stream>>>(p.a, p.lda, p.b, p.a_scale, p.a_scale_stride,
                                                      p.b_scale, p.bias, static_cast<OutT*>(p.out), p.m,
                                                      p.n, p.k);
  return cudaGetLastError();
}


// ---- Hopper: warpgroup MMA (sm_90a) -------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOWBIT_HAS_WGMMA 1
#endif

#ifdef LOWBIT_HAS_WGMMA
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending of this warpgroup's committed MMA groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins the accumulators in place around the asynchronous MMAs: the compiler must not move or
// read them between a wgmma and the wait for it.
__device__ __forceinline__ void fence_operands(int32_t (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// d (64 x 128 s32 per warpgroup, 64 registers a thread) += A (64 x 32, descriptor) B (32 x 128).
__device__ __forceinline__ void wgmma_m64n128k32_s8(int32_t (&d)[64], unsigned long long desc_a,
                                                    unsigned long long desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(1));
}
#endif

// The 128 x 128 tile on two warpgroups; the same shared-memory pipeline and epilogue as
// int8_gemm_kernel. Built for every target, it has a body only in sm_90a code (the
// launcher asks the runtime which code the device got before choosing it).
template <typename OutT>
__global__ void __launch_bounds__(kWgmmaThreads)
    int8_gemm_wgmma_kernel(const int8_t* __restrict__ a, int64_t lda, const int8_t* __restrict__ b,
                           const float* __restrict__ a_scale, int64_t a_scale_stride,
                           const float* __restrict__ b_scale, const float* __restrict__ bias,
                           OutT* __restrict__ out, int m, int n, int k) {
#ifdef LOWBIT_HAS_WGMMA
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // wgmma's swizzle works on absolute shared addresses: start the tiles 1024-byte aligned.
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int m0 = blockIdx.y * kWgmmaBM, n0 = blockIdx.x * kWgmmaBN;
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int k_tiles = (k + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* sa = smem + stage * kWgmmaStageBytes;
    load_tile<kWgmmaBM, kWgmmaThreads>(sa, a, lda, m0, m, kt * kBK, k);
    load_tile<kWgmmaBN, kWgmmaThreads>(sa + kWgmmaBM * kBK, b, k, n0, n, kt * kBK, k);
  };
#pragma unroll
  for (int s = 0; s < kWgmmaStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  // One group of MMAs stays in flight while the next tile's are issued: tile kt's stage is
  // refilled only after the wait below has seen tile kt - 1's MMAs finish in every
  // warpgroup, and the slot refilled is tile kt - 1's, (kt + stages - 1) % stages.
  int32_t d[64] = {};
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kWgmmaStages - 2>();
    fence_proxy_async();  // this thread's cp.async writes become visible to wgmma (the async proxy)
    __syncthreads();

    const uint8_t* sa = smem + (kt % kWgmmaStages) * kWgmmaStageBytes;
    const uint32_t a_base = smem_addr(sa + warpgroup * 64 * kBK), b_base = smem_addr(sa + kWgmmaBM * kBK);
    fence_operands(d);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      wgmma_m64n128k32_s8(d, wgmma_desc(a_base + kk * kKStep), wgmma_desc(b_base + kk * kKStep));
    wgmma_commit();
    wgmma_wait<1>();  // tile kt - 1's MMAs are done in this warpgroup
    fence_operands(d);
    __syncthreads();  // ... and in the other: its stage may be refilled
    const int next = kt + kWgmmaStages - 1;
    if (next < k_tiles) load_stage(next % kWgmmaStages, next);
    cp_async_commit();
  }
  wgmma_wait<0>();
  fence_operands(d);
  cp_async_wait<0>();

  // Accumulator layout of m64nN: register 4j + i of a thread is the (acc_row, acc_col) of an
  // mma.m16n8 C fragment in n8 block j, with warp w of the warpgroup owning rows 16w..16w+15.
#pragma unroll
  for (int j = 0; j < kWgmmaBN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int gm = m0 + warpgroup * 64 + warp * 16 + acc_row(lane, i), gn = n0 + 8 * j + acc_col(lane, i);
      if (gm < m && gn < n) {
        float v = __fmul_rn(__fmul_rn(__int2float_rn(d[4 * j + i]), a_scale[gm * a_scale_stride]), b_scale[gn]);
        if (bias != nullptr) v = __fadd_rn(v, bias[gn]);
        out[static_cast<int64_t>(gm) * n + gn] = from_float<OutT>(v);
      }
    }
#else
  __trap();
#endif
}

template <typename OutT>
cudaError_t launch_wgmma(const Int8GemmArgs& p, cudaStream_t stream) {
  constexpr auto kernel = int8_gemm_wgmma_kernel<OutT>;
  if (const cudaError_t attr = allow_shared_memory<kernel>(kWgmmaSmemBytes); attr != cudaSuccess) return attr;
  const dim3 grid((p.n + kWgmmaBN - 1) / kWgmmaBN, (p.m + kWgmmaBM - 1) / kWgmmaBM);
  kernel<<<grid, kWgmmaThreads, kWgmmaSmemBytes, stream>>>(p.a, p.lda, p.b, p.a_scale, p.a_scale_stride, p.b_scale,
                                                          p.bias, static_cast<OutT*>(p.out), p.m, p.n, p.k);
  return cudaGetLastError();
}

// Whether the current device runs code of this file built for sm_90a (the wgmma kernel has a
// body only there): each cubin carries its own value of this flag, and reading it returns
// the one of the code the runtime loaded for the device — a plain sm_90 build, or a newer
// GPU without wgmma, reads 0. Asked once per device.
__device__ const int kCodeHasWgmma =
#ifdef LOWBIT_HAS_WGMMA
    1;
#else
    0;
#endif

bool device_has_wgmma() {
  static std::atomic<int> known[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (device < kMaxDevices && known[device].load() != 0) return known[device].load() == 2;
  int flag = 0;
  if (cudaMemcpyFromSymbol(&flag, kCodeHasWgmma, sizeof(flag)) != cudaSuccess) {
    cudaGetLastError();
    flag = 0;
  }
  if (device < kMaxDevices) known[device].store(flag ? 2 : 1);
  return flag != 0;
}

}  // namespace

cudaError_t launch_int8_gemm(const Int8GemmArgs& p, int tile, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (tile < 0) tile = tile_for_m(p.m, device_has_wgmma());
  cudaError_t result = cudaErrorInvalidValue;
  dispatch_float(p.out_type, [&](auto* tag) {
    using OutT = std::remove_pointer_t<decltype(tag)>;
    switch (tile) {
      case kWgmmaTile: result = device_has_wgmma() ? launch_wgmma<OutT>(p, stream) : cudaErrorInvalidDeviceFunction; break;
#define LOWBIT_TILE_CASE(id, bm, bn, wm, wn, stages) \
  case id: result = launch_tile<Tile<bm, bn, wm, wn, stages>, OutT>(p, stream); break;
      LOWBIT_INT8_GEMM_TILES(LOWBIT_TILE_CASE)
#undef LOWBIT_TILE_CASE
      default: break;
    }
  });
  return result;
}

}  // namespace lowbit::cuda
