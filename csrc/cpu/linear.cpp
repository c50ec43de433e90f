// CPU weight-only linear ops (W8A16, W4A16) on the canonical formats, portable C++.
//
// A block of weight rows is dequantized to
// fp32 once into a thread-local buffer and reused for all M activation rows (the dequant
// cost is amortized over M); dot products accumulate in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/quantize.h"

namespace lowbit::cpu {
namespace {

constexpr int64_t kRowBlock = 16;  // weight rows per task

float dot_f32(const float* a, const float* b, int64_t k) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < k; ++j) acc += a[j] * b[j];
  return acc;
}

std::optional<at::Tensor> float_bias(const std::optional<at::Tensor>& bias) {
  if (!bias) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

// out[m, n] = x[m] . dequant(w)[n] * post_scale[n] (+ bias[n]). `dequant_row(j, buf)`
// writes weight row j as fp32 into buf; post_scale may be null.
template <typename DequantRow>
at::Tensor dequant_gemm(const at::Tensor& x, int64_t n, const float* post_scale,
                        const std::optional<at::Tensor>& bias, DequantRow dequant_row) {
  const int64_t k = x.size(-1);
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = xf.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  const std::optional<at::Tensor> bf = float_bias(bias);
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  const float* xp = xf.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dequant_gemm", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowBlock, [&](int64_t n0, int64_t n1) {
      std::vector<float> wbuf(kRowBlock * k);
      for (int64_t c0 = n0; c0 < n1; c0 += kRowBlock) {
        const int64_t c1 = std::min(n1, c0 + kRowBlock);
        for (int64_t j = c0; j < c1; ++j) dequant_row(j, wbuf.data() + (j - c0) * k);
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = c0; j < c1; ++j) {
            float y = dot_f32(xp + i * k, wbuf.data() + (j - c0) * k, k);
            if (post_scale) y = y * post_scale[j];
            if (bp) y = y + bp[j];
            op[i * n + j] = static_cast<scalar_t>(y);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                        const std::optional<at::Tensor>& bias) {
  check_int8_linear(x, w, w_scale, bias);
  const int64_t k = w.size(1);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  return dequant_gemm(x, w.size(0), w_scale.const_data_ptr<float>(), bias,
                      [&](int64_t j, float* row) {
                        for (int64_t c = 0; c < k; ++c) row[c] = static_cast<float>(wp[j * k + c]);
                      });
}

at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t group_size,
                        const std::optional<at::Tensor>& bias) {
  check_int4_linear(x, packed, scales, zeros, group_size, bias);
  const int64_t k = packed.size(1) * 2, groups = k / group_size;
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const uint8_t* zp = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  return dequant_gemm(x, packed.size(0), nullptr, bias, [&](int64_t j, float* row) {
    dequantize_int4_row(pp + j * (k / 2), sp + j * groups, zp ? zp + j * groups : nullptr,
                        group_size, k, row);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("w8a16_linear", &w8a16_linear);
  m.impl("w4a16_linear", &w4a16_linear);
}

}  // namespace lowbit::cpu
