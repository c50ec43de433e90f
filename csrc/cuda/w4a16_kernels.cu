// CUDA W4A16 GEMM (sm_80 and newer): y = x @ w'^T (+ bias), w' = (q - z) * s per group.
//
// Layout: x fp16 or bf16 [M, K] (row stride ldx, K and ldx multiples of 8, 16-byte aligned:
// the launcher copies other inputs); the weight prepacked by w4a16_cuda_prepack into the
// order of w4a16_layout.h (each lane's B fragments of a k16 x n64 tile are one 16-byte
// vector); scales float32 and zero points uint8 as [groups, NP], 16-byte aligned.
// Algorithm: one block per (16 MT) x 256 output tile and per K split, MT = 1, 2 or 4 m16
// tiles by M, on 4 or 8 warps (w4a16_layout.h, "Tiles"). A 4-stage cp.async pipeline
// brings 64-k slices of x (into the XOR-swizzled rows of the int8 GEMM, read with
// ldmatrix.x4), of the weight codes (copied evict-first from L2 when one row of blocks
// reads them) and, in the slices where a group starts, that group's scales and zero points
// (the stage's scale slots) into shared memory, so no global load waits inside the k loop.
// Per k16 step each warp converts its lanes' 16-byte code vectors once, without
// integer-to-float instructions — lop3 merges a nibble pair into the mantissas of 1024.0
// (fp16) or 128.0 (bf16), and one subtraction of (1024 or 128) + z leaves (q - z), a small
// integer exact in 16 bits — and feeds them to the warp's m16 tiles' mma.m16n8k16 (fp32
// accumulation); the partial sum of each k16 step is scaled by its group's fp32 scale into
// the accumulators (more accurate than rounding w' to 16 bits; the reference differs only
// in summation order).
// float32 activations take w4a16_fp32_kernel (CUDA-core FMAs, same weights) instead.
// Small M: the launcher splits K so that the tiles times the splits fill the SMs; the splits
// of a tile add their partial sums in split order on a lock (w4a16_layout.h, "Split K"),
// in the kernel: no atomics, no second kernel, the same bits on every run.
// Limits: M, N and K tails are handled by zero-fill, zero padding of the prepacked weight
// and store masks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/float_convert.cuh"
#include "cuda/int8_gemm_layout.h"
#include "cuda/ptx.cuh"
#include "cuda/smem_opt_in.cuh"
#include "cuda/w4a16_kernels.cuh"
#include "cuda/w4a16_layout.h"

