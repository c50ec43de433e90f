// CPU weight-only linear ops (W4A16, W8A16): prepacking into the layouts of wo_gemm.h,
// the portable kernels, and the driver that splits (panel, row chunk) tasks over ATen's
// threads and picks the AVX-512, the AVX2 or the portable kernels. The canonical-format ops
// (w4a16_linear, w8a16_linear) prepack per call and share the same path.
#include "cpu/wo_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/paths.h"

namespace lowbit::cpu {

using wo::kBlockK;
using wo::kPanel;
using wo::kRowChunk;
using wo::Panel;
using wo::Weights;

namespace wo {

// The byte of a k-pair block that holds column c (0..63) at k parity t (wo_gemm.h).
inline int64_t int4_byte(int64_t c, int64_t t) { return 32 * (c / 32) + 2 * (c % 16) + t; }

void dequantize_block_scalar(const Panel& panel, int64_t k0, int64_t k1, float* out) {
  for (int64_t k = k0; k < k1; ++k) {
    float* o = out + (k - k0) * kPanel;
    if (panel.kind == Weights::kInt4) {
      const uint8_t* pair = panel.w + (k / 2) * kPanel;
      const float* s = panel.scales(k / panel.group_size);
      const uint8_t* z = panel.zeros(k / panel.group_size);
      for (int64_t c = 0; c < kPanel; ++c) {
        const uint8_t byte = pair[int4_byte(c, k % 2)];
        const float q = static_cast<float>(c % 32 < 16 ? byte & 0x0F : byte >> 4);
        o[c] = (q - static_cast<float>(z[c])) * s[c];
      }
    } else {
      const int8_t* w = reinterpret_cast<const int8_t*>(panel.w) + k * kPanel;
      const float* s = panel.scales();
      for (int64_t c = 0; c < kPanel; ++c) o[c] = static_cast<float>(w[c]) * s[c];
    }
  }
}

bool to_block_fixed_scalar(const float* x, int64_t k, int64_t chunk, int8_t* digits, int64_t kpad,
                           FixedChunk* chunks) {
  for (int64_t k0 = 0, ci = 0; k0 < k; k0 += chunk, ++ci) {
    const int64_t k1 = std::min(k, k0 + chunk);
    float amax = 0;
    for (int64_t i = k0; i < k1; ++i) {
      if (!std::isfinite(x[i])) return false;
      amax = std::max(amax, std::fabs(x[i]));
    }
    int top;
    std::frexp(amax, &top);
    const int e = std::max(top - 22, -149);  // as to_block_fixed_avx512: |X| below 2^22
    int32_t sum[3] = {0, 0, 0};
    for (int64_t i = k0; i < k1; ++i) {
      const auto big = static_cast<int32_t>(std::nearbyint(std::ldexp(x[i], -e)));  // nearest even
      const auto d0 = static_cast<int8_t>(big & 0xFF);
      const int32_t mid = (big - d0) >> 8;
      const auto d1 = static_cast<int8_t>(mid & 0xFF);
      const auto d2 = static_cast<int8_t>((mid - d1) >> 8);
      const int8_t d[3] = {d0, d1, d2};
      for (int p = 0; p < 3; ++p) {
        digits[p * kpad + i] = d[p];
        sum[p] += d[p];
      }
    }
    for (int p = 0; p < 3; ++p) {
      chunks[ci].digit_sum[p] = static_cast<float>(sum[p]);
      chunks[ci].unit[p] = std::ldexp(1.0f, e + 8 * p);
    }
  }
  for (int p = 0; p < 3; ++p) std::fill(digits + p * kpad + k, digits + (p + 1) * kpad, int8_t{0});
  return true;
}

void block_gemm_scalar(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                       bool zero_init) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * kPanel;
    if (zero_init) std::fill(cr, cr + kPanel, 0.0f);
    for (int64_t k = 0; k < kb; ++k) {
      const float xv = x[r * ldx + k];
      const float* b = block + k * kPanel;
#pragma omp simd
      for (int64_t j = 0; j < kPanel; ++j) cr[j] += xv * b[j];
    }
  }
}

}  // namespace wo

