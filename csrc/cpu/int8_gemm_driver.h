// The torch-facing side of the CPU int8 GEMM (int8_gemm.cpp): activation quantization
// into the kernels' padded buffer, for whichever ISA path is current.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/isa.h"

#include <cstdint>
#include <optional>

namespace lowbit::cpu {

// Quantizes the contiguous float [M, K] x2d into a ([M][kp] int8, zero padding) and scale
// ([M]): per row (dynamic), or with one static scale, using isa's quantizer. row_comp, when not null, receives
// 128 * sum_k q[m][k] (what the VNNI kernel subtracts).
void quantize_activations(Isa isa, const at::Tensor& x2d, std::optional<float> static_scale, int64_t kp, int8_t* a,
                          float* scale, int32_t* row_comp);

}  // namespace lowbit::cpu
