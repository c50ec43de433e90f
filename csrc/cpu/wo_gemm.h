// Weight-only GEMM on the CPU (W4A16 and W8A16): float activations times int4 / int8
// weights, fp32 accumulation. The interface between the driver (wo_gemm.cpp, with ATen)
// and the kernels (wo_gemm_avx512.cpp, wo_gemm_avx2.cpp, ...: no torch headers; see
// int8_gemm.h why). The AVX2 kernels follow the AVX-512 ones below with 8-float vectors.
//
// All activation dtypes are widened to fp32. Large M: for each 64-column weight panel and each block of
// kBlockK k, the block is dequantized once to fp32 exactly as the reference does it
// ((q - z) * s, or q * s), into a k-major [kBlockK][64] buffer that stays in L1; then
// every activation row of the task passes over it with an fp32 FMA micro-kernel (6 rows
// x 64 columns = 24 zmm accumulators). The dequantization is amortized over all rows.
//
// Small-M path (at most kMaxGemvRows rows): the weights are widened to fp32 in registers
// straight from the packed bytes and FMA'd into every row, without writing a block;
// for int4 the codes decode to q - 8 (one shift and one vpermps per 16) and the zero
// point and the scale are applied once per group,
// sum_k x (q - z) s = s * (sum_k x (q - 8) - (z - 8) * sum_k x), with the group sums of x
// computed once per call. bf16 activations at up to kVnniMaxRows rows (int8:
// kVnniMaxRowsInt8; on AMX CPUs AMX takes over first) take an integer GEMV instead
// (gemv_int4_vnni_avx512 and gemv_int8_vnni_avx512, below), with about half the vector
// instructions per code.
//
// Prepacked layouts (per panel p of 64 output columns; zero past N):
//   int4: w[p][k / 2][64] bytes: for the k pair (2i, 2i + 1), byte 32h + 2c + t holds
//         q[64p + 32h + c][2i + t] in its low nibble and q[64p + 32h + 16 + c][2i + t]
//         in its high nibble (h = 0, 1; c = 0..15; t = 0, 1), so that widening 32 bytes
//         gives one dword per column holding both k of the pair;
//         params[p][g][kInt4GroupBytes] bytes: the group's 64 fp32 scales, then its 64
//         uint8 zero points (8 for symmetric). Zero points are integers in [0, 15]: as bytes
//         they add 1/64 to the int4 codes where fp32 added 1/16 (G = 128; 1/16 against 1/4
//         at G = 32), and decode reads every byte once per token.
//   int8: w[p][k][64] int8 = q[64p + c][k]; scales stay canonical float32[N]
#pragma once

#include <cstdint>

namespace lowbit::cpu::wo {

constexpr int64_t kPanel = 64;
constexpr int64_t kBlockK = 128;   // k per dequantized block: 128 x 64 fp32 = 32 KiB
constexpr int64_t kRowChunk = 64;  // most rows per task: their fp32 activations (K = 4096: 1 MiB) stay in L2

// How far ahead of the weight row in use the FMA GEMVs prefetch into L1:
// the weight stream is their only DRAM traffic when the weights are not in cache. Measured
// (M = 1, weights past the LLC): 1 KiB 25-30% faster than none, 2 KiB faster again, 4 KiB
// slower. The integer GEMVs and the AMX GEMV, which decode runs, prefetch as several
// streams instead (prefetch.h).
constexpr int64_t kPrefetchBytes = 2048;

enum class Weights { kInt4, kInt8 };

// Bytes of one int4 group's parameters in a panel: 64 fp32 scales, 64 uint8 zero points.
constexpr int64_t kInt4GroupBytes = kPanel * sizeof(float) + kPanel;
// The same in floats: the stride between consecutive groups' scales.
constexpr int64_t kInt4GroupFloats = kInt4GroupBytes / sizeof(float);
static_assert(kInt4GroupBytes % 64 == 0, "each group's scales start on a cache line");

// One panel's weights and dequantization parameters.
struct Panel {
  Weights kind;
  const uint8_t* w;       // the panel's packed weights
  const uint8_t* params;  // int4: [groups][kInt4GroupBytes]; int8: the panel's 64 fp32 scales
  int64_t group_size;     // int4 only
  int64_t k;

