// AMX BF16 weight-only GEMM for W4A16 and W8A16 with bf16 activations (Sapphire Rapids
// and newer).
//
// Algorithm. The codes are decoded into bf16 values of (q - z) (int4: integers in
// [-15, 15]) or q (int8: [-127, 127]), exact in bf16, in AMX's B layout (k pairs x 16
// columns x 2 per tile; a 64-column panel is four tiles). For int8 the "group" is all of K
// and the scales are the per-column ones. Four C tiles (16 columns each) accumulate
// sum_k x (q - z) with tdpbf16ps; after each block of k inside one quantization group they
// are stored and added to fp32 accumulators times the group's scales:
// y = sum_g s_g sum_{k in g} x_k (q_k - z_g). The product of a bf16 activation and a small
// integer is exact in fp32, so the result differs from the reference ((q - z) s in fp32,
// then the dot product) only in the order of fp32 sums.
//
// Two drivers share the decoders:
// - gemm_amx_bf16 (many rows): per chunk of kAmxChunkK k the panel is decoded once
//   (decode_*_panel_bf16), then every tile of 16 rows of the task passes over it, 32
//   columns at a time, alternate blocks of k (ending where the scales change) in two sets
//   of C tiles so that one set is scaled while the other multiplies.
// - gemv_amx_bf16 (at most 16 rows): one 32-k block is decoded into L1 right before its
//   four multiplies (A and C tiles configured with just the rows there are), so no decoded
//   panel is written; decoding once per call is all the reuse there is at this M. Its time
//   hardly depends on the rows (a 16 x 16 x 32 multiply costs the same for 1 row as for
//   16), so it loses to the FMA GEMV at 1-2 rows and wins from 3 (int4) or 6 (int8) rows,
//   2.1x at 8 (measured figures: wo_gemm.h, kAmxMinRowsInt4).
//
// Decoding: wo_decode_bf16.h (shared with the AVX512-BF16 kernel, wo_gemm_bf16.cpp).
//
// Limits: bf16 activations only (fp32 / fp16 ones would have to be rounded to bf16);
// group size a multiple of 32 (one tile of k; 32, 64, 128, and G = K when K is); rows of
// x in whole tiles of 16 for gemm_amx_bf16 (the driver pads the tail).
#include <immintrin.h>

#include <numeric>

#include "cpu/amx_tiles.h"
#include "cpu/prefetch.h"
#include "cpu/wo_decode_bf16.h"
#include "cpu/wo_gemm.h"

namespace lowbit::cpu::wo {
namespace {

using amx::kTileRows;

// c_tiles[r][64] (fp32, row stride kPanel) = the four C tiles (0-3).
inline void store_c(float* c_tiles) {
  _tile_stored(0, c_tiles, kPanel * 4);
  _tile_stored(1, c_tiles + 16, kPanel * 4);
  _tile_stored(2, c_tiles + 32, kPanel * 4);
  _tile_stored(3, c_tiles + 48, kPanel * 4);
}

inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// c[r][0, 16 vectors) (+)= s * acc[r][0, 16 vectors) for rows [0, rows) (acc row stride
// acc_stride, c row stride kPanel): a finished block's sums times its group's scales.
inline void add_scaled(const float* acc, int64_t acc_stride, int vectors, const float* s, int64_t rows, float* c,
                       bool first) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * kPanel;
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) {
      const __m512 prev = first ? _mm512_setzero_ps() : _mm512_loadu_ps(cr + 16 * v);
      _mm512_storeu_ps(cr + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(acc + r * acc_stride + 16 * v),
                                                    _mm512_loadu_ps(s + 16 * v), prev));
    }
  }
}

// The many-row GEMM's tiles: 0-1 and 2-3 two sets of C (16 rows x 32 columns), used by
// alternate blocks; 4: A (16 rows x 32 k); 5-6: B (the two 16-column tiles). A block ends
// where its scales do (every 128 k for G = 128): its C set is stored, scaled and zeroed
// while the next block multiplies into the other set, so the tile pipeline never drains.
// (One C set of four tiles x 64 columns loads fewer tiles per multiply, 1.25 against 1.5,
// but stalls at every block end; measured here, 2 threads, bf16 nn.Linear time / ours over
// 4 alternating processes: 0.69-0.78 -> 0.77-0.87 at 4096 x 4096 x 512, 0.76-0.86 ->
// 0.86-0.89 at 14336 x 4096 x 512. Two row tiles x two column tiles, or a second A tile
// alternating with the first, measured slower.)
// (The tile intrinsics take literal tile numbers, hence the two spelled-out sets.)
inline void multiply_step(bool second_set, const uint16_t* x, int64_t ldx, const uint16_t* bk) {
  _tile_loadd(4, x, ldx * 2);
  _tile_loadd(5, bk, kPanel * 4);
  _tile_loadd(6, bk + 32, kPanel * 4);
  if (second_set) {
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 6);
  } else {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
  }
}

