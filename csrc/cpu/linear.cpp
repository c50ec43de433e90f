// CPU linear ops on the canonical weight formats: portable C++ (no ISA intrinsics).
//
// int8 x int8: each output is an exact int32 dot product of an activation row and a
// weight row, then the fp32 epilogue acc * s_x[m] * s_w[n] + b[n] in that order (the
// build disables FMA contraction, so the epilogue matches the reference to the bit).
// Work is split over blocks of weight rows so that a block stays in cache while every
// activation row passes over it.
//
// int4 / int8 weights with float activations: a block of weight rows is dequantized to
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

int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t k) {
  int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < k; ++j) acc += static_cast<int32_t>(a[j]) * static_cast<int32_t>(b[j]);
  return acc;
}

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

// out[m, n] = int32(a[m] . b[n]) * sa[m] * sb[n] (+ bias[n]), as out_dtype.
void int8_gemm(const int8_t* a, const int8_t* b, const float* sa, const float* sb,
               const float* bias, int64_t m, int64_t n, int64_t k, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "int8_gemm", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowBlock, [&](int64_t n0, int64_t n1) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = n0; j < n1; ++j) {
          const int32_t acc = dot_i8(a + i * k, b + j * k, k);
          float y = static_cast<float>(acc) * sa[i];
          y = y * sb[j];
          if (bias) y = y + bias[j];
          op[i * n + j] = static_cast<scalar_t>(y);
        }
      }
    });
  });
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

at::Tensor int8_scaled_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype) {
  check_int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype);
  const at::Tensor ac = a.contiguous(), sac = a_scale.contiguous(), sbc = b_scale.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_dtype));
  const std::optional<at::Tensor> bf = float_bias(bias);
  int8_gemm(ac.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), sac.const_data_ptr<float>(),
            sbc.const_data_ptr<float>(), bf ? bf->const_data_ptr<float>() : nullptr, a.size(0),
            b.size(0), a.size(1), out);
  return out;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& x_scale) {
  check_int8_linear(x, w, w_scale, bias);
  if (x_scale) {
    check_dtype(*x_scale, at::kFloat, "x_scale");
    TORCH_CHECK_VALUE(x_scale->numel() == 1, "x_scale must hold one per-tensor scale, got shape ",
                      x_scale->sizes());
    check_same_device({{"x", &x}, {"x_scale", &*x_scale}});
  }
  const int64_t k = x.size(-1), n = w.size(0);
  const at::Tensor x2d = x.reshape({-1, k}).contiguous();
  const int64_t m = x2d.size(0);
  at::Tensor qx = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m}, x.options().dtype(at::kFloat));
  if (x_scale) {
    const float s = x_scale->item<float>();
    quantize_rows_static(x2d, s, qx.mutable_data_ptr<int8_t>());
    sx.fill_(s);
  } else {
    quantize_rows_dynamic(x2d, qx.mutable_data_ptr<int8_t>(), sx.mutable_data_ptr<float>());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  const std::optional<at::Tensor> bf = float_bias(bias);
  int8_gemm(qx.const_data_ptr<int8_t>(), w.const_data_ptr<int8_t>(), sx.const_data_ptr<float>(),
            w_scale.const_data_ptr<float>(), bf ? bf->const_data_ptr<float>() : nullptr, m, n,
            k, out);
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
  m.impl("int8_scaled_mm", &int8_scaled_mm);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a16_linear", &w8a16_linear);
  m.impl("w4a16_linear", &w4a16_linear);
}

}  // namespace lowbit::cpu
