// Weight-only GEMM for W4A16 and W8A16 with bf16 activations on AVX512-BF16 (vdpbf16ps),
// for CPUs with the BF16 dot product and no AMX (Zen 4, Cooper Lake, and AMX CPUs whose
// tiles the kernel cannot use); and the panel decoders it shares with the AMX kernels.
//
// Algorithm. As for AMX (wo_gemm_amx.cpp): the driver decodes a chunk of a panel's k into
// bf16 (q - z) (int4) or q (int8), exact small integers, in pair rows of four 16-column
// quarters (wo_decode_bf16.h); then tiles of up to kBf16TileRows rows pass over the decoded
// chunk. Per k pair, a row's two bf16 activations are broadcast as one dword and
// vdpbf16ps multiplies them into four zmm accumulators (64 columns) with each quarter:
// 16 columns x 2 multiply-adds per instruction, twice an fp32 FMA's. A block of k ends
// where the scales change (the group, at most kBf16BlockK k); its sums are multiplied by
// the group's 64 scales into c. The product of a bf16 activation and a small integer is
// exact in fp32, so the result differs from the reference ((q - z) s in fp32, then the dot
// product) only in the order of the fp32 sums — except that vdpbf16ps treats subnormal
// inputs and results as zero (as AMX's BF16 tiles do).
//
// Registers: 6 rows x 4 accumulators, 4 quarters and a broadcast: 29 of 32 zmm.
// Limits: bf16 activations; k0 and k1 even (pairs) and group boundaries at multiples of 32
// (the driver's condition, as for AMX).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "cpu/wo_decode_bf16.h"
#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {
namespace {

// acc[r][q] += pairs [i0, i1) of ROWS rows of x (bf16, row stride ldx) times the decoded
// pair rows b (row i at b + (i - i0) * 2 * kPanel), then c[r] (+)= acc[r] * s.
template <int ROWS>
void tile(const uint16_t* x, int64_t ldx, const uint16_t* b, int64_t i0, int64_t i1, const float* s, float* c,
          bool first) {
  __m512 acc[ROWS][4];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* bi = b + (i - i0) * 2 * kPanel;
    __m512bh w[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) w[q] = (__m512bh)_mm512_loadu_si512(bi + 32 * q);
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * i, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], xv, w[q]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      float* cr = c + r * kPanel + 16 * q;
      const __m512 prev = first ? _mm512_setzero_ps() : _mm512_loadu_ps(cr);
      _mm512_storeu_ps(cr, _mm512_fmadd_ps(acc[r][q], _mm512_loadu_ps(s + 16 * q), prev));
    }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, float*, bool);
constexpr TileFn kTiles[kBf16TileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace

void decode_int4_panel_bf16(const Panel& panel, int64_t k0, int64_t k1, uint16_t* b) {
  Int4Decoder dec;
  for (int64_t g = k0 / panel.group_size; g * panel.group_size < k1; ++g) {
    dec.set_group(panel, g);
    const int64_t i0 = std::max(k0, g * panel.group_size) / 2, i1 = std::min(k1, (g + 1) * panel.group_size) / 2;
    for (int64_t i = i0; i < i1; ++i) dec.pair(panel.w + i * kPanel, b + (i - k0 / 2) * kPanel * 2, 32);
  }
}

void decode_int8_panel_bf16(const Panel& panel, int64_t k0, int64_t k1, uint16_t* b) {
  const Int8Decoder dec;
  const int8_t* w = reinterpret_cast<const int8_t*>(panel.w);
  for (int64_t i = k0 / 2; i < k1 / 2; ++i) dec.pair(w + 2 * i * kPanel, b + (i - k0 / 2) * kPanel * 2, 32);
}

void gemm_bf16_avx512(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* b, int64_t k0, int64_t k1,
                      int64_t group_size, const float* scales, int64_t scale_stride, float* c) {
  // Blocks end where scales change, as in gemm_amx_bf16.
  const int64_t block = k0 / group_size == (k1 - 1) / group_size ? k1 - k0 : std::gcd(group_size, kBf16BlockK);
  for (int64_t r0 = 0; r0 < rows; r0 += kBf16TileRows) {
    const int n = static_cast<int>(std::min(kBf16TileRows, rows - r0));
    for (int64_t kb = k0; kb < k1; kb += block) {
      const int64_t ke = std::min(k1, kb + block);
      kTiles[n](x + r0 * ldx, ldx, b + (kb - k0) * kPanel, kb / 2, ke / 2, scales + (kb / group_size) * scale_stride,
                c + r0 * kPanel, kb == 0);
    }
  }
}

}  // namespace lowbit::cpu::wo
