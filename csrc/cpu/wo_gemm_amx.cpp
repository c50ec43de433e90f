// AMX BF16 weight-only GEMM for W4A16 and W8A16 with bf16 activations (Sapphire Rapids
// and newer).
//
// Algorithm. Per 64-column panel, the codes are decoded once into bf16 values of (q - z)
// (int4: integers in [-15, 15]) or q (int8: [-127, 127]), exact in bf16, in AMX's B layout
// (k pairs x 64 columns x 2). For int8 the "group" is all of K and the scales are the
// per-column ones. Per 16 activation rows and per block of at most kAmxBlockK k inside one
// quantization group (the largest of 128, 64, 32 dividing the group size), four C tiles (16 x 16 fp32) accumulate sum_k x (q - z) with
// tdpbf16ps; after the block they are stored and added to fp32 accumulators times the
// group's scales: y = sum_g s_g sum_{k in g} x_k (q_k - z_g). The product of a bf16
// activation and a small integer is exact in fp32, so the result differs from the
// reference ((q - z) s in fp32, then the dot product) only in the order of fp32 sums.
//
// Decoding: the packed byte 32h + 2c + t of pair row i holds q[32h + c][2i + t] (low
// nibble) and q[32h + 16 + c][2i + t] (high nibble), so the low nibbles of 32 bytes are
// already 16 columns x 2 k in B order, the high nibbles the next 16 columns. Each nibble
// plus 16 - z indexes a 32-entry table of bf16 values -16..15 (one vpermw).
//
// Limits: bf16 activations only (fp32 / fp16 ones would have to be rounded to bf16);
// group size a multiple of 32 (one tile of k; 32, 64, 128, and G = K when K is); rows of
// x in whole tiles of 16 (the driver pads the tail).
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "cpu/amx_tiles.h"
#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {
namespace {

using amx::kTileRows;

// Tiles 0-3: C (16 x 16 fp32), 4: A (16 rows x 32 bf16), 5: B (16 k pairs x 16 columns x 2).
void configure() { amx::configure_full_tiles(6); }

uint16_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);  // exact for the small integers used here
}

}  // namespace

void decode_int4_panel_bf16(const Panel& panel, uint16_t* b) {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) table[i] = bf16_bits(static_cast<float>(i - 16));
  const __m512i lut = _mm512_load_si512(table);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const int64_t groups = panel.k / panel.group_size;
  for (int64_t g = 0; g < groups; ++g) {
    const float* z = panel.params + g * 2 * kPanel + kPanel;
    // 16 - z for each of the 32 entries (16 columns x 2 k) of the four column quarters.
    alignas(64) uint16_t adj[4][32];
    for (int q = 0; q < 4; ++q)
      for (int e = 0; e < 32; ++e) adj[q][e] = static_cast<uint16_t>(16 - static_cast<int>(z[16 * q + e / 2]));
    __m512i a[4];
    for (int q = 0; q < 4; ++q) a[q] = _mm512_load_si512(adj[q]);
    for (int64_t i = g * panel.group_size / 2; i < (g + 1) * panel.group_size / 2; ++i) {
      const uint8_t* src = panel.w + i * kPanel;
      uint16_t* dst = b + i * kPanel * 2;
      for (int h = 0; h < 2; ++h) {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h)));
        const __m512i lo = _mm512_add_epi16(_mm512_and_si512(w, low), a[2 * h]);
        const __m512i hi = _mm512_add_epi16(_mm512_srli_epi16(w, 4), a[2 * h + 1]);
        _mm512_storeu_si512(dst + 64 * h, _mm512_permutexvar_epi16(lo, lut));
        _mm512_storeu_si512(dst + 64 * h + 32, _mm512_permutexvar_epi16(hi, lut));
      }
    }
  }
}

void decode_int8_panel_bf16(const Panel& panel, uint16_t* b) {
  // Output entry 2c + t of a pair row is column c of k row t: interleave the two rows.
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int e = 0; e < 32; ++e) {
    lo_idx[e] = static_cast<uint16_t>(e / 2 + (e % 2) * 32);
    hi_idx[e] = static_cast<uint16_t>(16 + e / 2 + (e % 2) * 32);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const int8_t* w = reinterpret_cast<const int8_t*>(panel.w);
  for (int64_t i = 0; i < panel.k / 2; ++i) {
    uint16_t* dst = b + i * kPanel * 2;
    for (int h = 0; h < 2; ++h) {  // columns 32h .. 32h + 31
      const __m512i r0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * i * kPanel + 32 * h)));
      const __m512i r1 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (2 * i + 1) * kPanel + 32 * h)));
      for (int part = 0; part < 2; ++part) {  // 16 columns x 2 k = 32 int16, widened to bf16
        const __m512i v = _mm512_permutex2var_epi16(r0, part ? hi : lo, r1);
        const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
        const __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
        _mm512_storeu_si512(dst + 64 * h + 32 * part, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
      }
    }
  }
}

void gemm_amx_bf16(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* b, int64_t k, int64_t group_size,
                   const float* scales, int64_t scale_stride, float* c) {
  configure();
  alignas(64) float tmp[kTileRows * kPanel];
  // The largest of 128, 64, 32 k that divides the group: blocks never straddle groups.
  const int64_t block = std::gcd(group_size, kAmxBlockK);
  std::fill(c, c + rows * kPanel, 0.0f);
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    for (int64_t k0 = 0; k0 < k; k0 += block) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = k0; k < k0 + block; k += 32) {
        _tile_loadd(4, x + r0 * ldx + k, ldx * 2);
        const uint16_t* bk = b + (k / 2) * kPanel * 2;
        _tile_loadd(5, bk, kPanel * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, bk + 32, kPanel * 4);
        _tile_dpbf16ps(1, 4, 5);
        _tile_loadd(5, bk + 64, kPanel * 4);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(5, bk + 96, kPanel * 4);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, tmp, kPanel * 4);
      _tile_stored(1, tmp + 16, kPanel * 4);
      _tile_stored(2, tmp + 32, kPanel * 4);
      _tile_stored(3, tmp + 48, kPanel * 4);
      const float* s = scales + (k0 / group_size) * scale_stride;
      for (int64_t r = 0; r < kTileRows; ++r) {
        float* cr = c + (r0 + r) * kPanel;
        for (int v = 0; v < 4; ++v) {
          const __m512 acc = _mm512_loadu_ps(cr + 16 * v);
          _mm512_storeu_ps(cr + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(tmp + r * kPanel + 16 * v),
                                                        _mm512_loadu_ps(s + 16 * v), acc));
        }
      }
    }
  }
  _tile_release();
}

}  // namespace lowbit::cpu::wo
