// AVX2 + FMA kernels of the weight-only GEMM (wo_gemm.h), for CPUs without AVX-512 (AMD
// Zen 2/3, Intel client cores): the FMA GEMVs for few rows, and for more rows block
// dequantization plus an fp32 FMA micro-kernel. They read the same prepacked layouts as
// the AVX-512 kernels (wo_gemm.h), so a layer prepacked once runs on either ISA.
//
// GEMV, int4: a k pair's 64 bytes are two ymm of 8 dwords (half h: columns 32h..32h+31).
// Dword j of half h holds 8 nibbles; nibble e (bits 4e..4e+3) is column 32h + 2j + (e / 4)
// + 16 (e % 2) at k parity (e / 2) % 2 (wo_gemm.h). AVX2 has no 16-entry float permute, so
// each nibble becomes a float with a shift, a mask and a conversion (3 instructions per 8
// codes), then one FMA per row into accumulator set S = (e % 2) + 2 (e / 4) of its half.
// The codes are used as q (0..15); a group's sums lose the zero point and take the scale
// once: sum_k x (q - z) s = s (sum_k x q - z sum_k x), with the group sums of x from the
// driver. At the end of a group the four sets of a half are put back in column order
// (unpack + lane permute). The two halves go one after the other over a group, so that a
// tile of MR rows holds 4 MR accumulators (8 for one row, which splits even and odd k to
// keep two FMAs per chain in flight) within the 16 ymm registers.
//
// GEMV, int8: per k, 8 bytes at a time sign-extended to int32 and converted, one FMA per
// row; the column scale multiplies the finished sums. Also half a panel at a time.
//
// Integer GEMV, int4, one bf16 row in block floating point (wo_gemm.h: three signed digit
// planes, one exponent per group): codes (u8, 0..15) times digits (s8) with vpmaddubsw,
// which sums the k pair of one column; its pair sums stay within 2 * 15 * 128 = 3840, so
// eight k pairs accumulate in int16 before they are widened (even and odd int16 lanes
// apart) and the planes combine in int32 as d0 + 256 d1 + 65536 d2 (below 2^30), then in
// fp32 over the group. Per 64
// codes: two vpand, one shift, six vpmaddubsw and six vpaddw, against 24 conversion
// instructions and 8 FMAs on the FMA path. Each group's integer sums T = sum_k X q lose the
// zero point through the digit sums and take unit and scale: y += s 2^e (T - z sum_k X).
//
// GEMM (more rows): a 128-k block of the panel is dequantized once into fp32 exactly as
// the reference does it ((q - z) s, or q s), then every row passes over it with a 6-row x
// 16-column micro-kernel (12 accumulators, two block loads and one broadcast per k).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/prefetch.h"
#include "cpu/wo_gemm.h"
#include "cpu/wo_int4_codes.h"

