// AMX tile configuration shared by the AMX kernels (int8_gemm_amx.cpp, wo_gemm_amx.cpp).
// Include only from files compiled with -mamx-tile.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace lowbit::cpu::amx {

constexpr int kTileRows = 16;

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 .. count-1 with rows[t] rows of 64 bytes each.
inline void configure_tiles(const uint8_t* rows, int count) {
  TileConfig cfg;
  for (int t = 0; t < count; ++t) {
    cfg.rows[t] = rows[t];
    cfg.colsb[t] = 64;
  }
  // GCC 12's _tile_loadconfig names only the configuration's first 8 bytes as its memory
  // operand, so dead-store elimination may drop the stores above and the first tile
  // instruction faults; this operand is the whole 64 bytes.
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// Tiles 0 .. count-1 as full tiles: 16 rows of 64 bytes.
inline void configure_full_tiles(int count) {
  uint8_t rows[8];
  for (int t = 0; t < count; ++t) rows[t] = kTileRows;
  configure_tiles(rows, count);
}

}  // namespace lowbit::cpu::amx
