// AVX-512 VNNI int8 GEMM micro-kernel, its epilogue, and the activation quantizer.
//
// Micro-kernel: MR (1..6) rows of signed activations x one 64-column weight panel (unsigned,
// shifted by 128). Per group of 4 k it loads the panel's four 64-byte vectors (16 columns
// x 4 k each) and issues MR x 4 vpdpbusd whose signed operand is each row's 4 activation
// bytes broadcast from memory (vpbroadcastd m32: a load-port uop only), into MR x 4 int32
// accumulators (24 zmm at MR = 6).
// The panel (64 x K bytes, 256 KiB at K = 4096) stays in L2 while the driver walks all
// rows over it, in k blocks of 16 KiB that stay in L1 while every row tile of the chunk
// (up to kRowChunk rows) passes over them; the int32 partial sums of the chunk wait in a
// small buffer between blocks. With one row, the four accumulator chains would wait on
// vpdpbusd's latency, so MR = 1 and 2 alternate two accumulator sets over k groups.
//
// Epilogue, vectorized 16 columns at a time, in the reference's order:
// float(acc - row_comp[m]) * a_scale[m] * b_scale[n] + bias[n] (separate roundings, no FMA),
// then rounded to bf16 (round half to even, in integer arithmetic so that no BF16
// instruction is needed) or fp16 (vcvtps2ph, round to nearest even) under a column mask.
//
// Limits: K <= 65536 (int32 accumulators of 255 * 127 * K), weights from int8_prepack.
#include <immintrin.h>

#include <cstring>

#include "cpu/int8_gemm.h"
#include "cpu/prefetch.h"

namespace lowbit::cpu::int8 {
namespace {

constexpr int kMaxRows = 6;
// k groups per block: the panel's block (64 x 4 x 64 = 16 KiB) stays in L1 while every row
// tile of the chunk passes over it.
constexpr int64_t kBlockSteps = 64;

__mmask16 column_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// fp32 -> bf16 bits, round half to even; NaN -> quiet NaN (as c10::BFloat16 does).
__m256i to_bf16(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __m512i out = _mm512_srli_epi32(rounded, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  out = _mm512_mask_mov_epi32(out, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(out);
}

void store_row(__m512 f, const Epilogue& ep, int64_t m, int64_t c, __mmask16 mask) {
  switch (ep.out_type) {
    case FloatType::kF32:
      _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + m * ep.ldo + c, mask, f);
      break;
    case FloatType::kBF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + m * ep.ldo + c, mask, to_bf16(f));
      break;
    case FloatType::kF16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + m * ep.ldo + c, mask,
                               _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
  }
}

}  // namespace

// acc: rows x 64 int32 accumulators (row-major).
void store_tile_avx512(const int32_t* acc, int rows, int64_t m0, int64_t c0, const Epilogue& ep) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + 16 * j;
    if (c >= ep.n) break;
    const __mmask16 mask = column_mask(ep.n - c);
    const __m512 sb = _mm512_maskz_loadu_ps(mask, ep.b_scale + c);
    const __m512 bias = ep.bias ? _mm512_maskz_loadu_ps(mask, ep.bias + c) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m512i comp = _mm512_set1_epi32(ep.row_comp ? ep.row_comp[m0 + r] : 0);
      __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + r * kPanel + 16 * j), comp));
      f = _mm512_mul_ps(f, _mm512_set1_ps(ep.a_scale[m0 + r]));
      f = _mm512_mul_ps(f, sb);
      if (ep.bias) f = _mm512_add_ps(f, bias);
      store_row(f, ep, m0 + r, c, mask);
    }
  }
}

