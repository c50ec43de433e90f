// Helpers of the CUDA launchers (C++ with torch headers): the kernels' element type for a
// torch dtype, and the 16-byte alignment the kernels' vector copies need.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "cuda/float_type.h"

namespace lowbit::cuda {

inline FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported floating-point type ", t);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace lowbit::cuda
