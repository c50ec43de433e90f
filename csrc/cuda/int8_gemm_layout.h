// Index math of the CUDA int8 tensor-core GEMM (int8_gemm_kernels.cu), in plain C++.
//
// Everything here is shared by the kernel and by its CPU model (int8_gemm_model.cpp),
// which replays the kernel's data movement lane by lane with the PTX ISA's definitions of
// ldmatrix and mma.m16n8k32, so the tests check this index math without a GPU.
//
// Shared-memory tile of one stage: rows of kBK = 128 bytes (128 int8 k values), A rows
// (BM of them) then B rows (BN); the 16-byte chunk c of row r is stored at chunk
// c ^ (r % 8). ldmatrix reads one 16-byte chunk from each of 8 consecutive rows at the same
// logical chunk, which this XOR swizzle spreads over the 8 distinct 16-byte bank groups of
// a 128-byte line: conflict-free; the cp.async writes of 16-byte chunks are too.
#pragma once

#include "cuda/host_device.h"

namespace lowbit::cuda::int8_gemm {

constexpr int kBK = 128;            // k values (bytes) per stage and per shared-memory row
constexpr int kChunks = kBK / 16;   // 16-byte chunks per row
constexpr int kKStep = 32;          // k of one mma.m16n8k32
constexpr int kKSteps = kBK / kKStep;

// Byte offset of logical chunk `chunk` of tile row `row`.
LOWBIT_HD int smem_offset(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) << 4); }

// ldmatrix.x4 for the A fragment of the 16 x 32 tile at rows row0.., k step kk: lanes
// 8j..8j+7 address the rows of 8x(16 byte) matrix j, and matrix j becomes register j:
// j = 0: rows 0-7, k 0-15; j = 1: rows 8-15, k 0-15; j = 2: rows 0-7, k 16-31;
// j = 3: rows 8-15, k 16-31 — the mma's a0..a3 registers (PTX ISA, m16n8k32 .s8).
LOWBIT_HD int a_ldmatrix_offset(int lane, int row0, int kk) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int chunk = kk * 2 + (lane >> 4);
  return smem_offset(row, chunk);
}

// ldmatrix.x4 for the B fragments of two n8 tiles (B rows n0..n0+15, k step kk), B being
// stored n-major like A: register 0 = b0 of tile n0 (k 0-15), 1 = b1 of tile n0 (k 16-31),
// 2 = b0 of tile n0 + 8, 3 = b1 of tile n0 + 8.
LOWBIT_HD int b_ldmatrix_offset(int lane, int n0, int kk) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int chunk = kk * 2 + ((lane >> 3) & 1);
  return smem_offset(row, chunk);
}

// Row and column, inside its 16 x 8 tile, of accumulator register i (0..3) of a lane.
LOWBIT_HD int acc_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
LOWBIT_HD int acc_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// A tile configuration: BM x BN outputs per block of WARPS_M x WARPS_N warps, each warp
// owning a (BM / WARPS_M) x (BN / WARPS_N) sub-tile of MI x NI mma tiles; STAGES-deep
// cp.async pipeline.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int STAGE_BYTES = (BM + BN) * kBK;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are whole m16 tiles and pairs of n8 tiles");
  static_assert((BM * kChunks) % THREADS == 0 && (BN * kChunks) % THREADS == 0,
                "every thread copies the same number of 16-byte chunks per stage");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
};

// The whitelist of instantiated configurations (id, BM, BN, WARPS_M, WARPS_N, STAGES),
// chosen by M at run time (tile_for_m). Shared memory: 72 KB, 96 KB, 96 KB.
#define LOWBIT_INT8_GEMM_TILES(X) \
  X(0, 16, 128, 1, 4, 4)          \
  X(1, 64, 128, 2, 2, 4)          \
  X(2, 128, 128, 2, 2, 3)

constexpr int kNumTiles = 3;

// ---- Hopper (sm_90a): warpgroup MMA -------------------------------------------------------
//
// A 128 x 128 tile per block of two warpgroups (256 threads), each warpgroup computing 64
// rows with wgmma.m64n128k32 straight from shared memory. The stage layout above is what
// wgmma calls K-major with 128-byte swizzling: rows of 128 bytes, 8-row groups 1024 bytes
// apart, the 16-byte chunk index XOR-ed with the row index within its 8-row group — on the
// absolute shared address, so every tile starts 1024-byte aligned. One k32 step is a
// 32-byte advance of the descriptor's start address within the row.
constexpr int kWgmmaBM = 128, kWgmmaBN = 128, kWgmmaStages = 4, kWgmmaThreads = 256;
constexpr int kWgmmaStageBytes = (kWgmmaBM + kWgmmaBN) * kBK;
constexpr int kWgmmaSmemBytes = kWgmmaStages * kWgmmaStageBytes + 1024;  // + room to align the base
constexpr int kWgmmaTile = kNumTiles;  // the tile id the launcher and the model use for it
constexpr unsigned long long kWgmmaSbo = 8 * kBK;  // bytes between 8-row groups

// The wgmma shared-memory matrix descriptor (PTX ISA "matrix descriptor"): start address
// >> 4 in bits 0-13, leading byte offset >> 4 in 16-29 (unused for swizzled K-major: 1),
// stride byte offset >> 4 in 32-45, swizzle mode in 62-63 (1: 128-byte).
LOWBIT_HD unsigned long long wgmma_desc(unsigned int smem_byte_address) {
  return ((static_cast<unsigned long long>(smem_byte_address) & 0x3FFFF) >> 4) | (1ull << 16) |
         ((kWgmmaSbo >> 4) << 32) | (1ull << 62);
}

// Small M: one 16-row tile and many column tiles; medium: 64 rows; large: 128 x 128
// (on Hopper the wgmma kernel below, when the binary has sm_90a code).
inline int tile_for_m(int m, bool wgmma) { return m <= 16 ? 0 : (m <= 128 ? 1 : (wgmma ? kWgmmaTile : 2)); }

}  // namespace lowbit::cuda::int8_gemm
