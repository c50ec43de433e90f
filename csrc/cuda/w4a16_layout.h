// Layout of the CUDA W4A16 GEMM (w4a16_kernels.cu): the prepacked weight order and the
// tile constants, in plain C++ shared by the kernel, the prepack op and the CPU model
// (w4a16_model.cpp), so the tests check the shuffle without a GPU.
//
// The kernel multiplies with mma.m16n8k16 (fp16 or bf16 in, fp32 accumulate). Per k16 x n64
// weight tile a warp needs, in lane l (g = l / 4, t = l % 4), the B fragments of 8 n8
// blocks: for block b, column n = 8b + g and rows k = 2t, 2t+1 (register 0) and 2t+8, 2t+9
// (register 1) — 32 int4 codes, exactly one 16-byte vector per lane. The prepack stores
// each lane's 32 codes as that vector, in the order the kernel's int4 -> 16-bit conversion
// takes them out: from 32-bit word w it builds four half2 pairs p = 0..3, pair p holding
// nibbles p (low half) and p + 4 (high half) — the lop3 trick converts the nibbles at bits
// 0-3 and 16-19 (p = 0), 4-7 and 20-23 (p = 1), then after a shift by 8 the next two. Pair
// p is register (p & 1) of block 2w + (p >> 1); so nibble i of word w holds
//   block 2w + ((i & 3) >> 1), register (i & 1), element (i >> 2):  k = 2t + 8 (i & 1) + (i >> 2).
//
// Vector (kt, nt, lane) — k16 tile kt, n64 tile nt — sits at 16-byte index
// (kt * NP / 64 + nt) * 32 + lane, so a block's stage (4 k16 tiles x 4 n64 tiles) is four
// contiguous 2 KB runs. K is padded to a multiple of 64 (kBK) and N to a multiple of 256
// (kBN) with zero codes and zero scales.
#pragma once

#include "cuda/host_device.h"

namespace lowbit::cuda::w4a16 {

constexpr int kBM = 16;     // rows per block (one m16 tile)
constexpr int kBN = 256;    // columns per block: 4 warps x 64
constexpr int kBK = 64;     // k per pipeline stage: 4 k16 steps
constexpr int kWarpN = 64;  // columns per warp: 8 n8 blocks
constexpr int kWarps = kBN / kWarpN;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 4;
constexpr int kAStageBytes = kBM * kBK * 2;        // 16 rows of 64 16-bit values: 2 KB
constexpr int kBStageBytes = kBK * kBN / 2;        // 64 x 256 int4: 8 KB
constexpr int kStageBytes = kAStageBytes + kBStageBytes;

LOWBIT_HD int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Which weight a nibble of the prepacked vector holds, relative to its k16 x n64 tile.
LOWBIT_HD int nibble_k(int lane, int nibble) { return 2 * (lane % 4) + 8 * (nibble & 1) + (nibble >> 2); }
LOWBIT_HD int nibble_n(int lane, int word, int nibble) { return 8 * (2 * word + ((nibble & 3) >> 1)) + lane / 4; }

// 16-byte index of the vector of lane `lane` in k16 tile kt, n64 tile nt.
LOWBIT_HD long long vector_index(int kt, int nt, int np, int lane) {
  return (static_cast<long long>(kt) * (np / kWarpN) + nt) * 32 + lane;
}

// A (activation) tile of a stage: 16 rows of 64 16-bit values = 128 bytes, with the XOR
// swizzle and ldmatrix addressing of the int8 GEMM (int8_gemm_layout.h): one k16 step is
// 32 bytes, as one k32 step of int8 is.

}  // namespace lowbit::cuda::w4a16
