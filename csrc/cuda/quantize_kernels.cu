// CUDA quantize / dequantize kernels: memory-bound single passes.
//
// quantize_per_token: one block per row; the row's |x| maximum is reduced with warp
// shuffles and shared memory, then every element is divided by the scale (IEEE division,
// as the reference does; fast-math is never enabled for this file) and rounded half to
// even with rintf.
// dequantize_int8 / dequantize_int4: grid-stride loops. When rows are whole 16-byte
// vectors (int8: K % 16 == 0; int4: K % 32 == 0 and G % 32 == 0, so a vector never
// leaves its row or group) and the buffers are 16-byte aligned, each thread reads one
// 16-byte vector of codes (16 int8 or 32 int4 values) and writes its outputs as 16-byte
// vectors; other shapes take the element-wise kernels.
#include "cuda/float_convert.cuh"
#include "cuda/quantize_kernels.cuh"

namespace lowbit::cuda {
namespace {

constexpr int kThreads = 256;

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
__global__ void quantize_per_tensor_kernel(const T* __restrict__ x, int64_t count, const float* __restrict__ scale,
                                           int8_t* __restrict__ q) {
  const float s = *scale;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float r = rintf(to_float(x[i]) / s);
    q[i] = isnan(r) ? 0 : static_cast<int8_t>(fminf(fmaxf(r, -127.0f), 127.0f));
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

// kVec codes per thread: int8 16 (one 16-byte load), int4 32 (16 packed bytes).
template <typename T, int N>
__device__ __forceinline__ void store_vectors(T* dst, const float (&v)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors");
  union {
    T t[N];
    uint4 u[N * sizeof(T) / 16];
  } out;
#pragma unroll
  for (int j = 0; j < N; ++j) out.t[j] = from_float<T>(v[j]);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int j = 0; j < static_cast<int>(N * sizeof(T) / 16); ++j) d[j] = out.u[j];
}

template <typename T>
__global__ void dequantize_int8_vec_kernel(const int8_t* __restrict__ w, const float* __restrict__ scale,
                                           int64_t k, int64_t vectors, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < vectors;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint4 raw = reinterpret_cast<const uint4*>(w)[i];
    const int8_t* q = reinterpret_cast<const int8_t*>(&raw);
    const float s = scale[i * 16 / k];
    float v[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(q[j]) * s;
    store_vectors(out + i * 16, v);
  }
}

template <typename T>
__global__ void dequantize_int4_vec_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                                           const uint8_t* __restrict__ zeros, int64_t k, int64_t group_size,
                                           int64_t vectors, T* __restrict__ out) {
  const int64_t groups = k / group_size;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < vectors;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint4 raw = reinterpret_cast<const uint4*>(packed)[i];
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    const int64_t first = i * 32, row = first / k, col = first % k;
    const int64_t g = row * groups + col / group_size;  // 32 codes, one group (G % 32 == 0)
    const float s = scales[g];
    const float z = zeros ? static_cast<float>(zeros[g]) : 8.0f;
    float v[32];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      v[2 * j] = (static_cast<float>(bytes[j] & 0x0F) - z) * s;
      v[2 * j + 1] = (static_cast<float>(bytes[j] >> 4) - z) * s;
    }
    store_vectors(out + first, v);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

void launch_quantize_per_tensor(const void* x, FloatType x_type, int64_t rows, int64_t k,
                                const float* scale, int8_t* q, cudaStream_t stream) {
  if (rows * k == 0) return;
  dispatch_float(x_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_per_tensor_kernel<T><<<blocks_for(rows * k), kThreads, 0, stream>>>(static_cast<const T*>(x), rows * k,
                                                                                scale, q);
  });
}

void launch_dequantize_int8(const int8_t* w, const float* scale, int64_t n, int64_t k, void* out,
                            FloatType out_type, cudaStream_t stream) {
  if (n * k == 0) return;
  const bool vec = k % 16 == 0 && aligned16(w) && aligned16(out);
  dispatch_float(out_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (vec) {
      dequantize_int8_vec_kernel<T><<<blocks_for(n * k / 16), kThreads, 0, stream>>>(w, scale, k, n * k / 16,
                                                                                     static_cast<T*>(out));
    } else {
      dequantize_int8_kernel<T><<<blocks_for(n * k), kThreads, 0, stream>>>(w, scale, n, k, static_cast<T*>(out));
    }
  });
}

void launch_dequantize_int4(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                            int64_t n, int64_t k, int64_t group_size, void* out,
                            FloatType out_type, cudaStream_t stream) {
  if (n * k == 0) return;
  const bool vec = k % 32 == 0 && group_size % 32 == 0 && aligned16(packed) && aligned16(out);
  dispatch_float(out_type, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (vec) {
      dequantize_int4_vec_kernel<T><<<blocks_for(n * k / 32), kThreads, 0, stream>>>(
          packed, scales, zeros, k, group_size, n * k / 32, static_cast<T*>(out));
    } else {
      dequantize_int4_kernel<T><<<blocks_for(n * k / 2), kThreads, 0, stream>>>(
          packed, scales, zeros, n, k, group_size, static_cast<T*>(out));
    }
  });
}

}  // namespace lowbit::cuda
