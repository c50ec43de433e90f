// CPU int8 GEMM: weight prepacking, the portable (scalar) kernel and epilogue, the driver
// that splits work over ATen's threads and picks the ISA kernel, and the ops built on it:
// int8_prepack, w8a8_linear_prepacked, w8a8_linear and int8_scaled_mm.
//
// Work split: tasks are (64-column panel, chunk of up to 48 rows), ordered panel-major so
// that consecutive tasks, which land on the same thread, reuse the panel from L2.
#include "cpu/int8_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/int8_gemm_driver.h"
#include "cpu/isa.h"
#include "cpu/paths.h"
#include "cpu/quantize.h"

namespace lowbit::cpu {

using int8::Epilogue;
using int8::FloatType;
using int8::kGroupK;
using int8::kPanel;
using int8::kRowChunk;
using int8::round_up;

namespace int8 {

void gemm_scalar(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
                 int64_t p1, const Epilogue& ep) {
  std::vector<int32_t> acc(kPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * kp * kPanel;
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(acc.begin(), acc.end(), 0);
      const int8_t* row = a + m * kp;
      for (int64_t s = 0; s < kp / kGroupK; ++s)
        for (int64_t c = 0; c < kPanel; ++c)
          for (int64_t j = 0; j < kGroupK; ++j)
            acc[c] += static_cast<int32_t>(row[s * kGroupK + j]) *
                      static_cast<int8_t>(panel[(s * kPanel + c) * kGroupK + j] ^ 0x80);
      store_tile_scalar(acc.data(), 1, m, p * kPanel, ep);
    }
  }
}

void store_tile_scalar(const int32_t* acc, int rows, int64_t m0, int64_t c0, const Epilogue& ep) {
  for (int r = 0; r < rows; ++r) {
    const int64_t m = m0 + r;
    for (int64_t c = c0; c < std::min(c0 + kPanel, ep.n); ++c) {
      const int32_t v = acc[r * kPanel + (c - c0)] - (ep.row_comp ? ep.row_comp[m] : 0);
      float y = static_cast<float>(v) * ep.a_scale[m];
      y = y * ep.b_scale[c];
      if (ep.bias) y = y + ep.bias[c];
      switch (ep.out_type) {
        case FloatType::kF32: static_cast<float*>(ep.out)[m * ep.ldo + c] = y; break;
        case FloatType::kBF16: static_cast<c10::BFloat16*>(ep.out)[m * ep.ldo + c] = y; break;
        case FloatType::kF16: static_cast<c10::Half*>(ep.out)[m * ep.ldo + c] = y; break;
      }
    }
  }
}

}  // namespace int8

namespace {

FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatType::kF32;
    case at::kBFloat16: return FloatType::kBF16;
    case at::kHalf: return FloatType::kF16;
    default: TORCH_CHECK_TYPE(false, "unsupported floating-point type ", t);
  }
}

at::Tensor int8_prepack(const at::Tensor& w) {
  check_matrix(w, at::kChar, "w");
  check_contiguous(w, "w");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK_VALUE(k <= int8::kMaxK, "int8 GEMM supports K <= ", int8::kMaxK, ", got K = ", k);
  const int64_t panels = round_up(n, kPanel) / kPanel, kp = round_up(k, int8::kAlignK);
  at::Tensor packed = at::empty({panels, kp / kGroupK, kPanel, kGroupK}, w.options().dtype(at::kByte));
  const int8_t* src = w.const_data_ptr<int8_t>();
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = p * kPanel + c;
        for (int64_t kk = 0; kk < kp; ++kk) {
          const int8_t v = (col < n && kk < k) ? src[col * k + kk] : 0;
          dst[((p * (kp / kGroupK) + kk / kGroupK) * kPanel + c) * kGroupK + kk % kGroupK] =
              static_cast<uint8_t>(v) ^ 0x80;
        }
      }
  });
  return packed;
}

