// AVX-512 kernels of the weight-only GEMM (wo_gemm.h): block dequantization, the fp32
// FMA micro-kernel, the FMA GEMVs for few rows, and the integer int4 / int8 GEMVs (vpdpbusd
// on block floating-point rows, bf16 activations; their algorithms are above each kernel).
//
// Dequantization of one k row of a panel: int4 loads 32 bytes (64 nibbles), splits low
// and high nibbles, widens 16 at a time to int32 and float, then (q - z) * s with the
// group's per-column z and s; int8 widens with sign and multiplies by the column scale.
// Both round exactly as the reference's dequantization does.
//
// Micro-kernel: MR (1..6) rows x 64 columns, 4 zmm accumulators per row; per k it loads
// the block's 64 floats (4 zmm), broadcasts x[r][k] and issues 4 FMAs per row. One or
// two rows alternate two accumulator sets over even and odd k to hide FMA latency.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/prefetch.h"
#include "cpu/wo_gemm.h"
#include "cpu/wo_int4_codes.h"

namespace lowbit::cpu::wo {
namespace {

constexpr int kMaxRows = 6;

// The first n (< 16: a tail) or all 16 lanes.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// 16 bytes (int4 codes or zero points, each in [0, 15]) as floats.
inline __m512 bytes_to_float(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
inline __m512 load_zeros(const uint8_t* z) {
  return bytes_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
}

inline __m512 int4_to_float(__m128i bytes, const float* s, const uint8_t* z) {
  return _mm512_mul_ps(_mm512_sub_ps(bytes_to_float(bytes), load_zeros(z)), _mm512_loadu_ps(s));
}

template <int MR>
void tile(const float* x, int64_t ldx, const float* block, int64_t kb, float* c, bool zero_init) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = zero_init ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * kPanel + 16 * j);
  int64_t k = 0;
  if constexpr (MR <= 2) {
    __m512 odd[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) odd[r][j] = _mm512_setzero_ps();
    for (; k + 1 < kb; k += 2) {
      const float* b = block + k * kPanel;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 x0 = _mm512_set1_ps(x[r * ldx + k]);
        const __m512 x1 = _mm512_set1_ps(x[r * ldx + k + 1]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          acc[r][j] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(b + 16 * j), acc[r][j]);
          odd[r][j] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(b + kPanel + 16 * j), odd[r][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_add_ps(acc[r][j], odd[r][j]);
  }
  for (; k < kb; ++k) {
    const float* b = block + k * kPanel;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xv, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xv, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * kPanel + 16 * j, acc[r][j]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// Few rows against an int8 panel, straight from the packed bytes: per k, widen the 64
// weights to float once and FMA them into every row; the column scale multiplies the
// finished sums (so no fp32 block is written and read back).

template <int MR>
void gemv_int8_tile(const float* x, int64_t ldx, const Panel& panel, float* c) {
  __m512 acc[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const int8_t* w = reinterpret_cast<const int8_t*>(panel.w);
  for (int64_t k = 0; k < panel.k; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kPanel + kPrefetchBytes), _MM_HINT_T0);
    __m512 wk[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      wk[j] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * kPanel + 16 * j))));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wk[j], acc[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(c + r * kPanel + 16 * j, _mm512_mul_ps(acc[r][j], _mm512_loadu_ps(panel.scales() + 16 * j)));
}

// Few rows against an int4 panel, straight from the packed bytes. A k pair's 64 bytes are
// read as 16 dwords without widening: dword d (half h = d / 8, j = d % 8) holds 8 nibbles,
// nibble e at bits 4e..4e+3. vpermps reads only the low 4 bits of each index, so
// vpermps(dword >> 4e, table) is already the float q - 8 of nibble e (one shift and one
// permute per 16 weights, no conversion). Nibble e of dword d is (packed byte 4j + e / 2,
// low or high nibble: wo_gemm.h): column 32h + 2j + (e / 4) + 16 (e % 2), k parity
// (e / 2) % 2. So four accumulator sets S = (e % 2) + 2 (e / 4) hold columns 32h + 2j +
// (S / 2) + 16 (S % 2) in lane d; each group's sums are put back in column order once
// (two permutes per 16 columns), then the zero point and the scale apply as totals:
// sum_k x (q - z) s = s * (sum_k x (q - 8) - (z - 8) * sum_k x).
template <int MR>
void gemv_int4_tile(const float* x, int64_t ldx, const float* xsum, const Panel& panel, float* c) {
  const int64_t groups = panel.k / panel.group_size, pairs_per_group = panel.group_size / 2;
  alignas(64) float table[16];
  for (int q = 0; q < 16; ++q) table[q] = static_cast<float>(q - 8);
  const __m512 lut = _mm512_load_ps(table);
  // Column order from the sets: columns 16v .. 16v + 15 are, in turn, lanes 8h .. 8h + 7 of
  // sets lo and lo + 2 (even and odd columns), v = 2h + lo.
  alignas(64) int32_t even_odd_lo[16], even_odd_hi[16];
  for (int i = 0; i < 16; ++i) {
    even_odd_lo[i] = i / 2 + 16 * (i % 2);
    even_odd_hi[i] = 8 + i / 2 + 16 * (i % 2);
  }
  const __m512i interleave[2] = {_mm512_load_si512(even_odd_lo), _mm512_load_si512(even_odd_hi)};
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int64_t g = 0; g < groups; ++g) {
    // One or two rows: odd k accumulate separately, so that each chain has one FMA per
    // k pair in flight (with more rows, the rows themselves give enough chains).
    constexpr bool kSplit = MR <= 2;
    __m512 acc[MR][4], odd[MR][4];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = odd[r][j] = _mm512_setzero_ps();
    for (int64_t i = g * pairs_per_group; i < (g + 1) * pairs_per_group; ++i) {
      const uint8_t* b = panel.w + i * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(b);
      // Halves of the 8 nibbles: e = 0..3 (sets 0, 1 at even then odd k), e = 4..7 (sets 2, 3).
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        const int e0 = 4 * half;
        const __m512 q0 = _mm512_permutexvar_ps(e0 ? _mm512_srli_epi32(v, 4 * e0) : v, lut);
        const __m512 q1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * e0 + 4), lut);
        const __m512 q2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * e0 + 8), lut);
        const __m512 q3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * e0 + 12), lut);
        const int s0 = 2 * half, s1 = 2 * half + 1;
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) {
          const __m512 x0 = _mm512_set1_ps(x[r * ldx + 2 * i]), x1 = _mm512_set1_ps(x[r * ldx + 2 * i + 1]);
          if constexpr (kSplit) {
            acc[r][s0] = _mm512_fmadd_ps(x0, q0, acc[r][s0]);
            acc[r][s1] = _mm512_fmadd_ps(x0, q1, acc[r][s1]);
            odd[r][s0] = _mm512_fmadd_ps(x1, q2, odd[r][s0]);
            odd[r][s1] = _mm512_fmadd_ps(x1, q3, odd[r][s1]);
          } else {
            acc[r][s0] = _mm512_fmadd_ps(x1, q2, _mm512_fmadd_ps(x0, q0, acc[r][s0]));
            acc[r][s1] = _mm512_fmadd_ps(x1, q3, _mm512_fmadd_ps(x0, q1, acc[r][s1]));
          }
        }
      }
    }
    const float* s = panel.scales(g);
    const uint8_t* z = panel.zeros(g);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      __m512 sets[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) sets[j] = kSplit ? _mm512_add_ps(acc[r][j], odd[r][j]) : acc[r][j];
      const __m512 xs = _mm512_set1_ps(xsum[r * groups + g]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const int h = v / 2, lo = v % 2;
        const __m512 sum = _mm512_permutex2var_ps(sets[lo], interleave[h], sets[lo + 2]);
        const __m512 zc = _mm512_sub_ps(load_zeros(z + 16 * v), eight);
        float* t = c + r * kPanel + 16 * v;
        _mm512_storeu_ps(t, _mm512_fmadd_ps(_mm512_loadu_ps(s + 16 * v), _mm512_fnmadd_ps(zc, xs, sum),
                                            g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(t)));
      }
    }
  }
}

