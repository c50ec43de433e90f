// LOWBIT_HD marks the index functions the CUDA kernels share with their CPU models and
// prepack code: host + device (inlined) under nvcc, plain inline C++ elsewhere.
#pragma once

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif
