// Launch function of the CUDA W4A16 GEMM (w4a16_kernels.cu): plain C++ declarations with
// no torch types, so the launcher (w4a16.cpp) compiles without nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/float_type.h"

namespace lowbit::cuda {

struct W4A16Args {
  const void* x;            // [m, k] fp16, bf16 or fp32, row stride ldx; k and ldx multiples of 8, 16-byte aligned
  int64_t ldx;
  FloatType x_type;         // also the output type
  const void* codes;        // from w4a16_cuda_prepack, 16-byte aligned
  const float* scales;      // [groups, np], 16-byte aligned
  const uint8_t* zeros;     // [groups, np], 16-byte aligned
  const float* bias;        // [n] float32 or nullptr
  void* out;                // [m, n] contiguous
  float* workspace;         // [m, n] float32 when splits > 1: the running sum of the splits
  int* locks;               // one zeroed int per output tile when splits > 1 (left zeroed)
  int m, n, k, np, group;
  int m_tiles;              // m16 tiles per block of the 16-bit kernel: 1, 2 or 4 (tile_m_tiles)
  int splits;               // K splits, each at least one 64-k stage (split_begin)
};

cudaError_t launch_w4a16_gemm(const W4A16Args& args, cudaStream_t stream);

}  // namespace lowbit::cuda
