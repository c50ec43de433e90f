// Layout of the CUDA W4A16 GEMM (w4a16_kernels.cu): the prepacked weight order, the tile
// configurations, the shared-memory stage and the split-K order, in plain C++ shared by
// the kernel, the prepack op and the CPU model (w4a16_model.cpp), so the tests check all of
// this index math without a GPU.
//
// Weight order. The kernel multiplies with mma.m16n8k16 (fp16 or bf16 in, fp32 accumulate).
// Per k16 x n64 weight tile a warp needs, in lane l (g = l / 4, t = l % 4), the B fragments
// of 8 n8 blocks: for block b, column n = 8b + g and rows k = 2t, 2t+1 (register 0) and
// 2t+8, 2t+9 (register 1) — 32 int4 codes, exactly one 16-byte vector per lane. The prepack
// stores each lane's 32 codes as that vector, in the order the kernel's int4 -> 16-bit
// conversion takes them out: from 32-bit word w it builds four half2 pairs p = 0..3, pair p
// holding nibbles p (low half) and p + 4 (high half) — the lop3 trick converts the nibbles
// at bits 0-3 and 16-19 (p = 0), 4-7 and 20-23 (p = 1), then after a shift by 8 the next
// two. Pair p is register (p & 1) of block 2w + (p >> 1); so nibble i of word w holds
//   block 2w + ((i & 3) >> 1), register (i & 1), element (i >> 2):  k = 2t + 8 (i & 1) + (i >> 2).
// Vector (kt, nt, lane) — k16 tile kt, n64 tile nt — sits at 16-byte index
// (kt * NP / 64 + nt) * 32 + lane, so a block's stage (4 k16 tiles x 4 n64 tiles) is four
// contiguous 2 KB runs. K is padded to a multiple of 64 (kBK) and N to a multiple of 256
// (kBN) with zero codes and zero scales.
//
// Tiles. A block computes kBN = 256 columns and MT m16 tiles of rows, MT = 1, 2 or 4 by M
// (tile_m_tiles), so M = 2048 reads the weight 2048 / 64 = 32 times, not 128. Its warps
// form warps_m(MT) rows of 4: warp w takes columns 64 (w % 4).. of the block and
// m_tiles_per_warp(MT) m16 tiles from row 16 m_tiles_per_warp(MT) (w / 4); the weight codes
// a warp converts once per k16 step feed that many mma's. Four m16 tiles take two rows of
// warps (256 threads) because one warp's 4 x 8 x 4 fp32 accumulators would not leave
// registers for the rest (ptxas spills them).
//
// Stage (one of kStages in the cp.async pipeline), for k slice [k0, k0 + 64):
//   x      16 MI rows of 64 16-bit values, 128-byte rows with the XOR chunk swizzle and
//          ldmatrix addressing of the int8 GEMM (int8_gemm_layout.h: one k16 step of 16-bit
//          values is 32 bytes, as one k32 step of int8 is);
//   codes  the 4 x 4 x 32 16-byte code vectors, chunk c = (k16 step, n64 tile, lane);
//   slots  kScaleSlots = 2 scale slots: for each k16 step that starts a group for this
//          block (starts_group), the loader copies that group's 256 fp32 scales and 256
//          uint8 zero points of the block's columns into the slot numbered by the group
//          starts before it in the slice (slot_of_step); a warp reads its lanes' scales and
//          zero points from that slot at exactly those steps and keeps them in registers
//          until the next group. Groups are 32, 64, 128 or K long, slices start at
//          multiples of 64 and step_group keeps the zero padding past K in the last group,
//          so a slice starts at most two groups (at its first step and 32 further on).
//
// Split K. Small M splits K into `splits` ranges of whole stages (blockIdx.z); the splits of
// one output tile run in order on a lock: split 0 stores its fp32 tile in the workspace,
// split s > 0 waits for the lock to read s, adds its own partial sums to the workspace
// values (ws + acc, in this order), stores them — or, being the last, adds the bias, casts
// and writes the output — and sets the lock to s + 1 (the last resets it to 0). The sum is
// ((p0 + p1) + p2) + ... in every run: the same bits each time. A split waits only for an
// earlier one, whose blocks have lower blockIdx.z and are dispatched first (GPUs dispatch a
// grid in block index order, which CUDA does not promise but serial split-K in CUTLASS
// relies on too; the launcher keeps split grids within two waves besides).
#pragma once

#include "cuda/host_device.h"