namespace {

int64_t panels_for(int64_t n) { return (n + kPanel - 1) / kPanel; }


std::tuple<at::Tensor, at::Tensor> w4a16_prepack(const at::Tensor& packed, const at::Tensor& scales,
                                                 const std::optional<at::Tensor>& zeros, int64_t group_size) {
  check_int4_weight(packed, scales, zeros, group_size);
  const int64_t n = packed.size(0), k = packed.size(1) * 2, groups = k / group_size, panels = panels_for(n);
  at::Tensor w = at::zeros({panels, k / 2, kPanel}, packed.options());
  // Padding columns get scale 1 and zero point 0: they dequantize to 0.
  at::Tensor params = at::empty({panels, groups, wo::kInt4GroupBytes}, packed.options());
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  const float* sp = scales.const_data_ptr<float>();
  const uint8_t* zp = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  uint8_t* dst = w.mutable_data_ptr<uint8_t>();
  uint8_t* pp = params.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = p * kPanel + c;
        for (int64_t g = 0; g < groups; ++g) {
          uint8_t* gp = pp + (p * groups + g) * wo::kInt4GroupBytes;
          reinterpret_cast<float*>(gp)[c] = col < n ? sp[col * groups + g] : 1.0f;
          gp[kPanel * sizeof(float) + c] = col < n ? (zp ? zp[col * groups + g] : uint8_t{8}) : uint8_t{0};
        }
        if (col >= n) continue;
        for (int64_t kk = 0; kk < k; ++kk) {
          const uint8_t byte = src[col * (k / 2) + kk / 2];
          const uint8_t q = kk % 2 ? byte >> 4 : byte & 0x0F;
          dst[(p * (k / 2) + kk / 2) * kPanel + wo::int4_byte(c, kk % 2)] |=
              static_cast<uint8_t>(c % 32 < 16 ? q : q << 4);
        }
      }
    }
  });
  return {w, params};
}

at::Tensor w8a16_prepack(const at::Tensor& w) {
  check_matrix(w, at::kChar, "w");
  check_contiguous(w, "w");
  const int64_t n = w.size(0), k = w.size(1), panels = panels_for(n);
  at::Tensor out = at::zeros({panels, k, kPanel}, w.options());
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c)
        for (int64_t kk = 0; kk < k; ++kk) dst[(p * k + kk) * kPanel + c] = src[(p * kPanel + c) * k + kk];
  });
  return out;
}

// The exact inverse of w4a16_prepack: (packed uint8[N, K/2], scales float32[N, K/G], zeros
// uint8[N, K/G]). Symmetric weights come back with their implicit zero point 8 stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor> w4a16_unpack(const at::Tensor& w, const at::Tensor& params,
                                                            int64_t group_size, int64_t n) {
  check_dtype(w, at::kByte, "w");
  check_dtype(params, at::kByte, "params");
  check_contiguous(w, "w");
  check_contiguous(params, "params");
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == panels_for(n) && w.size(2) == kPanel,
                    "w must come from w4a16_prepack of a weight with N = ", n, ", got shape ", w.sizes());
  const int64_t k = w.size(1) * 2, panels = w.size(0);
  check_group_size(group_size, k);
  const int64_t groups = k / group_size;
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(0) == panels && params.size(1) == groups &&
                        params.size(2) == wo::kInt4GroupBytes,
                    "params must come from w4a16_prepack with group_size ", group_size, ", got shape ", params.sizes());
  at::Tensor packed = at::empty({n, k / 2}, w.options());
  at::Tensor scales = at::empty({n, groups}, w.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({n, groups}, w.options());
  const uint8_t* src = w.const_data_ptr<uint8_t>();
  const uint8_t* pp = params.const_data_ptr<uint8_t>();
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  float* sp = scales.mutable_data_ptr<float>();
  uint8_t* zp = zeros.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t col = c0; col < c1; ++col) {
      const int64_t p = col / kPanel, c = col % kPanel;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* gp = pp + (p * groups + g) * wo::kInt4GroupBytes;
        sp[col * groups + g] = reinterpret_cast<const float*>(gp)[c];
        zp[col * groups + g] = gp[kPanel * sizeof(float) + c];
      }
      for (int64_t kk = 0; kk < k; kk += 2) {
        uint8_t pair = 0;
        for (int64_t t = 0; t < 2; ++t) {
          const uint8_t byte = src[(p * (k / 2) + kk / 2) * kPanel + wo::int4_byte(c, t)];
          pair |= static_cast<uint8_t>((c % 32 < 16 ? byte & 0x0F : byte >> 4) << (4 * t));
        }
        dst[col * (k / 2) + kk / 2] = pair;
      }
    }
  });
  return {packed, scales, zeros};
}