// Rows of block floating-point digits against an int4 panel in integers (wo_gemm.h).
// A step takes two k pairs (128 bytes). vpunpck{l,h}wd of the two pairs' bytes puts one
// column's four k (2i .. 2i + 3) in one dword: the four products vpdpbusd sums, against the
// digits of those four k as one broadcast dword. Each byte holds two columns (low and high
// nibble, wo_gemm.h), so the whole bytes (lo + 16 hi) and the high nibbles alone go through
// vpdpbusd, and the low nibbles' sums are whole - 16 high at the end of the chunk, in int32
// (this spares the masking of the low nibbles in every step). Sets j = 0, 1: low nibbles
// through unpacklo / unpackhi; j = 2, 3: high nibbles. Lane 4L + d (L the 128-bit lane) of
// set j holds column 32 (L / 2) + 8 (L % 2) + d + 4 (j % 2) + 16 (j / 2). Three digit
// planes x four sets are 12 int32 accumulators: 12 vpdpbusd and 6 other vector ops per 256
// codes, against 46 for the FMA GEMV above (both issue on the same two ports). At the end
// of each chunk the sums of each plane lose the zero point exactly (an integer below 2^24
// in fp32), are weighted by the chunk's units and scaled; the scales and zero points are
// permuted into set order once per group, the sums into column order once per call.
struct VnniIndex {
  __m512i to_sets[2], to_cols[2];
  VnniIndex() {
    alignas(64) int32_t sets[2][16], cols[2][16];
    for (int l = 0; l < 16; ++l) {
      const int lane = l / 4, d = l % 4;
      for (int par = 0; par < 2; ++par) sets[par][l] = 16 * (lane / 2) + 8 * (lane % 2) + d + 4 * par;
    }
    // Column 16v + i comes from set 2 (v % 2) + (i / 4) % 2 (the second source for odd),
    // lane 4 (2 (v / 2) + i / 8) + i % 4.
    for (int i = 0; i < 16; ++i)
      for (int vh = 0; vh < 2; ++vh) cols[vh][i] = 16 * ((i / 4) % 2) + 4 * (2 * vh + i / 8) + i % 4;
    for (int t = 0; t < 2; ++t) {
      to_sets[t] = _mm512_load_si512(sets[t]);
      to_cols[t] = _mm512_load_si512(cols[t]);
    }
  }
};

