// The torch-facing side of the CPU int8 GEMM (int8_gemm.cpp): activation quantization
// into the kernels' padded buffer, for whichever ISA path is current.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace lowbit::cpu {

// Quantizes the contiguous float [M, K] x2d into a ([M][kp] bytes, padding filled with
// the zero value) and scale ([M]): per row (dynamic), or with one static scale. shift
// stores q + 128 for the VNNI kernel; otherwise q as int8.
void quantize_activations(const at::Tensor& x2d, std::optional<float> static_scale, int64_t kp, bool shift,
                          uint8_t* a, float* scale);

}  // namespace lowbit::cpu