namespace lowbit::cuda::w4a16 {

constexpr int kBN = 256;    // columns per block: 4 warps x 64
constexpr int kBK = 64;     // k per pipeline stage: 4 k16 steps
constexpr int kKSteps = kBK / 16;
constexpr int kWarpN = 64;  // columns per warp: 8 n8 blocks
constexpr int kWarps = kBN / kWarpN;  // warps along n (per row of warps)
constexpr int kThreads = kWarps * 32;  // threads of a block of one row of warps
constexpr int kStages = 4;
constexpr int kMaxMTiles = 4;                       // m16 tiles per block, at most
constexpr int kCodeBytes = kBK * kBN / 2;           // 64 x 256 int4: 8 KB per stage
constexpr int kCodeChunks = kCodeBytes / 16;        // 512
constexpr int kScaleSlots = 2;                      // group starts per stage, at most
constexpr int kSlotScaleBytes = kBN * 4;            // fp32 scales of the block's columns: 1 KB
constexpr int kSlotBytes = kSlotScaleBytes + kBN;   // then their uint8 zero points
constexpr int kSlotChunks = kSlotBytes / 16;        // 80 16-byte copies per slot

LOWBIT_HD int round_up(int v, int m) { return (v + m - 1) / m * m; }

constexpr int kFp32Rows = 8;  // rows per block of the float32 (CUDA-core) kernel

// m16 tiles per block for M rows: one for M <= 16, two up to 32, four beyond.
LOWBIT_HD int tile_m_tiles(int m) { return m <= 16 ? 1 : (m <= 32 ? 2 : kMaxMTiles); }

// Rows of warps of a block of mt m16 tiles, the m16 tiles of each warp, and its threads.
LOWBIT_HD constexpr int warps_m(int mt) { return mt > 2 ? 2 : 1; }
LOWBIT_HD constexpr int m_tiles_per_warp(int mt) { return mt / warps_m(mt); }
LOWBIT_HD constexpr int block_threads(int mt) { return kThreads * warps_m(mt); }

// Rows of x one block computes: 16 m_tiles on tensor cores, kFp32Rows for float32
// activations. A launch has ceil(M / rows) x NP / 256 output tiles per split.
LOWBIT_HD int rows_per_block(bool fp32, int m_tiles) { return fp32 ? kFp32Rows : 16 * m_tiles; }

// Bytes of one stage and its parts, for a block of mi m16 tiles.
LOWBIT_HD constexpr int x_stage_bytes(int mi) { return 16 * mi * kBK * 2; }
LOWBIT_HD constexpr int code_offset(int mi) { return x_stage_bytes(mi); }
LOWBIT_HD constexpr int slot_offset(int mi, int slot) { return x_stage_bytes(mi) + kCodeBytes + slot * kSlotBytes; }
LOWBIT_HD constexpr int stage_bytes(int mi) { return slot_offset(mi, kScaleSlots); }
LOWBIT_HD constexpr int smem_bytes(int mi) { return kStages * stage_bytes(mi); }

// Which weight a nibble of the prepacked vector holds, relative to its k16 x n64 tile.
LOWBIT_HD int nibble_k(int lane, int nibble) { return 2 * (lane % 4) + 8 * (nibble & 1) + (nibble >> 2); }
LOWBIT_HD int nibble_n(int lane, int word, int nibble) { return 8 * (2 * word + ((nibble & 3) >> 1)) + lane / 4; }

// 16-byte index of the vector of lane `lane` in k16 tile kt, n64 tile nt.
LOWBIT_HD long long vector_index(int kt, int nt, int np, int lane) {
  return (static_cast<long long>(kt) * (np / kWarpN) + nt) * 32 + lane;
}

// Code chunk c of a stage (c = 0..511) is the vector of k16 step c / 128, n64 tile (c / 32) % 4
// of the block, lane c % 32, stored at byte 16 c of the stage's codes.
LOWBIT_HD int code_chunk_step(int c) { return c / 128; }
LOWBIT_HD int code_chunk_tile(int c) { return (c / 32) % 4; }
LOWBIT_HD int code_chunk_lane(int c) { return c % 32; }
LOWBIT_HD int code_chunk(int step, int warp_n, int lane) { return (step * kWarps + warp_n) * 32 + lane; }

// The group whose scales k16 step k16 uses: k16 / group, except that steps past the last
// group holding real k (the zero padding up to a multiple of 64) stay in that group — their
// codes and x values are zero, and a group of their own would be one more to stage.
LOWBIT_HD int step_group(int k16, int group, int k) {
  const int g = k16 / group, last = (k - 1) / group;
  return g < last ? g : last;
}

// Whether k16 step k16 (an absolute k) starts a group for a block whose split begins at
// k_begin: its first step, or a step whose group differs from the one before.
LOWBIT_HD bool starts_group(int k16, int k_begin, int group, int k) {
  return k16 == k_begin || step_group(k16, group, k) != step_group(k16 - 16, group, k);
}

// The slot of k16 step `step` (0..3) of the slice at k0: the group starts before it in the
// slice. Only read at steps that start a group, where it is 0 or 1 (the layout note above).
LOWBIT_HD int slot_of_step(int k0, int step, int k_begin, int group, int k) {
  int slot = 0;
  for (int j = 0; j < step; ++j) slot += starts_group(k0 + 16 * j, k_begin, group, k) ? 1 : 0;
  return slot;
}

// Slot chunk c (0..79): chunks 0..63 are 16 bytes of the scales (4 columns each), 64..79
// 16 bytes of the zero points (16 columns each); both at byte 16 c of the slot.
LOWBIT_HD bool slot_chunk_is_scale(int c) { return c < kSlotScaleBytes / 16; }
LOWBIT_HD int slot_chunk_column(int c) { return slot_chunk_is_scale(c) ? 4 * c : 16 * (c - kSlotScaleBytes / 16); }

// The k range of split s of `splits` over kp (a multiple of 64): whole stages, the first
// splits one stage longer when they do not divide evenly.
LOWBIT_HD int split_begin(int s, int splits, int kp) {
  const int stages = kp / kBK, base = stages / splits, extra = stages % splits;
  return kBK * (s * base + (s < extra ? s : extra));
}

}  // namespace lowbit::cuda::w4a16
