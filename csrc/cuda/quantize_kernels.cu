// CUDA quantize / dequantize kernels: memory-bound single passes.
//
// quantize_per_token: one block per row; the row's |x| maximum is reduced with warp
// shuffles and shared memory, then every element is divided by the scale (IEEE division,
// as the reference does; fast-math is never enabled for this file) and rounded half to
// even with rintf.
// dequantize_int8 / dequantize_int4: a grid-stride loop, each thread producing the
// elements of one packed byte (int4) or one int8 element; the CUDA issue (#5) replaces
// them with 16-byte vectorized versions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/quantize_kernels.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kThreads = 256;

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

int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename T>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, int64_t k,
                                          int8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float warp_max[kThreads / 32];
  const T* row = x + blockIdx.x * k;
  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const float a = fabsf(to_float(row[j]));
    amax = (a > amax || isnan(a)) ? a : amax;  // a NaN poisons the row's scale
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, amax, offset);
    amax = (other > amax || isnan(other)) ? other : amax;
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    const float other = warp_max[w];
    amax = (other > amax || isnan(other)) ? other : amax;
  }
  float s = amax / 127.0f;
  if (s == 0.0f) s = 1.0f;
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  int8_t* qrow = q + blockIdx.x * k;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    const float r = rintf(to_float(row[j]) / s);
    qrow[j] = isnan(r) ? 0 : static_cast<int8_t>(fminf(fmaxf(r, -127.0f), 127.0f));
  }
}

template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ w, const float* __restrict__ scale,
                                       int64_t n, int64_t k, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * k;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = from_float<T>(static_cast<float>(w[i]) * scale[i / k]);
  }
}

template <typename T>
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ packed,
                                       const float* __restrict__ scales,
                                       const uint8_t* __restrict__ zeros, int64_t n, int64_t k,
                                       int64_t group_size, T* __restrict__ out) {
  const int64_t bytes = n * k / 2, groups = k / group_size;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < bytes;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / (k / 2), col = 2 * (i % (k / 2));
    const int64_t g = row * groups + col / group_size;  // both nibbles share a group (G even)
    const float s = scales[g];
    const float z = zeros ? static_cast<float>(zeros[g]) : 8.0f;
    const uint8_t byte = packed[i];
    out[2 * i] = from_float<T>((static_cast<float>(byte & 0x0F) - z) * s);
    out[2 * i + 1] = from_float<T>((static_cast<float>(byte >> 4) - z) * s);
  }
}

}  // namespace

void launch_quantize_per_token(const void* x, FloatType x_type, int64_t rows, int64_t k,
                               int8_t* q, float* scale, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_float(x_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_per_token_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), k, q, scale);
  });
}

void launch_dequantize_int8(const int8_t* w, const float* scale, int64_t n, int64_t k, void* out,
                            FloatType out_type, cudaStream_t stream) {
  if (n * k == 0) return;
  dispatch_float(out_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_int8_kernel<T><<<blocks_for(n * k), kThreads, 0, stream>>>(w, scale, n, k,
                                                                          static_cast<T*>(out));
  });
}

void launch_dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                            int64_t n, int64_t k, int64_t group_size, void* out,
                            FloatType out_type, cudaStream_t stream) {
  if (n * k == 0) return;
  dispatch_float(out_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_int4_kernel<T><<<blocks_for(n * k / 2), kThreads, 0, stream>>>(
        packed, scales, zeros, n, k, group_size, static_cast<T*>(out));
  });
}

}  // namespace lowbit::cuda
