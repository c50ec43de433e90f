// The floating-point element types the CUDA kernels read and write, named without torch
// or CUDA headers so that launchers (C++) and kernel files (CUDA) share one enum.
#pragma once

namespace lowbit::cuda {

enum class FloatType { kFloat32, kBFloat16, kFloat16 };

}  // namespace lowbit::cuda
