// AVX2 int8 GEMM micro-kernel (for CPUs without AVX-512 VNNI).
//
// vpmaddubsw multiplies u8 x s8 and adds pairs into int16 with saturation: 255 * 127 * 2
// would saturate, so the activations are not shifted to u8. Instead (as ggml does) the
// kernel multiplies |a| (0..127, u8) by sign(a) * w (vpsignb), whose pair sums stay within
// 2 * 127 * 127 = 32258 < 32767, then vpmaddwd with ones widens pairs to int32. The packed
// weights are stored shifted by 128 (for VNNI); one xor per load restores them.
// Tiles: up to 2 rows x 32 columns (half a 64-column panel: 4 ymm of 8 columns x 4 k)
// = 8 accumulators; the int32 tile goes to the shared scalar epilogue. At decode sizes
// (`stream`) the first half's pass prefetches the weights as four DRAM streams.
#include <immintrin.h>

#include <cstring>

#include "cpu/int8_gemm.h"
#include "cpu/prefetch.h"

namespace lowbit::cpu::int8 {
namespace {

template <int MR>
void half_tile(const int8_t* a, int64_t kp, const uint8_t* panel, int64_t m0, int half, bool stream,
               int32_t* acc_out) {
  const int64_t steps = kp / kGroupK;
  const __m256i ones = _mm256_set1_epi16(1), sign_bit = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    // At decode sizes the weights come from DRAM once: the first half's pass moves the
    // four DRAM streams on a line per step of 256 bytes (prefetch.h).
    if (stream && half == 0) prefetch_streams(panel + s * kPanel * kGroupK);
    const uint8_t* b = panel + s * kPanel * kGroupK + half * 128;
    __m256i w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j)), sign_bit);
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, a + (m0 + r) * kp + s * kGroupK, 4);
      const __m256i av = _mm256_set1_epi32(word);
      const __m256i aabs = _mm256_abs_epi8(av);
      for (int j = 0; j < 4; ++j) {
        const __m256i signed_w = _mm256_sign_epi8(w[j], av);
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(aabs, signed_w), ones));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + r * kPanel + half * 32 + 8 * j), acc[r][j]);
}

}  // namespace

void gemm_avx2(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
               int64_t p1, const Epilogue& ep, bool stream) {
  alignas(32) int32_t acc[2 * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * kp * kPanel;
    for (int64_t m = m0; m < m1; m += 2) {
      const int rows = m1 - m >= 2 ? 2 : 1;
      for (int half = 0; half < 2; ++half) {
        if (rows == 2) half_tile<2>(a, kp, panel, m, half, stream, acc);
        else half_tile<1>(a, kp, panel, m, half, stream, acc);
      }
      store_tile_scalar(acc, rows, m, p * kPanel, ep);
    }
  }
}

}  // namespace lowbit::cpu::int8