namespace lowbit::cpu::wo {
namespace {

constexpr int64_t kHalf = kPanel / 2;  // columns per half panel
constexpr int kGemmRows = 6;           // rows of the GEMM micro-kernel
constexpr int kGemvTileRows = 2;       // rows per GEMV tile (4 accumulators a row per half)

// 8 uint8 zero points as floats.
inline __m256 zeros8(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}

// Sets S and S + 2 of a half (lanes j: columns 2j and 2j + 1 of 16) in column order.
inline void interleave(__m256 even, __m256 odd, __m256& first8, __m256& last8) {
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  first8 = _mm256_permute2f128_ps(lo, hi, 0x20);
  last8 = _mm256_permute2f128_ps(lo, hi, 0x31);
}

template <int MR>
void gemv_int4_tile(const float* x, int64_t ldx, const float* xsum, const Panel& panel, float* c) {
  const int64_t groups = panel.k / panel.group_size, pairs = panel.group_size / 2;
  const __m256i nibble = _mm256_set1_epi32(0xF);
  constexpr bool kSplit = MR == 1;
  for (int64_t g = 0; g < groups; ++g) {
    const float* s = panel.scales(g);
    const uint8_t* z = panel.zeros(g);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256 acc[MR][4], odd[MR][4];
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = odd[r][j] = _mm256_setzero_ps();
      for (int64_t i = g * pairs; i < (g + 1) * pairs; ++i) {
        const uint8_t* b = panel.w + i * kPanel + kHalf * h;
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
        __m256 xb[MR][2];
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
          xb[r][0] = _mm256_broadcast_ss(x + r * ldx + 2 * i);
          xb[r][1] = _mm256_broadcast_ss(x + r * ldx + 2 * i + 1);
        }
        // Each code vector is used as soon as it is made, so that few are live at once.
#pragma GCC unroll 8
        for (int e = 0; e < 8; ++e) {
          const __m256i shifted = e ? _mm256_srli_epi32(v, 4 * e) : v;
          const __m256 q = _mm256_cvtepi32_ps(e == 7 ? shifted : _mm256_and_si256(shifted, nibble));
          const int set = (e % 2) + 2 * (e / 4), parity = (e / 2) % 2;
#pragma GCC unroll 2
          for (int r = 0; r < MR; ++r) {
            if (kSplit && parity) odd[r][set] = _mm256_fmadd_ps(xb[r][1], q, odd[r][set]);
            else acc[r][set] = _mm256_fmadd_ps(xb[r][parity], q, acc[r][set]);
          }
        }
      }
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 xs = _mm256_broadcast_ss(xsum + r * groups + g);
#pragma GCC unroll 2
        for (int par = 0; par < 2; ++par) {  // columns 32h + 16 par .. + 15: sets par and par + 2
          const __m256 even = kSplit ? _mm256_add_ps(acc[r][par], odd[r][par]) : acc[r][par];
          const __m256 odd_cols = kSplit ? _mm256_add_ps(acc[r][par + 2], odd[r][par + 2]) : acc[r][par + 2];
          __m256 sums[2];
          interleave(even, odd_cols, sums[0], sums[1]);
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u) {
            const int64_t col = kHalf * h + 16 * par + 8 * u;
            float* t = c + r * kPanel + col;
            const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(s + col), _mm256_fnmadd_ps(zeros8(z + col), xs, sums[u]));
            _mm256_storeu_ps(t, g == 0 ? y : _mm256_add_ps(_mm256_loadu_ps(t), y));
          }
        }
      }
    }
  }
}

template <int MR>
void gemv_int8_tile(const float* x, int64_t ldx, const Panel& panel, float* c) {
  const int8_t* w = reinterpret_cast<const int8_t*>(panel.w);
  constexpr bool kSplit = MR == 1;
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MR][4], odd[MR][4];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = odd[r][j] = _mm256_setzero_ps();
    int64_t k = 0;
    const auto step = [&](int64_t kk, __m256 (&into)[MR][4]) {
      const int8_t* b = w + kk * kPanel + kHalf * h;
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
      __m256 q[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * j))));
#pragma GCC unroll 2
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * ldx + kk);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) into[r][j] = _mm256_fmadd_ps(xv, q[j], into[r][j]);
      }
    };
    if constexpr (kSplit) {
      for (; k + 1 < panel.k; k += 2) {
        step(k, acc);
        step(k + 1, odd);
      }
    }
    for (; k < panel.k; ++k) step(k, acc);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t col = kHalf * h + 8 * j;
        const __m256 sum = kSplit ? _mm256_add_ps(acc[r][j], odd[r][j]) : acc[r][j];
        _mm256_storeu_ps(c + r * kPanel + col, _mm256_mul_ps(sum, _mm256_loadu_ps(panel.scales() + col)));
      }
  }
}

