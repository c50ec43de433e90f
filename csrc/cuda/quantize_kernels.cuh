// Launch functions for the CUDA quantize / dequantize kernels (quantize_kernels.cu).
//
// Plain C++ declarations with no torch types, so that the kernel file compiles without
// torch headers and the launcher (quantize.cpp) compiles without nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/float_type.h"

namespace lowbit::cuda {

// Per-row int8 quantization of a contiguous [rows, k] matrix: scale[r] = max|x[r]|/127
// (0 -> 1), q = clamp(rint(x / scale), -127, 127).
void launch_quantize_per_token(const void* x, FloatType x_type, int64_t rows, int64_t k,
                               int8_t* q, float* scale, cudaStream_t stream);

// int8 quantization with one calibrated scale read from device memory:
// q = clamp(rint(x / *scale), -127, 127).
void launch_quantize_per_tensor(const void* x, FloatType x_type, int64_t rows, int64_t k,
                                const float* scale, int8_t* q, cudaStream_t stream);

// out[n, k] = w[n, k] * scale[n].
void launch_dequantize_int8(const int8_t* w, const float* scale, int64_t n, int64_t k, void* out,
                            FloatType out_type, cudaStream_t stream);

// out[n, k] = (q[n, k] - z[n, k/G]) * s[n, k/G]; zeros == nullptr means z = 8.
void launch_dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                            int64_t n, int64_t k, int64_t group_size, void* out,
                            FloatType out_type, cudaStream_t stream);

}  // namespace lowbit::cuda
