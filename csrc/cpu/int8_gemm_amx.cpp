// AMX int8 GEMM kernel (Sapphire Rapids and newer): the same prepacked weights as the
// VNNI kernel, multiplied by tile instructions.
//
// The packed panel is already in AMX's B layout: for 16 columns and 16 groups of 4 k,
// rows of 64 bytes (16 columns x 4 k) at a stride of 256 bytes (the panel's 64 columns).
// Per 16 activation rows (the A buffer has its rows padded to a multiple of 16 with
// zeros) and per 64 k: one A tile load (16 rows x 64 bytes), then for each of the
// panel's four 16-column blocks a B tile load and one tdpbsud (signed activations x
// unsigned, +128-shifted weights) into its int32 C tile. The C tiles hold the sums over
// the whole K; they are stored once and go through the AVX-512 epilogue, which also
// subtracts the per-row 128 * sum_k q.
//
// Limits: kp (the packed K) must be a multiple of 64 (int8_prepack pads it), rows of A
// readable up to a multiple of 16.
#include <immintrin.h>

#include <cstring>

#include "cpu/amx_tiles.h"
#include "cpu/int8_gemm.h"
#include "cpu/prefetch.h"

namespace lowbit::cpu::int8 {
namespace {

using amx::kTileRows;

// Tiles 0-3: C (16 x 16 int32), 4: A (16 x 64 int8), 5: B (16 x 64 uint8).
void configure() { amx::configure_full_tiles(6); }

}  // namespace

void gemm_amx(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
              const Epilogue& ep, bool stream) {
  configure();
  alignas(64) int32_t acc[kTileRows * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = packed + p * kp * kPanel;
    for (int64_t m = m0; m < m1; m += kTileRows) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < kp; k += 64) {
        _tile_loadd(4, a + m * kp + k, kp);
        const uint8_t* b = panel + (k / kGroupK) * kPanel * kGroupK;
        // Decode (stream: one row tile) reads these 4 KiB from DRAM once and moves the
        // weights' streams on a line per 256 bytes (prefetch.h).
        if (stream)
          for (int64_t line = 0; line < 16 * kPanel * kGroupK; line += 256) prefetch_streams(b + line);
        _tile_loadd(5, b, kPanel * kGroupK);
        _tile_dpbsud(0, 4, 5);
        _tile_loadd(5, b + 64, kPanel * kGroupK);
        _tile_dpbsud(1, 4, 5);
        _tile_loadd(5, b + 128, kPanel * kGroupK);
        _tile_dpbsud(2, 4, 5);
        _tile_loadd(5, b + 192, kPanel * kGroupK);
        _tile_dpbsud(3, 4, 5);
      }
      _tile_stored(0, acc, kPanel * 4);
      _tile_stored(1, acc + 16, kPanel * 4);
      _tile_stored(2, acc + 32, kPanel * 4);
      _tile_stored(3, acc + 48, kPanel * 4);
      const int rows = static_cast<int>(m1 - m < kTileRows ? m1 - m : kTileRows);
      store_tile_avx512(acc, rows, m, p * kPanel, ep);
    }
  }
  _tile_release();
}

}  // namespace lowbit::cpu::int8
