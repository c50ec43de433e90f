// The bf16 path of the weight-only GEMM for int4 weights (wo_gemm.h): vdpbf16ps straight
// from the packed nibbles. Compiled with AVX512_BF16 and called only on CPUs that have it.
//
// Per k pair, the panel's 64 bytes widen to words (vpmovzxbw, 32 bytes -> 32 words);
// masking or shifting each word selects a nibble, and vpermw maps 0..15 to its exact
// bf16 value, giving four operands of 16 columns x 2 k. Each row broadcasts its two bf16
// activations of the pair and issues four vdpbf16ps; the dequantization is shared by the
// MR (1..4) rows of a tile. At each group end the tile's int4 sums become weights: totals
// (kept in `out`) += s * (acc - z * sum of x over the group).
//
// Numerics: products of bf16 activations and integers 0..15 are exact in fp32 and are
// accumulated in fp32 (vdpbf16ps treats bf16 denormal activations as zero); the zero point
// is subtracted in fp32 per group, so the error is that of an fp32 sum of up to G
// products of |x| * 15, plus one rounding per group.
#include <immintrin.h>

#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {
namespace {

constexpr int kMaxRows = 4;

// bf16 bit patterns of 0..15, twice (vpermw indexes 32 words).
alignas(64) constexpr uint16_t kBf16Ints[32] = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120,
    0x4130, 0x4140, 0x4150, 0x4160, 0x4170, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
    0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

inline __m512i bcast_pair(const uint16_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(static_cast<int>(v));
}

template <int MR>
void tile(const uint16_t* x, int64_t ldx, const float* xsum, const Panel& panel, float* out) {
  const __m512i table = _mm512_load_si512(kBf16Ints);
  const __m512i low = _mm512_set1_epi16(0x000F);
  const int64_t groups = panel.k / panel.group_size, pairs_per_group = panel.group_size / 2;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[MR][4];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t i = g * pairs_per_group; i < (g + 1) * pairs_per_group; ++i) {
      const uint8_t* b = panel.w + i * kPanel;
      const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
      const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
      const __m512bh op[4] = {
          (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w0, low), table),
          (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), table),
          (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w1, low), table),
          (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), table),
      };
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512bh xv = (__m512bh)bcast_pair(x + r * ldx + 2 * i);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, op[j]);
      }
    }
    const float* s = panel.params + g * 2 * kPanel;
    const float* z = s + kPanel;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 sj = _mm512_loadu_ps(s + 16 * j), zj = _mm512_loadu_ps(z + 16 * j);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        float* t = out + r * kPanel + 16 * j;
        const __m512 centered = _mm512_fnmadd_ps(zj, _mm512_set1_ps(xsum[r * groups + g]), acc[r][j]);
        const __m512 total = g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(t);
        _mm512_storeu_ps(t, _mm512_fmadd_ps(sj, centered, total));
      }
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, const Panel&, float*);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>};

}  // namespace

void int4_bf16_panel(const uint16_t* x, int64_t ldx, int64_t rows, const float* xsum, const Panel& panel,
                     float* out) {
  const int64_t groups = panel.k / panel.group_size;
  for (int64_t r = 0; r < rows; r += kMaxRows) {
    const int mr = static_cast<int>(rows - r < kMaxRows ? rows - r : kMaxRows);
    kTiles[mr](x + r * ldx, ldx, xsum + r * groups, panel, out + r * kPanel);
  }
}

}  // namespace lowbit::cpu::wo