// The exact inverse of w8a16_prepack: the int8[N, K] weight.
at::Tensor w8a16_unpack(const at::Tensor& w, int64_t n) {
  check_dtype(w, at::kChar, "w");
  check_contiguous(w, "w");
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == panels_for(n) && w.size(2) == kPanel,
                    "w must come from w8a16_prepack of a weight with N = ", n, ", got shape ", w.sizes());
  const int64_t k = w.size(1);
  at::Tensor out = at::empty({n, k}, w.options());
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = out.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t col = c0; col < c1; ++col)
      for (int64_t kk = 0; kk < k; ++kk) dst[col * k + kk] = src[((col / kPanel) * k + kk) * kPanel + col % kPanel];
  });
  return out;
}

// out = (x @ dequant(w)^T + bias) as x's dtype; panel_fn(p, m0, rows, c) writes the
// fp32 product of activation rows [m0, m0 + rows) and panel p into c[rows][64]. Tasks are
// (panel, row_chunk rows); c holds row_chunk rows, which may exceed rows (padding).
// avx512: write the output with wo::store_panel_avx512 (float, bf16, fp16 outputs).
template <typename PanelFn>
at::Tensor run_panels(const at::Tensor& x, int64_t m, int64_t n, const std::optional<at::Tensor>& bias,
                      bool avx512, PanelFn panel_fn, int64_t row_chunk = kRowChunk) {
  const int64_t panels = panels_for(n), chunks = (m + row_chunk - 1) / row_chunk;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  const std::optional<at::Tensor> bf = bias ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  const float* bp = bf ? bf->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "weight_only_linear", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, panels * chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> c(row_chunk * kPanel);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t % panels, m0 = (t / panels) * row_chunk, rows = std::min(m, m0 + row_chunk) - m0;
        panel_fn(p, m0, rows, c.data());
        const int64_t cols = std::min(n, (p + 1) * kPanel) - p * kPanel;
        if (avx512 && !std::is_same_v<scalar_t, double>) {
          const wo::OutType type = std::is_same_v<scalar_t, float>       ? wo::OutType::kFloat
                                   : std::is_same_v<scalar_t, at::Half> ? wo::OutType::kHalf
                                                                         : wo::OutType::kBFloat16;
          wo::store_panel_avx512(c.data(), rows, cols, bp ? bp + p * kPanel : nullptr, type,
                                 op + m0 * n + p * kPanel, n);
          continue;
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t col = p * kPanel; col < p * kPanel + cols; ++col) {
            float y = c[r * kPanel + col - p * kPanel];
            if (bp) y = y + bp[col];
            op[(m0 + r) * n + col] = static_cast<scalar_t>(y);
          }
      }
    });
  });
  return out;
}

