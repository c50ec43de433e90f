// Host helper of the kernel launchers: the opt-in a kernel needs to use more than 48 KB of
// dynamic shared memory, made once per kernel and device.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace lowbit::cuda {

constexpr int kMaxDevices = 64;

// The setting belongs to one kernel on the current device, so it is remembered per kernel
// (the template argument: kernels of one signature, such as the tile sizes of a GEMM, are
// distinct) and per device (devices past kMaxDevices set it on every launch).
template <auto Kernel>
cudaError_t allow_shared_memory(int bytes) {
  static std::atomic<bool> done[kMaxDevices] = {};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < kMaxDevices && done[device].load()) return cudaSuccess;
  e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && device < kMaxDevices) done[device].store(true);
  return e;
}

}  // namespace lowbit::cuda
