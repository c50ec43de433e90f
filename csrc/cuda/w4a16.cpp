// CUDA launcher of w4a16_linear_cuda_prepacked on the W4A16 tensor-core GEMM
// (w4a16_kernels.cu): argument checks, the kernel's input requirements, the tile and
// split-K choice, output, workspace and lock allocation, the current stream, and the
// launch's error.
#include <ATen/ops/clone.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/w4a16_kernels.cuh"
#include "cuda/w4a16_layout.h"

namespace lowbit::cuda {
namespace {

// Split K while the output tiles alone leave SMs idle (small M): doubling the splits while
// the blocks stay within two waves, each split at least 4 pipeline stages long.
int choose_splits(int tiles, int kp) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  int splits = 1;
  while (splits < 16 && tiles * splits * 2 <= 2 * sms && kp / (2 * splits) >= 4 * w4a16::kBK) splits *= 2;
  return splits;
}

at::Tensor w4a16_linear_cuda_prepacked(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t group_size, int64_t out_features,
                                       const std::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  check_dtype(codes, at::kByte, "codes");
  check_dtype(scales, at::kFloat, "scales");
  check_dtype(zeros, at::kByte, "zeros");
  check_bias(bias, out_features);
  const at::Tensor bias_t = bias ? *bias : at::Tensor();
  check_same_device({{"x", &x}, {"codes", &codes}, {"scales", &scales}, {"zeros", &zeros}, {"bias", &bias_t}});
  check_group_size(group_size, x.size(-1));
  check_contiguous(codes, "codes");
  check_contiguous(scales, "scales");
  check_contiguous(zeros, "zeros");
  TORCH_CHECK_VALUE(aligned16(codes.const_data_ptr()) && aligned16(scales.const_data_ptr()) &&
                        aligned16(zeros.const_data_ptr()),
                    "codes, scales and zeros must be 16-byte aligned (as w4a16_cuda_prepack allocates them)");
  TORCH_CHECK_VALUE(scales.dim() == 2, "scales must be 2-D [groups, N padded], got ", scales.dim(), "-D");
  const int64_t k = x.size(-1), rows = x.numel() / k;
  const int64_t np = scales.size(1), kp = w4a16::round_up(static_cast<int>(k), w4a16::kBK);
  TORCH_CHECK_VALUE(np % w4a16::kBN == 0 && np >= out_features && zeros.sizes() == scales.sizes() &&
                        scales.size(0) * group_size >= kp && codes.numel() == kp / 16 * (np / w4a16::kWarpN) * 512,
                    "codes/scales/zeros do not come from w4a16_cuda_prepack for K = ", k, ", N = ", out_features,
                    ", G = ", group_size);
  TORCH_CHECK_VALUE(rows <= 65535 * 8, "the CUDA W4A16 GEMM takes at most ", 65535 * 8,
                    " rows per call (one grid row per 8 rows), got ", rows);
  TORCH_CHECK_VALUE(rows <= INT32_MAX && k <= INT32_MAX - 64 && np <= INT32_MAX, "sizes must be below 2^31");
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel copies x in 16-byte chunks: contiguous rows with K a multiple of 8.
  at::Tensor x2 = x.reshape({rows, k});
  if (k % 8) x2 = at::constant_pad_nd(x2, {0, 8 - k % 8});
  // clone, not contiguous(): a contiguous view at an unaligned offset would come back as is.
  if (x2.stride(1) != 1 || x2.stride(0) % 8 || !aligned16(x2.const_data_ptr()))
    x2 = x2.clone(at::MemoryFormat::Contiguous);
  const at::Tensor bias_f = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const FloatType type = float_type(x.scalar_type());
  const int m_tiles = w4a16::tile_m_tiles(static_cast<int>(rows));
  const int block_rows = w4a16::rows_per_block(type == FloatType::kFloat32, m_tiles);
  const int tiles = static_cast<int>((rows + block_rows - 1) / block_rows * (np / w4a16::kBN));
  const int splits = choose_splits(tiles, static_cast<int>(kp));
  // Splits add their partial tiles in order into one fp32 workspace, each tile's turn
  // passed on through a lock that starts (and is left) at zero.
  const bool split = splits > 1;
  at::Tensor workspace = split ? at::empty({rows, out_features}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor locks = split ? at::zeros({tiles}, x.options().dtype(at::kInt)) : at::Tensor();
  W4A16Args args{x2.const_data_ptr(), x2.stride(0), type,
                 codes.const_data_ptr(), scales.const_data_ptr<float>(), zeros.const_data_ptr<uint8_t>(),
                 bias ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
                 split ? workspace.mutable_data_ptr<float>() : nullptr,
                 split ? locks.mutable_data_ptr<int>() : nullptr, static_cast<int>(rows),
                 static_cast<int>(out_features), static_cast<int>(x2.size(1)), static_cast<int>(np),
                 static_cast<int>(group_size), m_tiles, splits};
  C10_CUDA_CHECK(launch_w4a16_gemm(args, c10::cuda::getCurrentCUDAStream()));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("w4a16_linear_cuda_prepacked", &w4a16_linear_cuda_prepacked); }

}  // namespace lowbit::cuda
