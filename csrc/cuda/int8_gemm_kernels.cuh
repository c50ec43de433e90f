// Launch function of the CUDA int8 tensor-core GEMM (int8_gemm_kernels.cu): plain C++
// declarations with no torch types, so the launcher (int8_gemm.cpp) compiles without nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/float_type.h"

namespace lowbit::cuda {

struct Int8GemmArgs {
  const int8_t* a;           // [m, k], row stride lda (multiple of 16), 16-byte aligned
  int64_t lda;
  const int8_t* b;           // [n, k] contiguous, 16-byte aligned; k % 16 == 0
  const float* a_scale;      // [m] with stride a_scale_stride (0: one per-tensor scale)
  int64_t a_scale_stride;
  const float* b_scale;      // [n]
  const float* bias;         // [n] or nullptr
  void* out;                 // [m, n] contiguous, of out_type
  FloatType out_type;
  int m, n, k;
};

// out = (a @ b^T, int32) * a_scale[m] * b_scale[n] + bias[n]. `tile` picks an entry of
// LOWBIT_INT8_GEMM_TILES or the wgmma tile (int8_gemm_layout.h); -1 chooses by m and device.
// Returns the launch's error.
cudaError_t launch_int8_gemm(const Int8GemmArgs& args, int tile, cudaStream_t stream);

}  // namespace lowbit::cuda
