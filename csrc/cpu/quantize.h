// Quantization helpers shared by the CPU ops (csrc/cpu/quantize.cpp defines them).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lowbit::cpu {

// clamp(round_half_even(v / scale), -127, 127); NaN becomes 0.
int8_t quantize_value(float v, float scale);

// Per-row symmetric int8 quantization of a contiguous [M, K] float tensor into q (row
// stride ldq): scale[m] = max|x[m, :]| / 127 (0 -> 1), q = quantize_value(x, scale[m]).
void quantize_rows_dynamic(const at::Tensor& x2d, int8_t* q, int64_t ldq, float* scale);

// The same with one calibrated scale for the whole tensor.
void quantize_rows_static(const at::Tensor& x2d, float scale, int8_t* q, int64_t ldq);

// One row of canonical int4 weights to fp32: (q - z) * s per group; zeros == nullptr
// means the symmetric format (z = 8).
void dequantize_int4_row(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                         int64_t group_size, int64_t k, float* out);

}  // namespace lowbit::cpu