namespace {

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[r][0..3] += rows m0..m0+MR of A times k groups [s0, s1) of the panel; acc lives in
// cbuf (MR x 64 int32) between k blocks and starts from zero at s0 == 0. `stream`: this
// tile is the first to read these weights (the next row tiles find them in cache), so it
// moves the weights' DRAM streams on, a line per 256 bytes (prefetch.h).
template <int MR>
void tile(const int8_t* a, int64_t kp, const uint8_t* panel, int64_t m0, int64_t s0, int64_t s1, int32_t* cbuf,
          bool stream) {
  __m512i acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      acc[r][j] = s0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(cbuf + r * kPanel + 16 * j);
  int64_t s = s0;
  if constexpr (MR <= 2) {
    // A second accumulator set over odd k groups hides vpdpbusd's latency.
    __m512i odd[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) odd[r][j] = _mm512_setzero_si512();
    for (; s + 1 < s1; s += 2) {
      const uint8_t* b = panel + s * kPanel * kGroupK;
      if (stream) {
        prefetch_streams(b);
        prefetch_streams(b + 256);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512i a0 = bcast4(a + (m0 + r) * kp + s * kGroupK);
        const __m512i a1 = bcast4(a + (m0 + r) * kp + (s + 1) * kGroupK);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], _mm512_loadu_si512(b + 64 * j), a0);
          odd[r][j] = _mm512_dpbusd_epi32(odd[r][j], _mm512_loadu_si512(b + 256 + 64 * j), a1);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_add_epi32(acc[r][j], odd[r][j]);
  }
  for (; s < s1; ++s) {
    const uint8_t* b = panel + s * kPanel * kGroupK;
    if (stream) prefetch_streams(b);
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = bcast4(a + (m0 + r) * kp + s * kGroupK);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, av);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, av);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], b2, av);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], b3, av);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_si512(cbuf + r * kPanel + 16 * j, acc[r][j]);
}

using TileFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int32_t*, bool);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

__m512 load_floats(const void* x, FloatType type, int64_t i, __mmask16 mask) {
  switch (type) {
    case FloatType::kF32:
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + i);
    case FloatType::kBF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case FloatType::kF16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + i));
  }
  return _mm512_setzero_ps();
}

}  // namespace

void gemm_avx512_vnni(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
                      int64_t p1, const Epilogue& ep, bool stream) {
  alignas(64) int32_t cbuf[kRowChunk * kPanel];
  const int64_t steps = kp / kGroupK;
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * kp * kPanel;
    for (int64_t s0 = 0; s0 < steps; s0 += kBlockSteps) {
      const int64_t s1 = s0 + kBlockSteps < steps ? s0 + kBlockSteps : steps;
      for (int64_t m = m0; m < m1; m += kMaxRows) {
        const int rows = static_cast<int>(m1 - m < kMaxRows ? m1 - m : kMaxRows);
        kTiles[rows](a, kp, panel, m, s0, s1, cbuf + (m - m0) * kPanel, stream && m == m0);
      }
    }
    store_tile_avx512(cbuf, static_cast<int>(m1 - m0), m0, p * kPanel, ep);
  }
}

void quantize_rows_avx512(const void* x, FloatType type, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                          int64_t kp, int8_t* a, float* scale, int32_t* row_comp) {
  const size_t elem = type == FloatType::kF32 ? 4 : 2;
  for (int64_t m = m0; m < m1; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * elem;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 v = load_floats(row, type, i, column_mask(k - i));
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float s = _mm512_reduce_max_ps(amax) / 127.0f;
    if (nan) s = __builtin_nanf("");
    if (s == 0.0f) s = 1.0f;
    scale[m] = s;
    const __m512 sv = _mm512_set1_ps(s);
    __m512i sum = _mm512_setzero_si512();
    int8_t* out = a + m * kp;
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 mask = column_mask(k - i);
      __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load_floats(row, type, i, mask), sv),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __mmask16 q_nan = _mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q);  // before max/min drop it
      q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
      q = _mm512_mask_mov_ps(q, q_nan, _mm512_setzero_ps());
      const __m512i qi = _mm512_cvtps_epi32(q);  // masked-off lanes loaded 0: they add 0
      sum = _mm512_add_epi32(sum, qi);
      _mm_mask_storeu_epi8(out + i, mask, _mm512_cvtepi32_epi8(qi));
    }
    for (int64_t i = k; i < kp; ++i) out[i] = 0;
    if (row_comp) row_comp[m] = 128 * _mm512_reduce_add_epi32(sum);
  }
}

}  // namespace lowbit::cpu::int8