// The exact inverse of int8_prepack: the int8[N, K] weight back from the blocked layout.
at::Tensor int8_unpack(const at::Tensor& packed, int64_t n, int64_t k) {
  check_dtype(packed, at::kByte, "packed");
  check_contiguous(packed, "packed");
  TORCH_CHECK_VALUE(n > 0 && k > 0 && k <= int8::kMaxK, "int8_unpack: bad shape [N, K] = [", n, ", ", k, "]");
  const int64_t panels = round_up(n, kPanel) / kPanel, kp = round_up(k, int8::kAlignK);
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.size(0) == panels && packed.size(1) * kGroupK == kp &&
                        packed.size(2) == kPanel && packed.size(3) == kGroupK,
                    "packed must come from int8_prepack of an [N, K] = [", n, ", ", k, "] weight, got shape ",
                    packed.sizes());
  at::Tensor w = at::empty({n, k}, packed.options().dtype(at::kChar));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  int8_t* dst = w.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t col = c0; col < c1; ++col) {
      const int64_t p = col / kPanel, c = col % kPanel;
      for (int64_t kk = 0; kk < k; ++kk)
        dst[col * k + kk] =
            static_cast<int8_t>(src[((p * (kp / kGroupK) + kk / kGroupK) * kPanel + c) * kGroupK + kk % kGroupK] ^ 0x80);
    }
  });
  return w;
}

void check_prepacked(const at::Tensor& packed, const at::Tensor& w_scale, int64_t k) {
  check_dtype(packed, at::kByte, "packed");
  check_contiguous(packed, "packed");
  check_dtype(w_scale, at::kFloat, "w_scale");
  TORCH_CHECK_VALUE(w_scale.dim() == 1, "w_scale must be 1-D, got ", w_scale.sizes());
  const int64_t n = w_scale.size(0);
  const int64_t panels = round_up(n, kPanel) / kPanel;
  const int64_t kp = round_up(k, int8::kAlignK);
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.size(0) == panels && packed.size(1) * kGroupK == kp &&
                        packed.size(2) == kPanel && packed.size(3) == kGroupK,
                    "packed must come from int8_prepack of an [N, K] = [", n, ", ", k,
                    "] weight: expected shape (", panels, ", ", kp / kGroupK, ", ", kPanel, ", ",
                    kGroupK, "), got ", packed.sizes());
  check_same_device({{"packed", &packed}, {"w_scale", &w_scale}});
}

std::optional<at::Tensor> float_contiguous(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

// out[M, N] (row stride ldo) from the activation buffer a ([M][kp]); row_comp as in
// int8::Epilogue (used by the VNNI kernel only).
void run_gemm(Isa isa_wanted, const int8_t* a, int64_t m, int64_t kp, const at::Tensor& packed, const int32_t* row_comp,
              const float* a_scale, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
              at::Tensor& out) {
  const std::optional<at::Tensor> bf = float_contiguous(bias);
  const at::Tensor sw = w_scale.contiguous();
  const Isa isa = isa_wanted == Isa::kAmx && m < int8::kAmxMinRows ? Isa::kAvx512Vnni : isa_wanted;
  const Epilogue ep{a_scale, sw.const_data_ptr<float>(), bf ? bf->const_data_ptr<float>() : nullptr,
                    has_avx512(isa) ? row_comp : nullptr, out.mutable_data_ptr(),
                    float_type(out.scalar_type()), w_scale.size(0), w_scale.size(0)};
  const uint8_t* b = packed.const_data_ptr<uint8_t>();
  const int64_t panels = packed.size(0), chunks = (m + kRowChunk - 1) / kRowChunk;
  const bool stream = m <= int8::kAlignM;  // decode-sized: the weights stream from DRAM once
  at::parallel_for(0, panels * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / chunks, m0 = (t % chunks) * kRowChunk, m1 = std::min(m, m0 + kRowChunk);
      switch (isa) {
        case Isa::kAmx: int8::gemm_amx(a, kp, b, m0, m1, p, p + 1, ep, stream); break;
        case Isa::kAvx512Vnni: int8::gemm_avx512_vnni(a, kp, b, m0, m1, p, p + 1, ep, stream); break;
        case Isa::kAvx2: int8::gemm_avx2(a, kp, b, m0, m1, p, p + 1, ep, stream); break;
        case Isa::kScalar: int8::gemm_scalar(a, kp, b, m0, m1, p, p + 1, ep); break;
      }
    }
  });
}

std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

std::optional<float> static_scale(const at::Tensor& x, const std::optional<at::Tensor>& x_scale) {
  if (!x_scale) return std::nullopt;
  check_per_tensor_scale(x, *x_scale);
  return x_scale->item<float>();
}

