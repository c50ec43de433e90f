// CUDA launchers for the quantize / dequantize ops: argument checks, output allocation,
// the current stream, and a launch-error check. The kernels are in quantize_kernels.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/quantize_kernels.cuh"

namespace lowbit::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  check_activation(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t k = x.size(-1), rows = x.numel() / k;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, "quantize_per_token supports at most 2^31-1 rows, got ",
                    rows);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  launch_quantize_per_token(xc.const_data_ptr(), float_type(x.scalar_type()), rows, k,
                            q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(),
                            c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scale, at::ScalarType dtype) {
  check_int8_weight(w, scale);
  check_float_dtype(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(dtype));
  const at::Tensor sc = scale.contiguous();
  launch_dequantize_int8(w.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), w.size(0),
                         w.size(1), out.mutable_data_ptr(), float_type(dtype),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, int64_t group_size,
                           at::ScalarType dtype) {
  check_int4_weight(packed, scales, zeros, group_size);
  check_float_dtype(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  at::Tensor out = at::empty({n, k}, packed.options().dtype(dtype));
  launch_dequantize_int4(packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                         zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, n, k, group_size,
                         out.mutable_data_ptr(), float_type(dtype),
                         c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
}

}  // namespace lowbit::cuda
