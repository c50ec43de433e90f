// A CPU model of the CUDA W4A16 GEMM (w4a16_kernels.cu), for testing its index math without
// a GPU; built only into the test extension lowbit._models.
//
// lowbit_model::w4a16_gemm(x, codes, scales_t, zeros_t, G, N, m_tiles, splits) -> float32
// x @ w'^T, replaying the launcher and the kernel block by block, split by split, warp by
// warp and lane by lane with the functions of w4a16_layout.h (the very ones the kernel uses):
//   - the launcher: K padded to a multiple of 8, m_tiles from tile_m_tiles (0) or as given;
//   - each stage as the loader fills it: x chunks into the swizzled rows, the 512 code
//     chunks, and the scale slots of the groups the slice starts (slots poisoned with 0xFF
//     bytes first — NaN scales, zero point 255 — so reading a slot the loader did not fill
//     shows in the result; more than kScaleSlots starts in a slice is an error);
//   - each warp's k16 steps: scales and zero points into the lanes' "registers" at the steps
//     that start a group (poisoned before the first), A fragments by ldmatrix.x4 from the
//     stage image, B fragments by taking each lane's 16-byte vector apart exactly as the
//     kernel's lop3 conversion does, one m16n8k16 product per m16 tile and n8 block scaled
//     by the group's scale into fp32 accumulators;
//   - the split-K epilogue in lock order: ((p0 + p1) + p2) + ...
// The hardware is modelled from the PTX ISA's definitions, written here independently of
// the layout header:
//   ldmatrix.m8n8.x4.b16: lane l receives, in register j, the two 16-bit values at bytes
//     4(l%4)..4(l%4)+3 of the row whose address lane 8j + l/4 supplied;
//   mma.m16n8k16 (16-bit): lane l (g = l/4, t = l%4) holds A[g][2t..2t+1] in a0,
//     A[g+8][2t..] in a1, A[g][2t+8..] in a2, A[g+8][2t+8..] in a3; B[2t..2t+1][g] in b0 and
//     B[2t+8..2t+9][g] in b1; D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cuda/int8_gemm_layout.h"
#include "cuda/w4a16_layout.h"