namespace lowbit::cuda {
namespace {

using namespace w4a16;

// The 16-bit type's magic number (a power of two whose mantissa the nibble fills) and the
// mma instruction.
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // {1024, 1024}
  static constexpr float kBias = 1024.0f;
  __device__ static uint32_t pair(float v) {
    const __half2 h = __float2half2_rn(v);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // {128, 128}
  static constexpr float kBias = 128.0f;
  __device__ static uint32_t pair(float v) {
    const __nv_bfloat162 h = __float2bfloat162_rn(v);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Pair p of a code word (nibbles p and p + 4, w4a16_layout.h) as two 16-bit (q - z) values:
// the nibbles land in the mantissas of the magic number (exact), and subtracting the
// magic number plus z (zsub = {magic + z, magic + z}) leaves the integers.
template <typename T>
__device__ __forceinline__ uint32_t codes_minus_zero(uint32_t word, int p, uint32_t zsub) {
  return Mma<T>::sub(lop3_and_or(word >> (4 * p), 0x000f000fu, Mma<T>::kMagic), zsub);
}

// The split-K epilogue of one accumulator (w4a16_layout.h, "Split K"): the sum of the
// earlier splits (read past L1: another SM wrote it) plus this split's value; stored back
// for the next split, or, by the last, completed with the bias and cast into the output.
template <typename T>
__device__ __forceinline__ void store_result(float v, int64_t at, int col, int split, int splits,
                                             const float* __restrict__ bias, T* __restrict__ out,
                                             float* __restrict__ ws) {
  if (split > 0) v = __fadd_rn(__ldcg(ws + at), v);
  if (split + 1 < splits) {
    __stcg(ws + at, v);
  } else {
    out[at] = from_float<T>(bias != nullptr ? __fadd_rn(v, bias[col]) : v);
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(block_threads(MT))
    w4a16_gemm_kernel(const T* __restrict__ x, int64_t ldx, const uint4* __restrict__ codes,
                      const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                      const float* __restrict__ bias, T* __restrict__ out, float* __restrict__ ws,
                      int* __restrict__ locks, int m, int n, int k, int np, int group, int splits) {
  constexpr int kStage = stage_bytes(MT), kBlockThreads = block_threads(MT), MI = m_tiles_per_warp(MT);
  static_assert(16 * MT * 8 % kBlockThreads == 0 && kCodeChunks % kBlockThreads == 0 && kSlotChunks <= kBlockThreads,
                "every thread copies whole shares of a stage's x and code chunks; a slot takes one copy per thread");
  extern __shared__ __align__(128) uint8_t smem[];
  const int m0 = blockIdx.y * 16 * MT, n0 = blockIdx.x * kBN;
  const int kp = round_up(k, kBK);
  const int split = blockIdx.z;
  const int k_begin = split_begin(split, splits, kp), k_end = split_begin(split + 1, splits, kp);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_n = warp % kWarps, wm0 = (warp / kWarps) * 16 * MI;  // this warp's columns and rows
  const int wn0 = n0 + warp_n * kWarpN;
  const int g = lane / 4, t = lane % 4;
  const int k_tiles = (k_end - k_begin) / kBK;
  // Codes that only this row of blocks reads are marked evict-first; with more rows of
  // blocks (larger M) the others read them again, from L2.
  const uint64_t policy = gridDim.y == 1 ? evict_first_policy() : evict_normal_policy();

  auto load_stage = [&](int stage, int kt) {
    uint8_t* st = smem + stage * kStage;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int i = 0; i < 16 * MT * 8 / kBlockThreads; ++i) {  // x: 16 MT rows x 8 chunks of 8 values
      const int c = threadIdx.x + i * kBlockThreads;
      const int row = c / 8, chunk = c % 8;
      const int gm = m0 + row, gk = k0 + chunk * 8;
      const bool ok = gm < m && gk < k;  // k % 8 == 0: a chunk is all in or all out
      cp_async_16(st + int8_gemm::smem_offset(row, chunk), ok ? x + gm * ldx + gk : x, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kCodeChunks / kBlockThreads; ++i) {  // codes: 4 k16 steps x 4 n64 tiles x 32 lanes
      const int c = threadIdx.x + i * kBlockThreads;
      cp_async_16_hint(st + code_offset(MT) + c * 16,
                       codes + vector_index(k0 / 16 + code_chunk_step(c), n0 / kWarpN + code_chunk_tile(c), np,
                                            code_chunk_lane(c)),
                       policy);
    }
    int slot = 0;  // scales and zero points of the groups this slice starts
#pragma unroll
    for (int j = 0; j < kKSteps; ++j) {
      const int k16 = k0 + 16 * j;
      if (!starts_group(k16, k_begin, group, k)) continue;
      if (threadIdx.x < kSlotChunks) {
        const int c = threadIdx.x, col = n0 + slot_chunk_column(c);
        const int64_t row = static_cast<int64_t>(step_group(k16, group, k)) * np;
        const void* src = slot_chunk_is_scale(c) ? static_cast<const void*>(scales + row + col)
                                                 : static_cast<const void*>(zeros + row + col);
        cp_async_16(st + slot_offset(MT, slot) + 16 * c, src, 16);
      }
      ++slot;
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  float acc[MI][8][4] = {};
  float sc[8][2];     // scales of this lane's C columns (8b + 2t, 8b + 2t + 1) in the current group
  uint32_t zsub[8];   // {magic + z, magic + z} of this lane's B column (8b + g)
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const uint8_t* st = smem + (kt % kStages) * kStage;
    const int k0 = k_begin + kt * kBK;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      if (starts_group(k0 + 16 * kk, k_begin, group, k)) {
        const uint8_t* slot = st + slot_offset(MT, slot_of_step(k0, kk, k_begin, group, k));
        const float* srow = reinterpret_cast<const float*>(slot) + warp_n * kWarpN;
        const uint8_t* zrow = slot + kSlotScaleBytes + warp_n * kWarpN;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          sc[b][0] = srow[8 * b + 2 * t];
          sc[b][1] = srow[8 * b + 2 * t + 1];
          zsub[b] = Mma<T>::pair(Mma<T>::kBias + static_cast<float>(zrow[8 * b + g]));
        }
      }
      uint32_t af[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi], st + int8_gemm::a_ldmatrix_offset(lane, wm0 + 16 * mi, kk));
      const uint4 v = *reinterpret_cast<const uint4*>(st + code_offset(MT) + code_chunk(kk, warp_n, lane) * 16);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        // Block b comes from word b / 2, pairs 2 (b % 2) (register 0) and 2 (b % 2) + 1.
        const uint32_t bf[2] = {codes_minus_zero<T>(words[b / 2], 2 * (b % 2), zsub[b]),
                                codes_minus_zero<T>(words[b / 2], 2 * (b % 2) + 1, zsub[b])};
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          Mma<T>::mma(c, af[mi], bf);
          acc[mi][b][0] += c[0] * sc[b][0];
          acc[mi][b][1] += c[1] * sc[b][1];
          acc[mi][b][2] += c[2] * sc[b][0];
          acc[mi][b][3] += c[3] * sc[b][1];
        }
      }
    }
  }
  cp_async_wait<0>();

  int* lock = locks != nullptr ? locks + blockIdx.y * gridDim.x + blockIdx.x : nullptr;
  if (lock != nullptr) wait_for_turn(lock, split);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + wm0 + 16 * mi + int8_gemm::acc_row(lane, i);
        const int col = wn0 + 8 * b + int8_gemm::acc_col(lane, i);
        if (row < m && col < n)
          store_result(acc[mi][b][i], static_cast<int64_t>(row) * n + col, col, split, splits, bias, out, ws);
      }
  if (lock != nullptr) pass_turn(lock, split + 1 < splits ? split + 1 : 0);
}

// float32 activations: CUDA-core FMAs over the same prepacked weights (a tensor-core float32
// product would round x to tf32, 10 mantissa bits, far from the reference). One warp per
// n64 column strip and kFp32Rows rows: a lane holds 8 columns (one per n8 block) and, per
// k16 tile, 4 k values of each (w4a16_layout.h); the 4 lanes sharing a column add their
// sums with shuffles at the end. Split K as in the tensor-core kernel.

__global__ void __launch_bounds__(kThreads)
    w4a16_fp32_kernel(const float* __restrict__ x, int64_t ldx, const uint4* __restrict__ codes,
                      const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                      const float* __restrict__ bias, float* __restrict__ out, float* __restrict__ ws,
                      int* __restrict__ locks, int m, int n, int k, int np, int group, int splits) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int nt = blockIdx.x * kWarps + warp;  // n64 tile
  const int m0 = blockIdx.y * kFp32Rows;
  const int kp = round_up(k, kBK);
  const int split = blockIdx.z;
  const int k_begin = split_begin(split, splits, kp), k_end = split_begin(split + 1, splits, kp);
  float acc[kFp32Rows][8] = {};
  float s[8], z[8];
  for (int k16 = k_begin; k16 < k_end; k16 += 16) {
    if (starts_group(k16, k_begin, group, k)) {
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int64_t at = static_cast<int64_t>(step_group(k16, group, k)) * np + nt * kWarpN + 8 * b + g;
        s[b] = scales[at];
        z[b] = static_cast<float>(zeros[at]);
      }
    }
    const uint4 v = __ldcs(codes + vector_index(k16 / 16, nt, np, lane));  // streamed: read once
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    // This lane's k values in the tile: 2t + {0, 1, 8, 9}.
    float xv[kFp32Rows][4];
#pragma unroll
    for (int r = 0; r < kFp32Rows; ++r) {
      const int row = m0 + r;
      const bool ok = row < m;
      // k is even, so each pair lies wholly inside or past x's k columns (past: zero, as the
      // weight padding up to a multiple of 64 must multiply nothing).
      const float* xr = x + (ok ? row : 0) * ldx + k16 + 2 * t;
      const float2 lo = ok && k16 + 2 * t < k ? *reinterpret_cast<const float2*>(xr) : make_float2(0.0f, 0.0f);
      const float2 hi = ok && k16 + 2 * t + 8 < k ? *reinterpret_cast<const float2*>(xr + 8) : make_float2(0.0f, 0.0f);
      xv[r][0] = lo.x;
      xv[r][1] = lo.y;
      xv[r][2] = hi.x;
      xv[r][3] = hi.y;
    }
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int b = (nibble_n(lane, w, i) - g) / 8;  // compile-time: the lane terms cancel
        const int kk = nibble_k(lane, i) - 2 * t;      // 0, 1, 8 or 9
        const int e = (kk & 1) + (kk >> 3) * 2;        // index into xv
        const float q = static_cast<float>((words[w] >> (4 * i)) & 0xF) - z[b];
#pragma unroll
        for (int r = 0; r < kFp32Rows; ++r) acc[r][b] += s[b] * (q * xv[r][e]);
      }
  }
