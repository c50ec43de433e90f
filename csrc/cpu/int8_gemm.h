// int8 x int8 -> int32 GEMM on the CPU with the fused fp32 epilogue: the interface
// between the portable driver (int8_gemm.cpp, which uses ATen for threads and tensors)
// and the ISA-specific kernels (int8_gemm_avx512.cpp, int8_gemm_avx2.cpp). The kernel
// files include no torch header: they are compiled with ISA flags, and an inline torch
// function instantiated there could otherwise replace the portable one at link time.
//
// Weight layout (packed once, at prepack): panels of kPanel = 64 output columns; inside a
// panel, for each group of 4 consecutive k, the 64 columns' 4 bytes are adjacent, stored
// with the sign bit flipped (w + 128, unsigned):
//   packed[p][s][c][j] = w[p * 64 + c][s * 4 + j] + 128     (w = 0 past N and K)
// so one 64-byte load is 16 columns x 4 k: the unsigned operand of one vpdpbusd (u8 x s8).
// The signed activations are then the other operand, broadcast from memory, and
// 128 * sum_k q[m][k], a per-row sum taken while quantizing, undoes the shift (so the
// prepacked weight is one tensor, and its layout serves every ISA path: the AVX2 and
// scalar kernels flip the bit back on load).
//
// Activations are quantized per row into a buffer of kp = round_up(K, 64) signed bytes per
// row, with round_up(M, 16) rows; the padding is 0, so it contributes nothing.
#pragma once

#include <cstdint>

namespace lowbit::cpu::int8 {

constexpr int64_t kPanel = 64;  // output columns per packed panel
constexpr int64_t kGroupK = 4;  // k per vpdpbusd lane group
constexpr int64_t kAlignK = 64;  // the packed K is padded to this (one AMX tile row)
constexpr int64_t kAlignM = 16;  // activation buffers have their rows padded to this (AMX tile rows)
constexpr int64_t kMaxK = 65536;  // keeps 255 * 127 * K inside int32
constexpr int64_t kRowChunk = 48;  // most rows one kernel call takes (m1 - m0)
// Fewest rows the AMX path multiplies on tiles (the padding rows of the last tile are zero,
// wasted but nearly free); below it the VNNI kernel, which reads the weights at the same
// rate there. Sapphire Rapids, 2 threads, weights in L3, ms AMX / VNNI (bench/RESULTS.md):
// 4096 x 4096 at 4 rows 0.360 / 0.341, 6 rows 0.349 / 0.334, 8 rows 0.349 / 0.435; 2048 x
// 11264 at 6 rows 0.490 / 0.505, 8 rows 0.506 / 0.603; 5632 x 2048 at 8 rows 0.248 /
// 0.308. At 6 rows the two tie; from 7 VNNI needs a second row tile and AMX wins.
constexpr int64_t kAmxMinRows = 6;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

enum class FloatType { kF32, kBF16, kF16 };

// What the epilogue needs: y[m][n] = float(acc - row_comp[m]) * a_scale[m] * b_scale[n] + bias[n].
struct Epilogue {
  const float* a_scale;    // [M]
  const float* b_scale;    // [N]
  const float* bias;       // [N] or nullptr
  const int32_t* row_comp;  // [M]: 128 * sum_k q[m][k] for the VNNI kernel, else nullptr
  void* out;             // [M][ldo] of out_type
  FloatType out_type;
  int64_t ldo;
  int64_t n;             // valid columns
};

// Rows [m0, m1) (at most kRowChunk) of A ([M][kp] signed bytes) times panels [p0, p1).
void gemm_avx512_vnni(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
                      int64_t p1, const Epilogue& ep, bool stream);
void gemm_avx2(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
               int64_t p1, const Epilogue& ep, bool stream);
void gemm_scalar(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0,
                 int64_t p1, const Epilogue& ep);
// stream (VNNI, AMX, AVX2): the call is decode-sized (at most kAlignM rows), its weights come
// from DRAM once, so the first row tile prefetches them as streams (prefetch.h).
void gemm_amx(const int8_t* a, int64_t kp, const uint8_t* packed, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
              const Epilogue& ep, bool stream);

// The epilogue of one tile (rows [m0, m0 + rows), columns [c0, c0 + 64)) from int32
// accumulators acc[rows][64]: portable (AVX2 and scalar kernels) and AVX-512 (VNNI, AMX).
void store_tile_scalar(const int32_t* acc, int rows, int64_t m0, int64_t c0, const Epilogue& ep);
void store_tile_avx512(const int32_t* acc, int rows, int64_t m0, int64_t c0, const Epilogue& ep);

// Per-row symmetric quantization of rows [m0, m1) of x (row stride ldx elements) into
// a ([M][kp]) and scale ([M]), bit-identical to the reference; row_comp (if not null)
// receives 128 * sum_k q[m][k].
void quantize_rows_avx512(const void* x, FloatType type, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                          int64_t kp, int8_t* a, float* scale, int32_t* row_comp);

}  // namespace lowbit::cpu::int8
