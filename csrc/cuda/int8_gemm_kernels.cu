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
// The sm_90a wgmma variant of issue #5 is not written yet: on Hopper this kernel runs
// mma.sync, which is reported to reach well under the full int8 rate there.
#include <cstdint>

#include "cuda/float_convert.cuh"
#include "cuda/int8_gemm_kernels.cuh"
#include "cuda/int8_gemm_layout.h"
#include "cuda/ptx.cuh"

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
  auto kernel = int8_gemm_kernel<T, OutT>;
  // Above 48 KB of dynamic shared memory a kernel must opt in, once per instantiation.
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM_BYTES);
  if (attr != cudaSuccess) return attr;
  const dim3 grid((p.n + T::BN - 1) / T::BN, (p.m + T::BM - 1) / T::BM);
  kernel<<<grid, T::THREADS, T::SMEM_BYTES, stream>>>(p.a, p.lda, p.b, p.a_scale, p.a_scale_stride,
                                                      p.b_scale, p.bias, static_cast<OutT*>(p.out), p.m,
                                                      p.n, p.k);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_int8_gemm(const Int8GemmArgs& p, int tile, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (tile < 0) tile = tile_for_m(p.m);
  cudaError_t result = cudaErrorInvalidValue;
  dispatch_float(p.out_type, [&](auto* tag) {
    using OutT = std::remove_pointer_t<decltype(tag)>;
    switch (tile) {
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