// Activations of any float dtype, widened to fp32 once per row, times the int4 or int8 panels
// from panel_at(p), with AVX-512 or AVX2 vectors (the current ISA's, or the path's): in
// registers from the packed bytes up to kMaxGemvRows (AVX2: kMaxGemvRowsAvx2) rows, else through
// dequantized fp32 blocks. `path` is checked (checked_path); kWoAmx and kWoBf16 are taken before this.
template <typename PanelAt>
at::Tensor run_weight_only(const at::Tensor& x, int64_t n, const std::optional<at::Tensor>& bias, Path path,
                           PanelAt panel_at) {
  const Panel first = panel_at(0);
  if (path == Path::kWoGemvVnni) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "path gemv_vnni multiplies bf16 activations; x is ",
                     x.scalar_type());
  }
  const int64_t k = x.size(-1);
  const at::Tensor xf = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const float* xp = xf.const_data_ptr<float>();
  // Which vector width runs the FMA kernels: the current ISA's widest (kAuto), or the path's.
  const bool avx2_path = path == Path::kWoGemmAvx2 || path == Path::kWoGemvAvx2 || path == Path::kWoGemvIntAvx2;
  const Isa isa = current_isa();
  const bool avx512 = path == Path::kAuto ? has_avx512(isa) : path != Path::kWoScalar && !avx2_path;
  const bool avx2 = avx2_path || (path == Path::kAuto && isa == Isa::kAvx2);
  const int64_t m = xf.size(0);
  const bool int4 = first.kind == Weights::kInt4;
  const bool vnni = path == Path::kWoGemvVnni || (path == Path::kAuto && avx512 && x.scalar_type() == at::kBFloat16 &&
                                               m <= (int4 ? wo::kVnniMaxRows : wo::kVnniMaxRowsInt8));
  // AVX2's integer GEMV: int4 groups of at most one chunk, bf16 rows.
  if (path == Path::kWoGemvIntAvx2) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "path gemv_int_avx2 multiplies bf16 activations; x is ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(int4 && first.group_size <= wo::kVnniChunkK,
                      "path gemv_int_avx2 takes int4 weights in groups of at most ", wo::kVnniChunkK, " k");
  }
  const bool int_avx2 = path == Path::kWoGemvIntAvx2 ||
                        (path == Path::kAuto && avx2 && int4 && x.scalar_type() == at::kBFloat16 &&
                         first.group_size <= wo::kVnniChunkK && m <= wo::kIntMaxRowsAvx2);
  const bool gemv = vnni || int_avx2 || path == Path::kWoGemv || path == Path::kWoGemvAvx2 ||
                    (path == Path::kAuto && avx512 && m <= wo::kMaxGemvRows) ||
                    (path == Path::kAuto && avx2 && m <= wo::kMaxGemvRowsAvx2);
  // The integer GEMVs' rows in block floating point (wo_gemm.h); a row holding NaN or Inf
  // has no such form and goes through the FMA GEMV, which propagates them as the reference.
  const bool fixed_rows = vnni || int_avx2;
  const int64_t kpad = (k + 3) / 4 * 4, chunk = int4 ? std::min(first.group_size, wo::kVnniChunkK) : wo::kVnniChunkK8,
                chunks = fixed_rows ? (k + chunk - 1) / chunk : 0;
  at::Tensor digits;
  std::vector<wo::FixedChunk> fixed(m * chunks);
  std::vector<uint8_t> finite(fixed_rows ? m : 0);
  if (fixed_rows) {
    digits = at::empty({m, 3, kpad}, xf.options().dtype(at::kChar));
    int8_t* dp = digits.mutable_data_ptr<int8_t>();
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        finite[r] = vnni ? wo::to_block_fixed_avx512(xp + r * k, k, chunk, dp + r * 3 * kpad, kpad, &fixed[r * chunks])
                         : wo::to_block_fixed_scalar(xp + r * k, k, chunk, dp + r * 3 * kpad, kpad, &fixed[r * chunks]);
    });
  }
  const bool all_fixed = std::all_of(finite.begin(), finite.end(), [](uint8_t f) { return f != 0; });
  // Group sums of the activations, for the FMA int4 GEMV's zero points.
  at::Tensor xsum;
  if (gemv && int4 && !(fixed_rows && all_fixed))
    xsum = xf.view({m, k / first.group_size, first.group_size}).sum(-1).contiguous();
  return run_panels(x, m, n, bias, avx512, [&](int64_t p, int64_t m0, int64_t rows, float* c) {
    const Panel panel = panel_at(p);
    if (int_avx2) {
      for (int64_t r = m0; r < m0 + rows; ++r) {
        float* cr = c + (r - m0) * kPanel;
        if (finite[r])
          wo::gemv_int4_int_avx2(digits.const_data_ptr<int8_t>() + r * 3 * kpad, kpad, &fixed[r * chunks], panel, cr);
        else
          wo::gemv_int4_avx2(xp + r * k, k, 1, xsum.const_data_ptr<float>() + r * (k / panel.group_size), panel, cr);
      }
      return;
    }
    if (vnni) {
      // Whole tiles of rows through the int4 kernel when they are all finite.
      const bool tile = int4 && std::all_of(finite.begin() + m0, finite.begin() + m0 + rows, [](uint8_t f) { return f; });
      for (int64_t r = 0; tile && r < rows; r += wo::kVnniTileRows)
        wo::gemv_int4_vnni_avx512(digits.const_data_ptr<int8_t>() + (m0 + r) * 3 * kpad, kpad, &fixed[(m0 + r) * chunks],
                                  chunk, std::min(wo::kVnniTileRows, rows - r), panel, c + r * kPanel);
      for (int64_t r = m0; !tile && r < m0 + rows; ++r) {
        float* cr = c + (r - m0) * kPanel;
        const int8_t* dr = digits.const_data_ptr<int8_t>() + r * 3 * kpad;
        if (finite[r] && int4)
          wo::gemv_int4_vnni_avx512(dr, kpad, &fixed[r * chunks], chunk, 1, panel, cr);
        else if (finite[r])
          wo::gemv_int8_vnni_avx512(dr, kpad, &fixed[r * chunks], panel, cr);
        else if (int4)
          wo::gemv_int4_avx512(xp + r * k, k, 1, xsum.const_data_ptr<float>() + r * (k / panel.group_size), panel, cr);
        else
          wo::gemv_int8_avx512(xp + r * k, k, 1, panel, cr);
      }
      return;
    }
    if (gemv) {
      for (int64_t r = 0; r < rows; r += wo::kMaxGemvRows) {
        const int64_t sub = std::min(wo::kMaxGemvRows, rows - r);
        const float* xr = xp + (m0 + r) * k;
        float* cr = c + r * kPanel;
        if (panel.kind == Weights::kInt8) {
          if (avx2) wo::gemv_int8_avx2(xr, k, sub, panel, cr);
          else wo::gemv_int8_avx512(xr, k, sub, panel, cr);
        } else {
          const float* xs = xsum.const_data_ptr<float>() + (m0 + r) * (k / panel.group_size);
          if (avx2) wo::gemv_int4_avx2(xr, k, sub, xs, panel, cr);
          else wo::gemv_int4_avx512(xr, k, sub, xs, panel, cr);
        }
      }
      return;
    }
    std::vector<float> block(kBlockK * kPanel);
    for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
      const int64_t k1 = std::min(k, k0 + kBlockK);
      if (avx512) {
        wo::dequantize_block_avx512(panel, k0, k1, block.data());
        wo::block_gemm_avx512(xp + m0 * k + k0, k, rows, block.data(), k1 - k0, c, k0 == 0);
      } else if (avx2) {
        wo::dequantize_block_avx2(panel, k0, k1, block.data());
        wo::block_gemm_avx2(xp + m0 * k + k0, k, rows, block.data(), k1 - k0, c, k0 == 0);
      } else {
        wo::dequantize_block_scalar(panel, k0, k1, block.data());
        wo::block_gemm_scalar(xp + m0 * k + k0, k, rows, block.data(), k1 - k0, c, k0 == 0);
      }
    }
  });
}

