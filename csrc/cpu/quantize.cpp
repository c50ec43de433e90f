// CPU quantize / dequantize / int4 packing ops.
//
// All are memory-bound single passes, parallel over rows with ATen's thread pool. The
// arithmetic follows python/lowbit/reference.py to the bit: fp32 division by the scale
// (not a multiply by its reciprocal, which can round differently at .5 boundaries),
// round-half-to-even via std::nearbyint in the default rounding mode, then clamping.
#include "cpu/quantize.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "cpu/int8_gemm_driver.h"

namespace lowbit::cpu {
namespace {

// Rows per task so that a task touches at least ~64 KiB.
int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int8_t* q, int64_t ldq, float* scale) {
  at::parallel_for(0, m, row_grain(k * sizeof(T)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = x + i * k;
      float amax = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float a = std::abs(static_cast<float>(row[j]));
        // A NaN makes the row's scale NaN (so its outputs are NaN), as in the reference.
        amax = (a > amax || std::isnan(a)) ? a : amax;
      }
      float s = amax / 127.0f;
      if (s == 0.0f) s = 1.0f;
      scale[i] = s;
      int8_t* qrow = q + i * ldq;
      for (int64_t j = 0; j < k; ++j) qrow[j] = quantize_value(static_cast<float>(row[j]), s);
    }
  });
}

}  // namespace

int8_t quantize_value(float v, float scale) {
  const float r = std::nearbyint(v / scale);
  if (std::isnan(r)) return 0;
  return static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
}

void quantize_rows_static(const at::Tensor& x2d, float scale, int8_t* q, int64_t ldq) {
  const int64_t m = x2d.size(0), k = x2d.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "quantize", [&] {
    const scalar_t* x = x2d.const_data_ptr<scalar_t>();
    at::parallel_for(0, m, row_grain(k * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < k; ++j) q[i * ldq + j] = quantize_value(static_cast<float>(x[i * k + j]), scale);
    });
  });
}

void quantize_rows_dynamic(const at::Tensor& x2d, int8_t* q, int64_t ldq, float* scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "quantize", [&] {
    quantize_rows(x2d.const_data_ptr<scalar_t>(), x2d.size(0), x2d.size(1), q, ldq, scale);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  check_activation(x, "x");
  const at::Tensor xc = x.contiguous();
  const int64_t k = x.size(-1);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  quantize_activations(current_isa(), xc.view({-1, k}), std::nullopt, k, q.mutable_data_ptr<int8_t>(),
                       scale.mutable_data_ptr<float>(), /*row_comp=*/nullptr);
  return {q, scale};
}

at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scale, at::ScalarType dtype) {
  check_int8_weight(w, scale);
  check_float_dtype(dtype, "dtype");
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor out = at::empty({n, k}, w.options().dtype(dtype));
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dequantize_int8", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t j = 0; j < k; ++j)
          op[r * k + j] = static_cast<scalar_t>(static_cast<float>(wp[r * k + j]) * sp[r]);
    });
  });
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scales,
                           const std::optional<at::Tensor>& zeros, int64_t group_size,
                           at::ScalarType dtype) {
  check_int4_weight(packed, scales, zeros, group_size);
  check_float_dtype(dtype, "dtype");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  at::Tensor out = at::empty({n, k}, packed.options().dtype(dtype));
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const uint8_t* zp = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dequantize_int4", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(k), [&](int64_t begin, int64_t end) {
      std::vector<float> row(k);
      for (int64_t r = begin; r < end; ++r) {
        dequantize_int4_row(pp + r * (k / 2), sp + r * (k / group_size),
                            zp ? zp + r * (k / group_size) : nullptr, group_size, k, row.data());
        for (int64_t j = 0; j < k; ++j) op[r * k + j] = static_cast<scalar_t>(row[j]);
      }
    });
  });
  return out;
}

at::Tensor pack_int4(const at::Tensor& q) {
  check_matrix(q, at::kByte, "q");
  TORCH_CHECK_VALUE(q.size(1) % 2 == 0, "int4 packing needs an even K, got K = ", q.size(1));
  const at::Tensor qc = q.contiguous();
  const int64_t total = q.numel() / 2;
  at::Tensor out = at::empty({q.size(0), q.size(1) / 2}, q.options());
  const uint8_t* in = qc.const_data_ptr<uint8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const uint8_t max_value = q.numel() ? *std::max_element(in, in + q.numel()) : 0;
  TORCH_CHECK_VALUE(max_value <= 15, "int4 values must lie in [0, 15], found ",
                    static_cast<int>(max_value));
  at::parallel_for(0, total, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      op[i] = static_cast<uint8_t>(in[2 * i] | (in[2 * i + 1] << 4));
  });
  return out;
}

at::Tensor unpack_int4(const at::Tensor& packed) {
  check_matrix(packed, at::kByte, "packed");
  const at::Tensor pc = packed.contiguous();
  const int64_t total = packed.numel();
  at::Tensor out = at::empty({packed.size(0), packed.size(1) * 2}, packed.options());
  const uint8_t* in = pc.const_data_ptr<uint8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, total, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      op[2 * i] = in[i] & 0x0F;
      op[2 * i + 1] = in[i] >> 4;
    }
  });
  return out;
}

}  // namespace

void dequantize_int4_row(const uint8_t* packed, const float* scales, const uint8_t* zeros,
                         int64_t group_size, int64_t k, float* out) {
  for (int64_t g = 0; g < k / group_size; ++g) {
    const float s = scales[g];
    const float z = zeros ? static_cast<float>(zeros[g]) : 8.0f;
    for (int64_t j = g * group_size; j < (g + 1) * group_size; j += 2) {
      const uint8_t byte = packed[j / 2];
      out[j] = (static_cast<float>(byte & 0x0F) - z) * s;
      out[j + 1] = (static_cast<float>(byte >> 4) - z) * s;
    }
  }
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("pack_int4", &pack_int4);
  m.impl("unpack_int4", &unpack_int4);
}

}  // namespace lowbit::cpu