inline __m512i broadcast_digits(const int8_t* at) {
  int32_t four;
  std::memcpy(&four, at, sizeof(four));
  return _mm512_set1_epi32(four);
}

// acc[p][j] += the four k of pairs (v0, v1) in column set j (0, 1: low nibbles; 2, 3: high
// nibbles) times digit plane p at k; acc[p][0] and acc[p][1] hold the whole bytes (low + 16
// high) until the end of the chunk takes the high part off.
inline void vnni_step(__m512i v0, __m512i v1, const int8_t* digits, int64_t kpad, int64_t k, __m512i (&acc)[3][4]) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i whole[2] = {_mm512_unpacklo_epi16(v0, v1), _mm512_unpackhi_epi16(v0, v1)};
  const __m512i high[2] = {_mm512_and_si512(_mm512_srli_epi16(whole[0], 4), low),
                           _mm512_and_si512(_mm512_srli_epi16(whole[1], 4), low)};
#pragma GCC unroll 3
  for (int p = 0; p < 3; ++p) {
    const __m512i d = broadcast_digits(digits + p * kpad + k);
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], whole[t], d);
      acc[p][2 + t] = _mm512_dpbusd_epi32(acc[p][2 + t], high[t], d);
    }
  }
}

constexpr int kMaxGemvTileRows = 4;
using GemvFn = void (*)(const float*, int64_t, const Panel&, float*);
constexpr GemvFn kGemvTiles[kMaxGemvTileRows + 1] = {nullptr, gemv_int8_tile<1>, gemv_int8_tile<2>,
                                                     gemv_int8_tile<3>, gemv_int8_tile<4>};
using Gemv4Fn = void (*)(const float*, int64_t, const float*, const Panel&, float*);
constexpr Gemv4Fn kGemv4Tiles[kMaxGemvTileRows + 1] = {nullptr, gemv_int4_tile<1>, gemv_int4_tile<2>,
                                                       gemv_int4_tile<3>, gemv_int4_tile<4>};

}  // namespace

void dequantize_block_avx512(const Panel& panel, int64_t k0, int64_t k1, float* out) {
  for (int64_t k = k0; k < k1; ++k) {
    float* o = out + (k - k0) * kPanel;
    if (panel.kind == Weights::kInt4) {
      const uint8_t* pair = panel.w + (k / 2) * kPanel;
      const float* s = panel.scales(k / panel.group_size);
      const uint8_t* z = panel.zeros(k / panel.group_size);
      for (int h = 0; h < 2; ++h) {
        __m128i lo, hi;
        int4_k_codes(pair, k, h, lo, hi);
        const int c = 32 * h;
        _mm512_storeu_ps(o + c, int4_to_float(lo, s + c, z + c));
        _mm512_storeu_ps(o + c + 16, int4_to_float(hi, s + c + 16, z + c + 16));
      }
    } else {
      const int8_t* w = reinterpret_cast<const int8_t*>(panel.w) + k * kPanel;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j));
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(q, _mm512_loadu_ps(panel.scales() + 16 * j)));
      }
    }
  }
}