// The kernels that multiply bf16 activations by weights decoded to bf16.
enum class Decoded { kNone, kAmx, kBf16 };

// Whether a weight-only call runs on a decoded-bf16 kernel, and which: asked for (kWoAmx or
// kWoBf16, which checked_path has checked against the CPU), or chosen (kAuto) for bf16
// activations from a number of rows on: AMX when it is current (wo::kAmxMinRowsInt4 /
// Int8), else AVX512-BF16 when the CPU has it and the ISA in force is AVX-512
// (wo::kBf16MinRowsInt4 / Int8). group: the quantization group size (K for int8); both
// take k in blocks that end at multiples of 32.
Decoded takes_decoded(const at::Tensor& x, Path path, int64_t group, bool int4) {
  if (path == Path::kWoAmx || path == Path::kWoBf16) {
    const char* name = path_info(path).name;
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, "path ", name, " multiplies bf16 activations; x is ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(group % 32 == 0, "path ", name, " needs a group size (K for int8 weights) that is a multiple ",
                      "of 32, got ", group);
    return path == Path::kWoAmx ? Decoded::kAmx : Decoded::kBf16;
  }
  if (path != Path::kAuto || x.scalar_type() != at::kBFloat16 || group % 32) return Decoded::kNone;
  const int64_t k = x.size(-1), m = k ? x.numel() / k : 0;
  if (current_isa() == Isa::kAmx && has_amx_bf16())
    return m >= (int4 ? wo::kAmxMinRowsInt4 : wo::kAmxMinRowsInt8) ? Decoded::kAmx : Decoded::kNone;
  if (has_avx512(current_isa()) && has_avx512_bf16())
    return m >= (int4 ? wo::kBf16MinRowsInt4 : wo::kBf16MinRowsInt8) ? Decoded::kBf16 : Decoded::kNone;
  return Decoded::kNone;
}