at::Tensor w8a8_linear_prepacked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                                 int64_t in_features, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& x_scale, int64_t path) {
  const Path chosen = checked_path(path, Family::kInt8);
  const Isa isa = chosen == Path::kAuto ? current_isa() : int8_path_isa(chosen);
  check_activation(x, "x");
  const int64_t k = x.size(-1);
  // The packed weight's K is padded to whole blocks: only in_features tells a short input.
  TORCH_CHECK_VALUE(k == in_features, "x has K = ", k, " features but the weight has K = ", in_features);
  check_prepacked(packed, w_scale, k);
  const int64_t n = w_scale.size(0);
  check_bias(bias, n);
  check_same_device({{"x", &x}, {"packed", &packed}, {"bias", opt_ptr(bias)}});
  const std::optional<float> xs = static_scale(x, x_scale);
  const at::Tensor x2d = x.reshape({-1, k}).contiguous();
  const int64_t m = x2d.size(0), kp = packed.size(1) * kGroupK;
  at::Tensor a = at::empty({round_up(m, int8::kAlignM), kp}, x.options().dtype(at::kChar));
  a.narrow(0, m, a.size(0) - m).fill_(0);
  at::Tensor sx = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor row_comp = at::empty({m}, x.options().dtype(at::kInt));
  quantize_activations(isa, x2d, xs, kp, a.mutable_data_ptr<int8_t>(), sx.mutable_data_ptr<float>(),
                       row_comp.mutable_data_ptr<int32_t>());
  at::Tensor out = at::empty(linear_out_shape(x, n), x.options());
  run_gemm(isa, a.const_data_ptr<int8_t>(), m, kp, packed, row_comp.const_data_ptr<int32_t>(), sx.const_data_ptr<float>(),
           w_scale, bias, out);
  return out;
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& x_scale) {
  check_int8_linear(x, w, w_scale, bias);
  return w8a8_linear_prepacked(x, int8_prepack(w), w_scale, w.size(1), bias, x_scale,
                               static_cast<int64_t>(Path::kAuto));
}

at::Tensor int8_scaled_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype) {
  check_int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype);
  const at::Tensor packed = int8_prepack(b);
  const int64_t m = a.size(0), k = a.size(1), kp = packed.size(1) * kGroupK;
  // The activations in the kernels' zero-padded buffer, with their row sums.
  const at::Tensor ac = a.contiguous();
  at::Tensor buf = at::empty({round_up(m, int8::kAlignM), kp}, a.options());
  buf.narrow(0, m, buf.size(0) - m).fill_(0);
  std::vector<int32_t> row_comp(m);
  const int8_t* src = ac.const_data_ptr<int8_t>();
  int8_t* dst = buf.mutable_data_ptr<int8_t>();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int32_t sum = 0;
      for (int64_t j = 0; j < kp; ++j) {
        dst[r * kp + j] = j < k ? src[r * k + j] : 0;
        sum += dst[r * kp + j];
      }
      row_comp[r] = 128 * sum;
    }
  });
  const at::Tensor sa = a_scale.contiguous();
  at::Tensor out = at::empty({m, b.size(0)}, a.options().dtype(out_dtype));
  run_gemm(current_isa(), buf.const_data_ptr<int8_t>(), m, kp, packed, row_comp.data(), sa.const_data_ptr<float>(), b_scale, bias,
           out);
  return out;
}

}  // namespace

void quantize_activations(Isa isa, const at::Tensor& x2d, std::optional<float> static_scale, int64_t kp, int8_t* a,
                          float* scale, int32_t* row_comp) {
  const int64_t m = x2d.size(0), k = x2d.size(1);
  if (!static_scale && has_avx512(isa)) {
    const void* x = x2d.const_data_ptr();
    const FloatType type = float_type(x2d.scalar_type());
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
      int8::quantize_rows_avx512(x, type, k, r0, r1, k, kp, a, scale, row_comp);
    });
    return;
  }
  if (static_scale) {
    quantize_rows_static(x2d, *static_scale, a, kp);
    std::fill(scale, scale + m, *static_scale);
  } else {
    quantize_rows_dynamic(x2d, a, kp, scale);
  }
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int8_t* row = a + r * kp;
      std::fill(row + k, row + kp, 0);
      if (row_comp) {
        int32_t sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += row[j];
        row_comp[r] = 128 * sum;
      }
    }
  });
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_prepack", &int8_prepack);
  m.impl("int8_unpack", &int8_unpack);
  m.impl("w8a8_linear_prepacked", &w8a8_linear_prepacked);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("int8_scaled_mm", &int8_scaled_mm);
}

}  // namespace lowbit::cpu
