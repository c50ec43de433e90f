// Decoding int4 / int8 weight panels into bf16 pair rows, for the kernels that multiply
// bf16 activations by (q - z) or q exactly: the AMX tiles (wo_gemm_amx.cpp) and vdpbf16ps
// (wo_gemm_bf16.cpp). Include only from files compiled with AVX-512 BW and BF16.
//
// A pair row (k = 2i, 2i + 1) of a 64-column panel decodes to four quarters of 16 columns x
// 2 k (bf16 column c, k 2i + t at entry 2c + t of its quarter): one AMX B-tile row, or one
// zmm operand of vdpbf16ps. int4: the packed byte 32h + 2c + t of pair row i holds
// q[32h + c][2i + t] (low nibble) and q[32h + 16 + c][2i + t] (high nibble), so the low
// nibbles of 32 bytes are already 16 columns x 2 k in that order, the high nibbles the next
// 16 columns. Each nibble plus 16 - z indexes a 32-entry table of bf16 values -16..15 (one
// vpermw). int8: the two k rows of a pair are interleaved (one vpermt2w), widened to fp32
// and rounded to bf16 (exact).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {
// Internal to each including file: its copy is compiled with that file's ISA flags.
namespace {

uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);  // exact for the small integers used here
}

// int4 decoding state: the table of bf16 -16..15 and, per group, 16 - z for each of the 32
// entries (16 columns x 2 k) of the four column quarters.
struct Int4Decoder {
  __m512i lut, adj[4];
  const __m512i low = _mm512_set1_epi16(0x0F);

  Int4Decoder() {
    alignas(64) uint16_t table[32];
    for (int i = 0; i < 32; ++i) table[i] = bf16_bits(static_cast<float>(i - 16));
    lut = _mm512_load_si512(table);
  }

  // Entry e of quarter q is 16 - z[16 q + e / 2] (the two k of a column share z).
  void set_group(const Panel& panel, int64_t g) {
    const uint8_t* z = panel.zeros(g);
    const __m512i pairs = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5,
                                           5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    for (int q = 0; q < 4; ++q) {
      const __m512i zq = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + 16 * q)));
      const __m512i a = _mm512_sub_epi32(_mm512_set1_epi32(16), zq);
      adj[q] = _mm512_permutexvar_epi16(pairs, _mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)));
    }
  }

  // Pair row i of the panel into row i of the four tiles (tile q at out + q * tile_stride).
  void pair(const uint8_t* src, uint16_t* out, int64_t tile_stride) const {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h)));
      const __m512i lo = _mm512_add_epi16(_mm512_and_si512(w, low), adj[2 * h]);
      const __m512i hi = _mm512_add_epi16(_mm512_srli_epi16(w, 4), adj[2 * h + 1]);
      _mm512_storeu_si512(out + 2 * h * tile_stride, _mm512_permutexvar_epi16(lo, lut));
      _mm512_storeu_si512(out + (2 * h + 1) * tile_stride, _mm512_permutexvar_epi16(hi, lut));
    }
  }
};

// int8 decoding: output entry 2c + t of a pair row is column c of k row t.
struct Int8Decoder {
  __m512i lo, hi;

  Int8Decoder() {
    alignas(64) uint16_t lo_idx[32], hi_idx[32];
    for (int e = 0; e < 32; ++e) {
      lo_idx[e] = static_cast<uint16_t>(e / 2 + (e % 2) * 32);
      hi_idx[e] = static_cast<uint16_t>(16 + e / 2 + (e % 2) * 32);
    }
    lo = _mm512_load_si512(lo_idx);
    hi = _mm512_load_si512(hi_idx);
  }

  // k rows 2i (at w) and 2i + 1 (at w + kPanel) into row i of the four tiles.
  void pair(const int8_t* w, uint16_t* out, int64_t tile_stride) const {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // columns 32h .. 32h + 31
      const __m512i r0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)));
      const __m512i r1 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kPanel + 32 * h)));
#pragma GCC unroll 2
      for (int part = 0; part < 2; ++part) {  // 16 columns x 2 k = 32 int16, widened to bf16
        const __m512i v = _mm512_permutex2var_epi16(r0, part ? hi : lo, r1);
        const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
        const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
        _mm512_storeu_si512(out + (2 * h + part) * tile_stride, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
      }
    }
  }
};

}  // namespace
}  // namespace lowbit::cpu::wo