// Weight-only on weights decoded to bf16 (wo_gemm_amx.cpp, wo_gemm_bf16.cpp): one task per
// panel over all rows, so that each panel is decoded once per call. On AMX up to
// wo::kAmxSmallRows rows, block by block into L1; beyond (and always for AVX512-BF16),
// tasks of (panel, wo::kAmxRowChunk rows), each decoding the panel chunk by chunk of k
// (wo_gemm.h), rows padded to whole tiles of 16 for AMX.
template <typename PanelAt>
at::Tensor run_decoded(const at::Tensor& x, int64_t n, const std::optional<at::Tensor>& bias, PanelAt panel_at,
                       Decoded kernel) {
  const bool amx = kernel == Decoded::kAmx;
  const int64_t k = x.size(-1);
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0), tile = amx ? 16 : 1, mp = (m + tile - 1) / tile * tile;
  if (amx && m <= wo::kAmxSmallRows) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.const_data_ptr<at::BFloat16>());
    return run_panels(x, m, n, bias, /*avx512=*/true, [&](int64_t p, int64_t, int64_t rows, float* c) {
      wo::gemv_amx_bf16(xp, k, rows, panel_at(p), c);
    }, wo::kAmxSmallRows);
  }
  if (mp != m) {
    at::Tensor padded = at::zeros({mp, k}, x2.options());
    padded.narrow(0, 0, m).copy_(x2);
    x2 = padded;
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.const_data_ptr<at::BFloat16>());
  // Tasks of (panel, kAmxRowChunk rows): the padding rows land in c and are not written.
  const int64_t chunk = std::min(mp, wo::kAmxRowChunk);
  return run_panels(x, m, n, bias, /*avx512=*/true, [&](int64_t p, int64_t m0, int64_t rows, float* c) {
    thread_local std::vector<uint16_t> b;  // a decoded chunk of the panel, reused across calls
    b.resize(std::min(k, wo::kAmxChunkK) * kPanel);
    const Panel panel = panel_at(p);
    const bool int4 = panel.kind == Weights::kInt4;
    // int8: one "group" of all K, the same 64 scales throughout.
    const int64_t group = int4 ? panel.group_size : k, scale_stride = int4 ? wo::kInt4GroupFloats : 0;
    const int64_t rows_p = (rows + tile - 1) / tile * tile;
    for (int64_t k0 = 0; k0 < k; k0 += wo::kAmxChunkK) {
      const int64_t k1 = std::min(k, k0 + wo::kAmxChunkK);
      if (int4)
        wo::decode_int4_panel_bf16(panel, k0, k1, b.data());
      else
        wo::decode_int8_panel_bf16(panel, k0, k1, b.data());
      if (amx)
        wo::gemm_amx_bf16(xp + m0 * k, k, rows_p, b.data(), k0, k1, group, panel.scales(), scale_stride, c);
      else
        wo::gemm_bf16_avx512(xp + m0 * k, k, rows_p, b.data(), k0, k1, group, panel.scales(), scale_stride, c);
    }
  }, chunk);
}

// pairs: the weight has one row per k pair (int4) rather than per k (int8).
void check_prepacked_x(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& bias,
                       bool pairs) {
  check_activation(x, "x");
  const int64_t k = x.size(-1), rows = pairs ? k / 2 : k;
  TORCH_CHECK_VALUE(w.dim() != 3 || w.size(1) * (pairs ? 2 : 1) == k, "x has K = ", k,
                    " features but the weight has K = ", w.size(1) * (pairs ? 2 : 1));
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == panels_for(n) && w.size(1) == rows && w.size(2) == kPanel,
                    "w must be the prepacked weight of an [N, K] = [", n, ", ", k,
                    "] layer: expected shape (", panels_for(n), ", ", rows, ", ", kPanel, "), got ", w.sizes());
  check_contiguous(w, "w");
  check_bias(bias, n);
  check_same_device({{"x", &x}, {"w", &w}, {"bias", opt_ptr(bias)}});
}