// A C set into tmp[16][32], then zeroed for the block after next.
inline void drain(bool second_set, float* tmp) {
  if (second_set) {
    _tile_stored(2, tmp, 32 * 4);
    _tile_stored(3, tmp + 16, 32 * 4);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_stored(0, tmp, 32 * 4);
    _tile_stored(1, tmp + 16, 32 * 4);
    _tile_zero(0);
    _tile_zero(1);
  }
}

}  // namespace

void gemm_amx_bf16(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* b, int64_t k0, int64_t k1,
                   int64_t group_size, const float* scales, int64_t scale_stride, float* c) {
  amx::configure_full_tiles(7);
  alignas(64) float tmp[kTileRows * 32];
  // Blocks end where scales change: the largest of 128, 64, 32 k dividing the group, or the
  // whole chunk when it lies inside one group (int8, G = K).
  const int64_t block = k0 / group_size == (k1 - 1) / group_size ? k1 - k0 : std::gcd(group_size, kAmxBlockK);
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const uint16_t* xr = x + r0 * ldx;
    for (int c0 = 0; c0 < kPanel; c0 += 32) {
      zero_c();
      for (int64_t kb = k0; kb < k1; kb += block) {
        const bool odd = ((kb - k0) / block) % 2;
        for (int64_t k = kb; k < kb + block; k += 32) {
          const uint16_t* bk = b + ((k - k0) / 2) * kPanel * 2 + 2 * c0;  // tile c0 / 16 of the pair row
          multiply_step(odd, xr + k, ldx, bk);
        }
        drain(odd, tmp);
        add_scaled(tmp, 32, 2, scales + (kb / group_size) * scale_stride + c0, kTileRows, c + r0 * kPanel + c0,
                   kb == 0);
      }
    }
  }
  _tile_release();
}

void gemv_amx_bf16(const uint16_t* x, int64_t ldx, int64_t rows, const Panel& panel, float* c) {
  // Tiles 0-3: C (rows x 16 fp32), 4: A (rows x 32 bf16), 5 and 6: B, alternating so that
  // a tile load need not wait for the multiply reading the other.
  const uint8_t r = static_cast<uint8_t>(rows);
  const uint8_t tile_rows[7] = {r, r, r, r, r, kTileRows, kTileRows};
  amx::configure_tiles(tile_rows, 7);
  const bool int4 = panel.kind == Weights::kInt4;
  Int4Decoder dec4;
  const Int8Decoder dec8;
  // The decoded 32-k block: four B tiles of 16 k pairs x 32 bf16.
  alignas(64) uint16_t tiles[4][kTileRows * 32];
  alignas(64) float acc[kTileRows * kPanel];
  const int64_t group_size = int4 ? panel.group_size : panel.k;
  for (int64_t g = 0; g < panel.k / group_size; ++g) {
    if (int4) dec4.set_group(panel, g);
    zero_c();
    for (int64_t k0 = g * group_size; k0 < (g + 1) * group_size; k0 += 32) {
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t pair = k0 / 2 + i;
        // The weights' DRAM streams move on a line per 256 bytes (prefetch.h): every fourth
        // int4 pair (64 bytes), every second int8 pair (128 bytes).
        if (int4) {
          const uint8_t* src = panel.w + pair * kPanel;
          if (i % 4 == 0) prefetch_streams(src);
          dec4.pair(src, tiles[0] + 32 * i, kTileRows * 32);
        } else {
          const int8_t* src = reinterpret_cast<const int8_t*>(panel.w) + 2 * pair * kPanel;
          if (i % 2 == 0) prefetch_streams(src);
          dec8.pair(src, tiles[0] + 32 * i, kTileRows * 32);
        }
      }
      _tile_loadd(4, x + k0, ldx * 2);
      _tile_loadd(5, tiles[0], 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, tiles[1], 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, tiles[2], 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, tiles[3], 64);
      _tile_dpbf16ps(3, 4, 6);
    }
    store_c(acc);
    add_scaled(acc, kPanel, 4, panel.scales(g), rows, c, g == 0);
  }
  _tile_release();
}

}  // namespace lowbit::cpu::wo