void store_panel_avx512(const float* c, int64_t rows, int64_t cols, const float* bias, OutType type, void* out,
                        int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask = first_lanes(cols - j);
      __m512 y = _mm512_maskz_loadu_ps(mask, c + r * kPanel + j);
      if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bias + j));
      const int64_t at = r * ldo + j;
      if (type == OutType::kFloat) {
        _mm512_mask_storeu_ps(static_cast<float*>(out) + at, mask, y);
      } else if (type == OutType::kHalf) {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, mask,
                                 _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        // c10::BFloat16's rounding: add 0x7FFF plus the lowest kept bit, keep the top half;
        // NaN becomes 0x7FC0. (vcvtneps2bf16 would flush denormals.)
        const __m512i bits = _mm512_castps_si512(y);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, mask, _mm512_cvtepi32_epi16(rounded));
      }
    }
  }
}

void gemv_int8_avx512(const float* x, int64_t ldx, int64_t rows, const Panel& panel, float* c) {
  for (int64_t r = 0; r < rows; r += kMaxGemvTileRows) {
    const int mr = static_cast<int>(rows - r < kMaxGemvTileRows ? rows - r : kMaxGemvTileRows);
    kGemvTiles[mr](x + r * ldx, ldx, panel, c + r * kPanel);
  }
}

void gemv_int4_avx512(const float* x, int64_t ldx, int64_t rows, const float* xsum, const Panel& panel,
                      float* c) {
  const int64_t groups = panel.k / panel.group_size;
  for (int64_t r = 0; r < rows; r += kMaxGemvTileRows) {
    const int mr = static_cast<int>(rows - r < kMaxGemvTileRows ? rows - r : kMaxGemvTileRows);
    kGemv4Tiles[mr](x + r * ldx, ldx, xsum + r * groups, panel, c + r * kPanel);
  }
}

void block_gemm_avx512(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                       bool zero_init) {
  for (int64_t r = 0; r < rows; r += kMaxRows) {
    const int mr = static_cast<int>(rows - r < kMaxRows ? rows - r : kMaxRows);
    kTiles[mr](x + r * ldx, ldx, block, kb, c + r * kPanel, zero_init);
  }
}