// c[0..MR)[16 columns at c] (+)= x[0..MR)[0..kb) . block[0..kb)[16 columns at block].
template <int MR>
void gemm_tile(const float* x, int64_t ldx, const float* block, int64_t kb, float* c, bool zero_init) {
  __m256 acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) acc[r][j] = zero_init ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * kPanel + 8 * j);
  for (int64_t k = 0; k < kb; ++k) {
    const __m256 b0 = _mm256_loadu_ps(block + k * kPanel), b1 = _mm256_loadu_ps(block + k * kPanel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) _mm256_storeu_ps(c + r * kPanel + 8 * j, acc[r][j]);
}

// Sign-extended even and odd int16 lanes of a as int32 (lane j: int16 lanes 2j, 2j + 1).
inline __m256i even16(__m256i a) { return _mm256_srai_epi32(_mm256_slli_epi32(a, 16), 16); }
inline __m256i odd16(__m256i a) { return _mm256_srai_epi32(a, 16); }

// The planes' int16 sums of one half panel (lo: columns 32h + c, hi: 32h + 16 + c) combined
// in int32 as S0 + 256 S1 + 65536 S2 (exact: below 2^30 for 8 k pairs) and added to the
// float totals, even and odd columns apart (a whole group's T can pass 2^31).
inline void flush(const __m256i (&acc)[3][2], __m256 (&total)[2][2]) {
#pragma GCC unroll 2
  for (int side = 0; side < 2; ++side) {
    const __m256i e = _mm256_add_epi32(
        even16(acc[0][side]),
        _mm256_add_epi32(_mm256_slli_epi32(even16(acc[1][side]), 8), _mm256_slli_epi32(even16(acc[2][side]), 16)));
    const __m256i o = _mm256_add_epi32(
        odd16(acc[0][side]),
        _mm256_add_epi32(_mm256_slli_epi32(odd16(acc[1][side]), 8), _mm256_slli_epi32(odd16(acc[2][side]), 16)));
    total[side][0] = _mm256_add_ps(total[side][0], _mm256_cvtepi32_ps(e));
    total[side][1] = _mm256_add_ps(total[side][1], _mm256_cvtepi32_ps(o));
  }
}

using GemmTile = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr GemmTile kGemmTiles[kGemmRows + 1] = {nullptr, gemm_tile<1>, gemm_tile<2>, gemm_tile<3>,
                                                gemm_tile<4>, gemm_tile<5>, gemm_tile<6>};

}  // namespace

void gemv_int4_avx2(const float* x, int64_t ldx, int64_t rows, const float* xsum, const Panel& panel, float* c) {
  const int64_t groups = panel.k / panel.group_size;
  for (int64_t r = 0; r < rows; r += kGemvTileRows) {
    if (rows - r == 1) gemv_int4_tile<1>(x + r * ldx, ldx, xsum + r * groups, panel, c + r * kPanel);
    else gemv_int4_tile<2>(x + r * ldx, ldx, xsum + r * groups, panel, c + r * kPanel);
  }
}

void gemv_int8_avx2(const float* x, int64_t ldx, int64_t rows, const Panel& panel, float* c) {
  for (int64_t r = 0; r < rows; r += kGemvTileRows) {
    if (rows - r == 1) gemv_int8_tile<1>(x + r * ldx, ldx, panel, c + r * kPanel);
    else gemv_int8_tile<2>(x + r * ldx, ldx, panel, c + r * kPanel);
  }
}