at::Tensor w4a16_linear_prepacked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& params,
                                  int64_t group_size, int64_t out_features, const std::optional<at::Tensor>& bias,
                                  int64_t path_id) {
  const Path path = checked_path(path_id, Family::kWeightOnly);
  check_dtype(w, at::kByte, "w");
  check_prepacked_x(x, w, out_features, bias, /*pairs=*/true);
  const int64_t k = x.size(-1);
  check_group_size(group_size, k);
  check_dtype(params, at::kByte, "params");
  TORCH_CHECK_VALUE(params.dim() == 3 && params.size(0) == w.size(0) && params.size(1) == k / group_size &&
                        params.size(2) == wo::kInt4GroupBytes,
                    "params must come from w4a16_prepack with group_size ", group_size, ", got shape ",
                    params.sizes());
  check_contiguous(params, "params");
  check_same_device({{"w", &w}, {"params", &params}});
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  const uint8_t* pp = params.const_data_ptr<uint8_t>();
  const int64_t groups = k / group_size;
  const auto panel_at = [&](int64_t p) {
    return Panel{Weights::kInt4, wp + p * k * kPanel / 2, pp + p * groups * wo::kInt4GroupBytes, group_size, k};
  };
  const Decoded decoded = takes_decoded(x, path, group_size, /*int4=*/true);
  if (decoded != Decoded::kNone) return run_decoded(x, out_features, bias, panel_at, decoded);
  return run_weight_only(x, out_features, bias, path, panel_at);
}

at::Tensor w8a16_linear_prepacked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias, int64_t path_id) {
  const Path path = checked_path(path_id, Family::kWeightOnly);
  check_activation(x, "x");
  check_dtype(w, at::kChar, "w");
  check_dtype(w_scale, at::kFloat, "w_scale");
  TORCH_CHECK_VALUE(w_scale.dim() == 1, "w_scale must be 1-D, got ", w_scale.sizes());
  const int64_t n = w_scale.size(0), k = x.size(-1);
  check_prepacked_x(x, w, n, bias, /*pairs=*/false);
  check_same_device({{"w", &w}, {"w_scale", &w_scale}});
  // Scales padded to whole panels (padding columns have zero weights).
  at::Tensor scales = at::zeros({panels_for(n) * kPanel}, w_scale.options());
  scales.narrow(0, 0, n).copy_(w_scale);
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(w.const_data_ptr<int8_t>());
  const uint8_t* sp = reinterpret_cast<const uint8_t*>(scales.const_data_ptr<float>());
  const auto panel_at = [&](int64_t p) {
    return Panel{Weights::kInt8, wp + p * k * kPanel, sp + p * kPanel * sizeof(float), 0, k};
  };
  const Decoded decoded = takes_decoded(x, path, k, /*int4=*/false);
  if (decoded != Decoded::kNone) return run_decoded(x, n, bias, panel_at, decoded);
  return run_weight_only(x, n, bias, path, panel_at);
}

at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                        const std::optional<at::Tensor>& bias) {
  check_int8_linear(x, w, w_scale, bias);
  return w8a16_linear_prepacked(x, w8a16_prepack(w), w_scale, bias, static_cast<int64_t>(Path::kAuto));
}

at::Tensor w4a16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t group_size,
                        const std::optional<at::Tensor>& bias) {
  check_int4_linear(x, packed, scales, zeros, group_size, bias);
  const auto [w, params] = w4a16_prepack(packed, scales, zeros, group_size);
  return w4a16_linear_prepacked(x, w, params, group_size, packed.size(0), bias, static_cast<int64_t>(Path::kAuto));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("w4a16_prepack", &w4a16_prepack);
  m.impl("w4a16_unpack", &w4a16_unpack);
  m.impl("w4a16_linear_prepacked", &w4a16_linear_prepacked);
  m.impl("w8a16_prepack", &w8a16_prepack);
  m.impl("w8a16_unpack", &w8a16_unpack);
  m.impl("w8a16_linear_prepacked", &w8a16_linear_prepacked);
  m.impl("w8a16_linear", &w8a16_linear);
  m.impl("w4a16_linear", &w4a16_linear);
}

}  // namespace lowbit::cpu