namespace lowbit::cuda {
namespace {

using namespace w4a16;

// One pipeline stage as the kernel's load_stage leaves it in shared memory: the x part as
// 16-bit slots (held as floats, indexed by byte offset / 2), codes and scale slots as bytes.
struct Stage {
  std::vector<float> x;
  std::vector<uint8_t> bytes;
};

struct Problem {
  const float* x;      // [m, k_real]
  int m, k_real, k;    // k: the launcher's K, padded to a multiple of 8
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;
  int np, group, mt;
};

void load_stage(Stage& st, const Problem& p, int m0, int n0, int k0, int k_begin) {
  st.x.assign(x_stage_bytes(p.mt) / 2, 0.0f);
  st.bytes.assign(stage_bytes(p.mt), 0xFF);
  for (int c = 0; c < 16 * p.mt * 8; ++c) {  // x: row c / 8, chunk c % 8 of 8 values, zero past m and k
    const int row = c / 8, chunk = c % 8, gm = m0 + row, gk = k0 + chunk * 8;
    float* dst = st.x.data() + int8_gemm::smem_offset(row, chunk) / 2;
    for (int e = 0; e < 8; ++e)
      dst[e] = gm < p.m && gk < p.k && gk + e < p.k_real ? p.x[static_cast<int64_t>(gm) * p.k_real + gk + e] : 0.0f;
  }
  for (int c = 0; c < kCodeChunks; ++c)
    std::memcpy(st.bytes.data() + code_offset(p.mt) + 16 * c,
                p.codes + 16 * vector_index(k0 / 16 + code_chunk_step(c), n0 / kWarpN + code_chunk_tile(c), p.np,
                                            code_chunk_lane(c)),
                16);
  int slot = 0;
  for (int j = 0; j < kKSteps; ++j) {
    const int k16 = k0 + 16 * j;
    if (!starts_group(k16, k_begin, p.group, p.k)) continue;
    TORCH_CHECK(slot < kScaleSlots, "the slice at k = ", k0, " starts more than ", kScaleSlots, " groups");
    const int64_t row = static_cast<int64_t>(step_group(k16, p.group, p.k)) * p.np;
    for (int c = 0; c < kSlotChunks; ++c) {
      const int col = n0 + slot_chunk_column(c);
      const uint8_t* src = slot_chunk_is_scale(c) ? reinterpret_cast<const uint8_t*>(p.scales + row + col)
                                                  : p.zeros + row + col;
      std::memcpy(st.bytes.data() + slot_offset(p.mt, slot) + 16 * c, src, 16);
    }
    ++slot;
  }
}

// ldmatrix.x4 over the stage's x part: the 16-bit pairs each lane receives, per register.
void ldmatrix_x4(float (&out)[32][4][2], const Stage& st, const int (&addr)[32]) {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e) out[lane][j][e] = st.x[(addr[8 * j + lane / 4] + 4 * (lane % 4)) / 2 + e];
}

at::Tensor w4a16_gemm_model(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& s_t,
                            const at::Tensor& z_t, int64_t group_size, int64_t out_features, int64_t m_tiles,
                            int64_t splits) {
  check_dtype(x, at::kFloat, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(), "the model takes a 2-D CPU float32 x");
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = s_t.contiguous(), zc = z_t.contiguous();
  const int m = static_cast<int>(x.size(0)), k_real = static_cast<int>(x.size(1)), n = static_cast<int>(out_features);
  Problem p{xc.const_data_ptr<float>(), m, k_real, round_up(k_real, 8), cc.const_data_ptr<uint8_t>(),
            sc.const_data_ptr<float>(), zc.const_data_ptr<uint8_t>(), static_cast<int>(s_t.size(1)),
            static_cast<int>(group_size), m_tiles > 0 ? static_cast<int>(m_tiles) : tile_m_tiles(m)};
  TORCH_CHECK_VALUE(p.mt == 1 || p.mt == 2 || p.mt == kMaxMTiles, "m_tiles must be 1, 2 or 4, got ", p.mt);
  const int kp = round_up(p.k, kBK);
  TORCH_CHECK_VALUE(splits >= 1 && splits <= kp / kBK, "splits must be in [1, ", kp / kBK, "], got ", splits);
  const int mi_count = m_tiles_per_warp(p.mt), warps = block_threads(p.mt) / 32;
  at::Tensor out = at::full({m, n}, std::numeric_limits<float>::quiet_NaN(), x.options());
  float* ov = out.mutable_data_ptr<float>();
  std::vector<float> ws(static_cast<size_t>(m) * n);
  const float poison = std::numeric_limits<float>::quiet_NaN();
  Stage st;
  for (int m0 = 0; m0 < m; m0 += 16 * p.mt)
    for (int n0 = 0; n0 < p.np; n0 += kBN)
      for (int split = 0; split < splits; ++split) {  // the lock's order
        const int k_begin = split_begin(split, static_cast<int>(splits), kp);
        const int k_end = split_begin(split + 1, static_cast<int>(splits), kp);
        // Per warp, per m16 tile, n8 block, lane and C register; the lanes' scale and zero registers.
        std::vector<float> acc(static_cast<size_t>(warps) * mi_count * 8 * 32 * 4, 0.0f);
        std::vector<float> scale(static_cast<size_t>(warps) * 32 * 8 * 2, poison);
        std::vector<float> zero(static_cast<size_t>(warps) * 32 * 8, 255.0f);
        for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
          load_stage(st, p, m0, n0, k0, k_begin);
          for (int warp = 0; warp < warps; ++warp) {
            const int warp_n = warp % kWarps, wm0 = (warp / kWarps) * 16 * mi_count;
            for (int kk = 0; kk < kKSteps; ++kk) {
              if (starts_group(k0 + 16 * kk, k_begin, p.group, p.k)) {
                const uint8_t* slot = st.bytes.data() + slot_offset(p.mt, slot_of_step(k0, kk, k_begin, p.group, p.k));
                for (int lane = 0; lane < 32; ++lane)
                  for (int b = 0; b < 8; ++b) {
                    const int g = lane / 4, t = lane % 4;
                    for (int e = 0; e < 2; ++e)
                      std::memcpy(&scale[((warp * 32 + lane) * 8 + b) * 2 + e],
                                  slot + 4 * (warp_n * kWarpN + 8 * b + 2 * t + e), 4);
                    zero[(warp * 32 + lane) * 8 + b] = slot[kSlotScaleBytes + warp_n * kWarpN + 8 * b + g];
                  }
              }
              // B fragments of the 8 n8 blocks: word w -> pairs p = 0..3 of nibbles (p, p + 4)
              // -> register (p & 1) of block 2w + (p >> 1); each lane subtracts its own zero point.
              float B[8][16][8];  // [block][k][n]
              for (int lane = 0; lane < 32; ++lane) {
                const uint8_t* vec = st.bytes.data() + code_offset(p.mt) + 16 * code_chunk(kk, warp_n, lane);
                const int g = lane / 4, t = lane % 4;
                for (int w = 0; w < 4; ++w) {
                  uint32_t word;
                  std::memcpy(&word, vec + 4 * w, 4);
                  for (int pr = 0; pr < 4; ++pr) {
                    const int block = 2 * w + (pr >> 1), reg = pr & 1;
                    const float z = zero[(warp * 32 + lane) * 8 + block];
                    B[block][2 * t + 8 * reg][g] = static_cast<float>((word >> (4 * pr)) & 0xF) - z;
                    B[block][2 * t + 8 * reg + 1][g] = static_cast<float>((word >> (4 * (pr + 4))) & 0xF) - z;
                  }
                }
              }
              for (int mi = 0; mi < mi_count; ++mi) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane) addr[lane] = int8_gemm::a_ldmatrix_offset(lane, wm0 + 16 * mi, kk);
                float regs[32][4][2];
                ldmatrix_x4(regs, st, addr);
                float A[16][16];
                for (int lane = 0; lane < 32; ++lane)
                  for (int r = 0; r < 4; ++r)
                    for (int e = 0; e < 2; ++e) A[lane / 4 + 8 * (r & 1)][2 * (lane % 4) + 8 * (r >> 1) + e] = regs[lane][r][e];
                for (int lane = 0; lane < 32; ++lane)
                  for (int b = 0; b < 8; ++b)
                    for (int i = 0; i < 4; ++i) {
                      const int row = lane / 4 + 8 * (i >> 1), col = 2 * (lane % 4) + (i & 1);
                      float sum = 0.0f;
                      for (int kx = 0; kx < 16; ++kx) sum += A[row][kx] * B[b][kx][col];
                      acc[(((warp * mi_count + mi) * 8 + b) * 32 + lane) * 4 + i] +=
                          sum * scale[((warp * 32 + lane) * 8 + b) * 2 + (i & 1)];
                    }
              }
            }
          }
        }
        for (int warp = 0; warp < warps; ++warp) {
          const int warp_n = warp % kWarps, wm0 = (warp / kWarps) * 16 * mi_count;
          for (int mi = 0; mi < mi_count; ++mi)
            for (int b = 0; b < 8; ++b)
              for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < 4; ++i) {
                  const int row = m0 + wm0 + 16 * mi + int8_gemm::acc_row(lane, i);
                  const int col = n0 + warp_n * kWarpN + 8 * b + int8_gemm::acc_col(lane, i);
                  if (row >= m || col >= n) continue;
                  const int64_t at = static_cast<int64_t>(row) * n + col;
                  float v = acc[(((warp * mi_count + mi) * 8 + b) * 32 + lane) * 4 + i];
                  if (split > 0) v = ws[at] + v;
                  if (split + 1 < splits) ws[at] = v;
                  else ov[at] = v;
                }
        }
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_model, m) {
  m.def(
      "w4a16_gemm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, int out_features, "
      "int m_tiles=0, int splits=1) -> Tensor");
  m.impl("w4a16_gemm", c10::DispatchKey::CPU, &w4a16_gemm_model);
}

}  // namespace lowbit::cuda
