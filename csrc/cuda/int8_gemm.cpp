// CUDA launchers of int8_scaled_mm and w8a8_linear on the int8 tensor-core GEMM
// (int8_gemm_kernels.cu): argument checks, the kernel's alignment requirements, output
// allocation, the current stream, and the launch's error.
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/int8_gemm_kernels.cuh"
#include "cuda/quantize_kernels.cuh"

namespace lowbit::cuda {
namespace {

// The GEMM on checked int8 operands a [m, k] and b [n, k]. The kernel copies 16-byte
// chunks, so it needs k % 16 == 0 and 16-byte aligned rows: other operands are copied
// first (a with a fresh row stride; both with k zero-padded to a multiple of 16, which adds
// zero products) — a copy of the weight per call, so only for shapes no LLM has.
void run_gemm(at::Tensor a, at::Tensor b, const at::Tensor& a_scale, int64_t a_scale_stride,
              const at::Tensor& b_scale, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t m = a.size(0), n = b.size(0);
  TORCH_CHECK_VALUE(m <= 65535 * 16, "the CUDA int8 GEMM takes at most ", 65535 * 16,
                    " rows per call (one grid row per 16 rows), got ", m);
  TORCH_CHECK_VALUE(m <= INT32_MAX && n <= INT32_MAX, "the CUDA int8 GEMM takes sizes below 2^31");
  // int32 accumulation: 127 * 127 * K stays exact up to K = 2^17 (lowbit.backends.cuda.INT8_MAX_K).
  TORCH_CHECK_VALUE(a.size(1) <= (int64_t{1} << 17), "the CUDA int8 GEMM takes K <= 131072, got K = ", a.size(1));
  if (const int64_t pad = (16 - a.size(1) % 16) % 16; pad) {
    a = at::constant_pad_nd(a, {0, pad});
    b = at::constant_pad_nd(b, {0, pad});
  }
  // clone, not contiguous(): a contiguous view at an unaligned offset would come back as is.
  if (a.stride(1) != 1 || a.stride(0) % 16 != 0 || !aligned16(a.const_data_ptr()))
    a = a.clone(at::MemoryFormat::Contiguous);
  if (!aligned16(b.const_data_ptr())) b = b.clone();
  const int64_t k = a.size(1);
  const at::Tensor bias_f = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor bsc = b_scale.contiguous();
  Int8GemmArgs args{a.const_data_ptr<int8_t>(), a.stride(0), b.const_data_ptr<int8_t>(),
                    a_scale.const_data_ptr<float>(), a_scale_stride, bsc.const_data_ptr<float>(),
                    bias ? bias_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
                    float_type(out.scalar_type()), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k)};
  C10_CUDA_CHECK(launch_int8_gemm(args, -1, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor int8_scaled_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype) {
  check_int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor sa = a_scale.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_dtype));
  run_gemm(a, b, sa, 1, b_scale, bias, out);
  return out;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& x_scale) {
  check_int8_linear(x, w, w_scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1), rows = x.numel() / k, n = w.size(0);
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor scale;
  int64_t scale_stride = 1;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x_scale) {
    check_per_tensor_scale(x, *x_scale);
    scale = x_scale->contiguous();
    scale_stride = 0;
    launch_quantize_per_tensor(xc.const_data_ptr(), float_type(x.scalar_type()), rows, k,
                               scale.const_data_ptr<float>(), q.mutable_data_ptr<int8_t>(), stream);
  } else {
    scale = at::empty({rows}, x.options().dtype(at::kFloat));
    launch_quantize_per_token(xc.const_data_ptr(), float_type(x.scalar_type()), rows, k,
                              q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty({rows, n}, x.options());
  run_gemm(q, w, scale, scale_stride, w_scale, bias, out);
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("int8_scaled_mm", &int8_scaled_mm);
  m.impl("w8a8_linear", &w8a8_linear);
}

}  // namespace lowbit::cuda
