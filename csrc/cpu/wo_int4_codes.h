// One k row of a prepacked int4 panel (wo_gemm.h): the codes of the 16 columns of each half
// panel, as bytes. Shared by the block dequantization of the AVX2 and AVX-512 kernels (both
// compile it with SSSE3 available).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {

// Codes of k (its pair's 64 bytes at `pair`) for half h: lo[c] = q[32h + c][k],
// hi[c] = q[32h + 16 + c][k] (c = 0..15). Per half, even bytes hold k = 2i, odd bytes
// k = 2i + 1; low nibbles columns 32h..+15, high nibbles 32h + 16..+31. Static: each
// kernel file compiles its own copy with its own ISA flags (a shared inline copy could be
// the AVX-512 one, which an AVX2 CPU cannot run).
static inline void int4_k_codes(const uint8_t* pair, int64_t k, int h, __m128i& lo, __m128i& hi) {
  const __m128i pick = k % 2 ? _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15)
                             : _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m128i a = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 32 * h)), pick);
  const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 32 * h + 16)), pick);
  const __m128i bytes = _mm_unpacklo_epi64(a, b);  // the 16 columns' bytes for this k
  const __m128i mask = _mm_set1_epi8(0x0F);
  lo = _mm_and_si128(bytes, mask);
  hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
}

}  // namespace lowbit::cpu::wo