  // Group g's 64 scales (int8: the panel's, whatever g).
  const float* scales(int64_t g = 0) const {
    return reinterpret_cast<const float*>(kind == Weights::kInt4 ? params + g * kInt4GroupBytes : params);
  }
  // Group g's 64 zero points (int4 only).
  const uint8_t* zeros(int64_t g) const { return params + g * kInt4GroupBytes + kPanel * sizeof(float); }
};

// Dequantizes k in [k0, k1) of the panel into out[(k - k0) * 64 + c].
void dequantize_block_avx512(const Panel& panel, int64_t k0, int64_t k1, float* out);
void dequantize_block_scalar(const Panel& panel, int64_t k0, int64_t k1, float* out);

// c[r][0..63] (+)= x[r][k0..k1) . block for rows [0, rows) (x row stride ldx, c row
// stride 64); zero_init starts from zero instead of adding to c.
void block_gemm_avx512(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                       bool zero_init);
void block_gemm_scalar(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                       bool zero_init);

// out[r][0, cols) = c[r][0, cols) (+ bias[0, cols)) for rows [0, rows), c's row stride
// kPanel, out's ldo elements, rounded as ATen rounds a float to the output dtype (nearest
// even; bf16 NaN as 0x7FC0), 16 columns at a time instead of one.
enum class OutType { kFloat, kBFloat16, kHalf };
void store_panel_avx512(const float* c, int64_t rows, int64_t cols, const float* bias, OutType type, void* out,
                        int64_t ldo);

// Up to kMaxGemvRows rows against an int8 panel without the fp32 block (the small-M
// path: it converts each weight once per tile of up to 4 rows and never stores it).
constexpr int64_t kMaxGemvRows = 8;
void gemv_int8_avx512(const float* x, int64_t ldx, int64_t rows, const Panel& panel, float* c);

// The same for an int4 panel; xsum[r][g] holds the group sums of row r of x (row stride
// k / group_size), for the zero points.
void gemv_int4_avx512(const float* x, int64_t ldx, int64_t rows, const float* xsum, const Panel& panel, float* c);

// Small-M path in integers, for bf16 activations (gemv_int{4,8}_vnni_avx512): each row of x
// becomes block floating point, one power-of-two exponent per chunk of k (a quantization
// group, or kVnniChunkK k when the group is longer), a 23-bit integer X per k split into
// three signed bytes, X = 2^16 d2 + 2^8 d1 + d0 (d0, d1 in [-128, 127]). vpdpbusd then takes
// 64 codes (u8) times 64 digits (s8) per instruction, and the zero point comes off exactly:
// sum_k X (q - z) = sum_p 2^(8p) (sum_k d_p q - z sum_k d_p), each term an integer below 2^24.
// A bf16 value within 2^-14 of its chunk's largest magnitude is exact in X; smaller ones
// round to the nearest 2^-22 of that magnitude (the one error beyond fp32 summation).
// Digits: [3][kpad] int8 per row (kpad = K rounded up to 4, zero past K); per chunk the
// three digit sums and the three unit values 2^(e + 8p), as floats.
constexpr int64_t kVnniChunkK = 4096;  // 15 * 128 * 4096 < 2^24: integer sums exact in fp32
struct FixedChunk {
  float digit_sum[3];
  float unit[3];
};
// Row x[0, k) into digits and chunks (chunk: k per chunk). Returns false, writing nothing
// useful, when the row holds a NaN or an infinity (block floating point has neither).
bool to_block_fixed_avx512(const float* x, int64_t k, int64_t chunk, int8_t* digits, int64_t kpad,
                           FixedChunk* chunks);
// The same, portable (wo_gemm.cpp), for the AVX2 integer GEMV: the same digits and chunks.
bool to_block_fixed_scalar(const float* x, int64_t k, int64_t chunk, int8_t* digits, int64_t kpad,
                           FixedChunk* chunks);
// c[r][0..63] (row stride 64) = rows r < rows (at most kVnniTileRows; digits and chunks as
// above, row after row) times an int4 panel. Each chunk of k passes the rows in turn, so
// that the rows after the first read its codes from L1.
constexpr int64_t kVnniTileRows = 4;
void gemv_int4_vnni_avx512(const int8_t* digits, int64_t kpad, const FixedChunk* chunks, int64_t chunk, int64_t rows,
                           const Panel& panel, float* c);
// The same for an int8 panel, whose rows are cut into chunks of kVnniChunkK8 k (int8 has no
// groups): the codes go through vpdpbusd as q + 128 (u8), 127 * 128 * 1024 < 2^24 after the
// 128 sum_k d comes off.
constexpr int64_t kVnniChunkK8 = 1024;
void gemv_int8_vnni_avx512(const int8_t* digits, int64_t kpad, const FixedChunk* chunks, const Panel& panel,
                           float* c);
// Most rows the automatic choice sends through them (bf16 activations, int4 weights). On
// AMX CPUs AMX (kAmxMinRowsInt4) takes over from 3 rows, where the three paths are within
// 5% (Sapphire Rapids, 2 threads, Llama-3-8B shapes, ms, vnni / FMA GEMV / AMX;
// bench/RESULTS.md, fourth pass: 4096 x 4096 at 1 row 0.37 / 0.55 / 0.83, 2 rows 0.49 /
// 0.64 / 0.73, 3 rows 0.75 / 0.88 / 0.91; 4096 x 14336 at 3 rows 2.87 / 2.99 / 2.89).
// Elsewhere it keeps them up to 5 rows, below the AVX512-BF16 kernel (kBf16MinRowsInt4):
// on Zen 4 (ms, vnni / FMA GEMV / vdpbf16ps) 2048 x 11264 at 3 rows 0.57 / 0.78 / 1.07, 5
// rows 0.96 / 1.39 / 1.20, 6 rows 1.24 / 1.56 / 1.35; 4096 x 4096 at 5 rows 0.75 / 0.99 /
// 0.72, 6 rows 0.87 / 1.19 / 0.78.
constexpr int64_t kVnniMaxRows = 5;
// int8: one row. Measured the same way (vnni / FMA GEMV, ms): 1 row 0.56 / 0.60 (4096 x
// 4096), 3.13 / 3.15 (4096 x 14336), 3.39 / 3.57 (14336 x 4096); 2 rows 0.80 / 0.73,
// 3.63 / 3.41, 4.48 / 3.75 (the FMA GEMV converts each code once for all rows).
constexpr int64_t kVnniMaxRowsInt8 = 1;

// AMX BF16 path (wo_gemm_amx.cpp): bf16 activations.
// decode (wo_gemm_bf16.cpp) writes pair rows [k0 / 2, k1 / 2) of the panel's (q - z)
// (int4) or q (int8) as bf16 in AMX's B layout (b[(k - k0) / 2][64][2]); gemm adds to c[rows][64] x[rows][k0, k1)
// (bf16, row stride ldx elements from column 0, rows a multiple of 16) times that, group
// g's 64 scales at scales + g * scale_stride applied per block (at most kAmxBlockK k, or
// the whole chunk when it lies in one group; group_size a multiple of 32; k0 and k1
// multiples of the block). The first block of K (k0 == 0) writes c instead of adding.
// Tasks of many rows are cut into kAmxRowChunk rows x kAmxChunkK k, so that the chunk of x
// (1 MiB) and the decoded chunk of the panel (256 KiB) stay in L2 while every row tile of
// the chunk passes over them: x comes from L2, not L3, and a long K no longer pushes the
// decoded panel (K = 14336: 1.8 MiB) out of L2. The cost: the panel is decoded once per
// row chunk. Measured here (2 threads, bf16 nn.Linear time / ours, 4 alternating processes
// each): 14336 x 4096 at M = 512 from 0.52-0.62 (whole panel over all rows) to 0.73-0.91;
// 4096 x 4096 at M = 512 0.80-0.93 before, 0.71-0.89 after; M = 2048 equal within the noise.
// 512 rows x 1024 k measured no better.
constexpr int64_t kAmxBlockK = 128;
constexpr int64_t kAmxRowChunk = 256;
constexpr int64_t kAmxChunkK = 2048;
void decode_int4_panel_bf16(const Panel& panel, int64_t k0, int64_t k1, uint16_t* b);
void decode_int8_panel_bf16(const Panel& panel, int64_t k0, int64_t k1, uint16_t* b);
void gemm_amx_bf16(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* b, int64_t k0, int64_t k1,
                   int64_t group_size, const float* scales, int64_t scale_stride, float* c);

// AVX512-BF16 path (wo_gemm_bf16.cpp), for CPUs with vdpbf16ps and no usable AMX: the
// same decoded chunks and driver as gemm_amx_bf16 (rows need no padding), multiplied by
// tiles of kBf16TileRows rows with vdpbf16ps; blocks end where the scales change (at most
// kBf16BlockK k, as for AMX).
constexpr int64_t kBf16TileRows = 6;
constexpr int64_t kBf16BlockK = 128;
// From how many rows the automatic choice takes it for bf16 activations: int4 after the
// integer GEMV's kVnniMaxRows, int8 after the FMA GEMV's kMaxGemvRows (the integer GEMV
// keeps int8 to 1 row: it lost from 2 rows on Sapphire Rapids). Measured here (AMD EPYC,
// Zen 4, 2 threads; ms, this kernel / the integer GEMV / the FMA GEMV; bench/RESULTS.md):
// int4 G = 128 at 8 rows 0.40 / 0.42 / 0.55 (2048 x 3072), 1.77 / 1.57 / 1.91 (2048 x
// 11264), 0.98 / 1.13 / 1.42 (4096 x 4096); at 12 rows 0.50 / 0.61 / 0.81, 2.00 / 2.15 /
// 2.75, 1.43 / 1.69 / 2.17. int8 at 8 rows 0.48 / 0.47 / 0.56, 2.21 / 1.64 / 1.87, 1.65 /
// 1.25 / 1.44; at 16 rows the FMA GEMM is 1.6-1.9x slower than this kernel. At 512 rows
// it is twice the FMA GEMM and level with torch's bf16 Linear.
constexpr int64_t kBf16MinRowsInt4 = 6;
constexpr int64_t kBf16MinRowsInt8 = 9;
void gemm_bf16_avx512(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* b, int64_t k0, int64_t k1,
                      int64_t group_size, const float* scales, int64_t scale_stride, float* c);

// Small M on AMX: at most kAmxSmallRows bf16 rows against one int4 or int8 panel, each
// 32-k block decoded into L1 right before its tile multiplies (no decoded panel); the
// driver takes it instead of gemm_amx_bf16 up to that many rows.
constexpr int64_t kAmxSmallRows = 16;
void gemv_amx_bf16(const uint16_t* x, int64_t ldx, int64_t rows, const Panel& panel, float* c);

// From how many rows the automatic choice moves bf16 activations from the in-register
// GEMV to AMX. Measured here (Sapphire Rapids, 2 threads, 4096 x 4096, interleaved
// medians of GEMV time / AMX time): int4 G = 128 0.69x at 1 row, 1.09x at 2, 1.33x at 3,
// 2.1x at 8; G = 32 (a block-end drain every 32 k) 0.85x at 2, 1.07x at 3, 2.0x at 8;
// int8 (heavier to decode, the GEMV reads it with two instructions) 0.68x at 4 rows,
// 1.06x at 5, 1.15x at 6, 1.34x at 8.
constexpr int64_t kAmxMinRowsInt4 = 3;
constexpr int64_t kAmxMinRowsInt8 = 6;

// The FMA kernels above for AVX2 + FMA CPUs (wo_gemm_avx2.cpp): 8-float vectors, the same
// layouts and results. The GEMVs take up to kMaxGemvRowsAvx2 rows in the automatic choice:
// at 8 rows of 4096 x 4096 and 4096 x 14336 (bf16, AVX2, 2 threads) the FMA GEMV took
// 0.55-0.60x the GEMM's time for W4A16 g128 and W8A16; at 12 rows the two are even for W4A16
// (bench/RESULTS.md).
void dequantize_block_avx2(const Panel& panel, int64_t k0, int64_t k1, float* out);
void block_gemm_avx2(const float* x, int64_t ldx, int64_t rows, const float* block, int64_t kb, float* c,
                     bool zero_init);
void gemv_int8_avx2(const float* x, int64_t ldx, int64_t rows, const Panel& panel, float* c);
void gemv_int4_avx2(const float* x, int64_t ldx, int64_t rows, const float* xsum, const Panel& panel, float* c);
constexpr int64_t kMaxGemvRowsAvx2 = 8;
// The integer GEMV of AVX2 CPUs: bf16 rows in block floating point (digits and chunks as
// for gemv_int4_vnni_avx512 above, one chunk per group: group_size at most kVnniChunkK),
// one row at a time against an int4 panel, codes times digits with vpmaddubsw. The
// automatic choice takes it for up to kIntMaxRowsAvx2 rows (more rows share each code's
// conversion on the FMA GEMV).
void gemv_int4_int_avx2(const int8_t* digits, int64_t kpad, const FixedChunk* chunks, const Panel& panel,
                        float* c);
constexpr int64_t kIntMaxRowsAvx2 = 1;

}  // namespace lowbit::cpu::wo