#pragma unroll
  for (int r = 0; r < kFp32Rows; ++r)
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], 1);
      acc[r][b] += __shfl_xor_sync(0xffffffffu, acc[r][b], 2);
    }
  int* lock = locks != nullptr ? locks + blockIdx.y * gridDim.x + blockIdx.x : nullptr;
  if (lock != nullptr) wait_for_turn(lock, split);
#pragma unroll
  for (int r = 0; r < kFp32Rows; ++r)
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int row = m0 + r, col = nt * kWarpN + 8 * b + g;
      if (t == 0 && row < m && col < n)
        store_result(acc[r][b], static_cast<int64_t>(row) * n + col, col, split, splits, bias, out, ws);
    }
  if (lock != nullptr) pass_turn(lock, split + 1 < splits ? split + 1 : 0);
}

template <typename T, int MT>
cudaError_t launch_tiles(const W4A16Args& p, cudaStream_t stream) {
  constexpr auto kernel = w4a16_gemm_kernel<T, MT>;
  if (const cudaError_t attr = allow_shared_memory<kernel>(smem_bytes(MT)); attr != cudaSuccess) return attr;
  const dim3 grid(p.np / kBN, (p.m + 16 * MT - 1) / (16 * MT), p.splits);
  kernel<<<grid, block_threads(MT), smem_bytes(MT), stream>>>(
      static_cast<const T*>(p.x), p.ldx, static_cast<const uint4*>(p.codes), p.scales, p.zeros, p.bias,
      static_cast<T*>(p.out), p.workspace, p.locks, p.m, p.n, p.k, p.np, p.group, p.splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_16bit(const W4A16Args& p, cudaStream_t stream) {
  switch (p.m_tiles) {
    case 1: return launch_tiles<T, 1>(p, stream);
    case 2: return launch_tiles<T, 2>(p, stream);
    case kMaxMTiles: return launch_tiles<T, kMaxMTiles>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_w4a16_gemm(const W4A16Args& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (p.x_type == FloatType::kFloat16) return launch_16bit<__half>(p, stream);
  if (p.x_type == FloatType::kBFloat16) return launch_16bit<__nv_bfloat16>(p, stream);
  const dim3 grid(p.np / kBN, (p.m + kFp32Rows - 1) / kFp32Rows, p.splits);
  w4a16_fp32_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(p.x), p.ldx,
                                                   static_cast<const uint4*>(p.codes), p.scales, p.zeros, p.bias,
                                                   static_cast<float*>(p.out), p.workspace, p.locks, p.m, p.n, p.k,
                                                   p.np, p.group, p.splits);
  return cudaGetLastError();
}

}  // namespace lowbit::cuda