// no-tree-pre: as for gemv_int4_vnni_avx512, GCC 12's partial redundancy elimination
// otherwise carries the six accumulators across the loop's back edge through register copies.
__attribute__((optimize("no-tree-pre"))) void gemv_int4_int_avx2(const int8_t* digits, int64_t kpad,
                                                                 const FixedChunk* chunks, const Panel& panel,
                                                                 float* c) {
  const int64_t groups = panel.k / panel.group_size, pairs = panel.group_size / 2;
  constexpr int64_t kFlushPairs = 8;  // 8 * 3840 < 32767: int16 sums cannot overflow
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const float* s = panel.scales(g);
    const uint8_t* z = panel.zeros(g);
    const FixedChunk& chunk = chunks[g];
    const __m256 xsum = _mm256_set1_ps(chunk.digit_sum[0] + 256.0f * chunk.digit_sum[1] +
                                       65536.0f * chunk.digit_sum[2]);  // sum_k X
    const __m256 unit = _mm256_set1_ps(chunk.unit[0]);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256 total[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
      for (int64_t i0 = g * pairs; i0 < (g + 1) * pairs; i0 += kFlushPairs) {
        __m256i acc[3][2];
#pragma GCC unroll 3
        for (int p = 0; p < 3; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_si256();
        const int64_t i1 = std::min(i0 + kFlushPairs, (g + 1) * pairs);
        for (int64_t i = i0; i < i1; ++i) {
          const uint8_t* b = panel.w + i * kPanel + kHalf * h;
          // Decode reads the weights once, from DRAM: the first half's pass moves the four
          // DRAM streams on a line per 256 bytes (prefetch.h); the second reads from L1 / L2.
          if (h == 0 && i % 4 == 0) prefetch_streams(b);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
          const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
#pragma GCC unroll 3
          for (int p = 0; p < 3; ++p) {
            int16_t word;
            std::memcpy(&word, digits + p * kpad + 2 * i, 2);  // d[2i] in the low byte: the even k
            const __m256i d = _mm256_set1_epi16(word);
            acc[p][0] = _mm256_add_epi16(acc[p][0], _mm256_maddubs_epi16(lo, d));
            acc[p][1] = _mm256_add_epi16(acc[p][1], _mm256_maddubs_epi16(hi, d));
          }
        }
        flush(acc, total);
      }
#pragma GCC unroll 2
      for (int side = 0; side < 2; ++side) {  // columns 32h + 16 side .. + 15
        __m256 sums[2];
        interleave(total[side][0], total[side][1], sums[0], sums[1]);
#pragma GCC unroll 2
        for (int u = 0; u < 2; ++u) {
          const int64_t col = kHalf * h + 16 * side + 8 * u;
          float* t = c + col;
          const __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(s + col), unit),
                                         _mm256_fnmadd_ps(zeros8(z + col), xsum, sums[u]));
          _mm256_storeu_ps(t, g == 0 ? y : _mm256_add_ps(_mm256_loadu_ps(t), y));
        }
      }
    }
  }
}

void dequantize_block_avx2(const Panel& panel, int64_t k0, int64_t k1, float* out) {
  for (int64_t k = k0; k < k1; ++k) {
    float* o = out + (k - k0) * kPanel;
    if (panel.kind == Weights::kInt4) {
      const uint8_t* pair = panel.w + (k / 2) * kPanel;
      const float* s = panel.scales(k / panel.group_size);
      const uint8_t* z = panel.zeros(k / panel.group_size);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m128i halves[2];
        int4_k_codes(pair, k, h, halves[0], halves[1]);
#pragma GCC unroll 2
        for (int par = 0; par < 2; ++par)
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u) {
            const int64_t col = kHalf * h + 16 * par + 8 * u;
            const __m128i eight = u ? _mm_srli_si128(halves[par], 8) : halves[par];
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
            _mm256_storeu_ps(o + col, _mm256_mul_ps(_mm256_sub_ps(q, zeros8(z + col)), _mm256_loadu_ps(s + col)));
          }
      }
    } else {
      const int8_t* w = reinterpret_cast<const int8_t*>(panel.w) + k * kPanel;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 q =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * j))));
        _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(q, _mm256_loadu_ps(panel.scales() + 8 * j)));
      }
    }
  }
}

void block_gemm_avx2(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                     bool zero_init) {
  // Column strips of 16 outside, so that a strip of the block (kb x 16 floats, 8 KiB) stays
  // in L1 while the row tiles pass over it.
  for (int64_t col = 0; col < kPanel; col += 16)
    for (int64_t r = 0; r < rows; r += kGemmRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kGemmRows, rows - r));
      kGemmTiles[mr](x + r * ldx, ldx, block + col, kb, c + r * kPanel + col, zero_init);
    }
}

}  // namespace lowbit::cpu::wo