bool to_block_fixed_avx512(const float* x, int64_t k, int64_t chunk, int8_t* digits, int64_t kpad,
                           FixedChunk* chunks) {
  for (int64_t k0 = 0, ci = 0; k0 < k; k0 += chunk, ++ci) {
    const int64_t k1 = std::min(k, k0 + chunk);
    __m512 amax = _mm512_setzero_ps();
    __mmask16 special = 0;
    for (int64_t i = k0; i < k1; i += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(first_lanes(k1 - i), x + i);
      special |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN (quiet 0x01, signaling 0x80), +-Inf (0x08, 0x10)
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    if (special) return false;
    // The largest magnitude is below 2^top; X = x 2^-e stays below 2^22, so that its top
    // digit d2 lies in [-64, 64]. e stops at -149 (the least float exponent): the unit 2^e
    // must be a float, and a chunk that small only loses bits below 2^-150.
    int top;
    std::frexp(_mm512_reduce_max_ps(amax), &top);
    const int e = std::max(top - 22, -149);
    const __m512 down = _mm512_set1_ps(static_cast<float>(-e));
    __m512i sum[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t i = k0; i < k1; i += 16) {
      const __mmask16 m = first_lanes(k1 - i);
      const __m512i big = _mm512_cvt_roundps_epi32(_mm512_scalef_ps(_mm512_maskz_loadu_ps(m, x + i), down),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // Balanced base-256 digits: d0 is the sign-extended low byte, the rest carries on.
      const __m512i d0 = _mm512_srai_epi32(_mm512_slli_epi32(big, 24), 24);
      const __m512i mid = _mm512_srai_epi32(_mm512_sub_epi32(big, d0), 8);
      const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(mid, 24), 24);
      const __m512i d[3] = {d0, d1, _mm512_srai_epi32(_mm512_sub_epi32(mid, d1), 8)};
#pragma GCC unroll 3
      for (int p = 0; p < 3; ++p) {
        _mm512_mask_cvtepi32_storeu_epi8(digits + p * kpad + i, m, d[p]);
        sum[p] = _mm512_add_epi32(sum[p], d[p]);
      }
    }
    for (int p = 0; p < 3; ++p) {
      chunks[ci].digit_sum[p] = static_cast<float>(_mm512_reduce_add_epi32(sum[p]));
      chunks[ci].unit[p] = std::ldexp(1.0f, e + 8 * p);
    }
  }
  for (int p = 0; p < 3; ++p) std::fill(digits + p * kpad + k, digits + (p + 1) * kpad, int8_t{0});
  return true;
}

// GCC 12's partial redundancy elimination makes the 12 accumulators cross the loop's back
// edge through copies (24 register moves per step beside 28 instructions); without it the
// step has none.
__attribute__((optimize("no-tree-pre"))) void gemv_int4_vnni_avx512(const int8_t* digits, int64_t kpad,
                                                                    const FixedChunk* chunks, int64_t chunk,
                                                                    int64_t rows, const Panel& panel, float* c) {
  static const VnniIndex index;
  const int64_t groups = panel.k / panel.group_size, chunks_per_row = (panel.k + chunk - 1) / chunk;
  // Per row, the four sets' sums so far (in set order).
  alignas(64) float y[kVnniTileRows][4][16] = {};
  int64_t ci = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const float* s = panel.scales(g);
    const uint8_t* z = panel.zeros(g);
    __m512 ss[4], zs[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int v = j / 2;  // set j's columns come from column blocks v and v + 2
      ss[j] = _mm512_permutex2var_ps(_mm512_loadu_ps(s + 16 * v), index.to_sets[j % 2], _mm512_loadu_ps(s + 32 + 16 * v));
      zs[j] = _mm512_permutex2var_ps(load_zeros(z + 16 * v), index.to_sets[j % 2], load_zeros(z + 32 + 16 * v));
    }
    const int64_t g1 = (g + 1) * panel.group_size;
    for (int64_t k0 = g * panel.group_size; k0 < g1; k0 += chunk, ++ci) {
      const int64_t pairs_end = std::min(g1, k0 + chunk) / 2;
      // Row by row over the chunk: the rows after the first read its codes from L1.
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* dr = digits + r * 3 * kpad;
        const FixedChunk& ch = chunks[r * chunks_per_row + ci];
        __m512i acc[3][4];
#pragma GCC unroll 3
        for (int p = 0; p < 3; ++p)
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) acc[p][j] = _mm512_setzero_si512();
        int64_t i = k0 / 2;
        for (; i + 1 < pairs_end; i += 2) {
          const uint8_t* b = panel.w + i * kPanel;
          // The rows after the first read these codes from L1; every other step (256 bytes)
          // moves the DRAM streams on by a line (prefetch.h).
          if (r == 0 && (i & 2) == 0) prefetch_streams(b);
          vnni_step(_mm512_loadu_si512(b), _mm512_loadu_si512(b + kPanel), dr, kpad, 2 * i, acc);
        }
        if (i < pairs_end)  // a last lone pair (G = K = 2 mod 4): its partner's codes (and digits) are zero
          vnni_step(_mm512_loadu_si512(panel.w + i * kPanel), _mm512_setzero_si512(), dr, kpad, 2 * i, acc);
        // Whole bytes to low nibbles: sum d (lo + 16 hi) - 16 sum d hi, exact in int32
        // (|sum d (lo + 16 hi)| <= 255 * 128 * kVnniChunkK < 2^31).
#pragma GCC unroll 3
        for (int p = 0; p < 3; ++p)
#pragma GCC unroll 2
          for (int t = 0; t < 2; ++t) acc[p][t] = _mm512_sub_epi32(acc[p][t], _mm512_slli_epi32(acc[p][2 + t], 4));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          __m512 t = _mm512_setzero_ps();
#pragma GCC unroll 3
          for (int p = 0; p < 3; ++p) {
            // sum_k d_p (q - z) = sum_k d_p q - z sum_k d_p: both below 2^24, so exact.
            const __m512 exact =
                _mm512_fnmadd_ps(zs[j], _mm512_set1_ps(ch.digit_sum[p]), _mm512_cvtepi32_ps(acc[p][j]));
            t = _mm512_fmadd_ps(exact, _mm512_set1_ps(ch.unit[p]), t);
          }
          _mm512_store_ps(y[r][j], _mm512_fmadd_ps(ss[j], t, _mm512_load_ps(y[r][j])));
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_ps(c + r * kPanel + 16 * v, _mm512_permutex2var_ps(_mm512_load_ps(y[r][2 * (v % 2)]),
                                                                      index.to_cols[v / 2],
                                                                      _mm512_load_ps(y[r][2 * (v % 2) + 1])));
}

// One row of block floating-point digits against an int8 panel in integers. A step takes
// four k rows (256 bytes, 64 columns each): vpunpck{l,h}bw then vpunpck{l,h}wd put one
// column's four k in one dword, so set j (0..3) holds column 16 L + 4 j + d in lane 4 L + d
// (L the 128-bit lane). The codes are flipped to q + 128 (u8) for vpdpbusd; 128 sum_k d
// comes off per chunk in int32. Per 256 codes: 12 vpdpbusd, 8 unpacks and 4 flips, against
// 48 vector operations for the FMA GEMV. The column scale multiplies the finished sums.
__attribute__((optimize("no-tree-pre"))) void gemv_int8_vnni_avx512(const int8_t* digits, int64_t kpad,
                                                                    const FixedChunk* chunks, const Panel& panel,
                                                                    float* c) {
  const int8_t* w = reinterpret_cast<const int8_t*>(panel.w);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 y[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const auto step = [&](const __m512i (&rows)[4], int64_t k, __m512i (&acc)[3][4]) {
    const __m512i r01[2] = {_mm512_unpacklo_epi8(rows[0], rows[1]), _mm512_unpackhi_epi8(rows[0], rows[1])};
    const __m512i r23[2] = {_mm512_unpacklo_epi8(rows[2], rows[3]), _mm512_unpackhi_epi8(rows[2], rows[3])};
    const __m512i q[4] = {_mm512_unpacklo_epi16(r01[0], r23[0]), _mm512_unpackhi_epi16(r01[0], r23[0]),
                          _mm512_unpacklo_epi16(r01[1], r23[1]), _mm512_unpackhi_epi16(r01[1], r23[1])};
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p) {
      const __m512i d = broadcast_digits(digits + p * kpad + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[p][j] = _mm512_dpbusd_epi32(acc[p][j], q[j], d);
    }
  };
  const FixedChunk* ch = chunks;
  for (int64_t k0 = 0; k0 < panel.k; k0 += kVnniChunkK8, ++ch) {
    const int64_t k1 = std::min(panel.k, k0 + kVnniChunkK8);
    __m512i acc[3][4];
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[p][j] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 3 < k1; k += 4) {
      const int8_t* b = w + k * kPanel;
      __m512i rows[4];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) rows[t] = _mm512_xor_si512(_mm512_loadu_si512(b + t * kPanel), flip);
      prefetch_streams(b);  // 256 bytes a step: each DRAM stream a line on (prefetch.h)
      step(rows, k, acc);
    }
    if (k < k1) {  // the last 1-3 rows of K; the missing ones have zero digits, any code does
      __m512i rows[4];
      for (int t = 0; t < 4; ++t)
        rows[t] = k + t < k1 ? _mm512_xor_si512(_mm512_loadu_si512(w + (k + t) * kPanel), flip) : flip;
      step(rows, k, acc);
    }
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p) {
      // sum_k d (q + 128) - 128 sum_k d: |sum_k d q| <= 127 * 128 * 1024 < 2^24, exact in fp32.
      const __m512i shift = _mm512_set1_epi32(128 * static_cast<int32_t>(ch->digit_sum[p]));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        y[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[p][j], shift)), _mm512_set1_ps(ch->unit[p]),
                               y[j]);
    }
  }
  // Sets to columns (16 L + 4 j + d from lane 4 L + d of set j), times the column scales.
  alignas(64) float sets[4][16];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) _mm512_store_ps(sets[j], y[j]);
  for (int lane = 0; lane < 4; ++lane)
    for (int j = 0; j < 4; ++j)
      for (int d = 0; d < 4; ++d) c[16 * lane + 4 * j + d] = sets[j][4 * lane + d] * panel.scales()[16 * lane + 4 * j + d];
}

}  // namespace lowbit::cpu::wo
