// Device-side conversions between fp32 and the kernels' element types, and the dispatch
// from a FloatType to a C++ element type. Round to nearest even everywhere, as torch's
// casts do, so epilogues match the reference bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/float_type.h"

namespace lowbit::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Calls f with a typed null pointer of the element type that `type` names.
template <typename F>
void dispatch_float(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case FloatType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case FloatType::kFloat16: f(static_cast<__half*>(nullptr)); break;
  }
}

}  // namespace lowbit::cuda
