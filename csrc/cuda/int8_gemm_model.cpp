// A CPU model of the CUDA int8 GEMM's data movement, for testing its index math without a
// GPU: op lowbit_model::int8_gemm(a, b, tile) -> int32 a @ b^T; tile kWgmmaTile models the
// Hopper (wgmma) kernel.
//
// It replays, per block of the chosen Tile and per warp and lane, what int8_gemm_kernels.cu
// does — the cp.async copies into swizzled shared memory, the ldmatrix.x4 row addresses,
// the fragment bookkeeping and the accumulator -> output mapping — with the index
// functions of int8_gemm_layout.h (the very ones the kernel uses). The hardware is modelled
// from the PTX ISA's definitions, written here independently of the layout header:
//   ldmatrix.m8n8.x4.b16: lane l receives, in register j, bytes 4(l%4)..4(l%4)+3 of the row
//     whose address lane 8j + l/4 supplied;
//   mma.m16n8k32.row.col.s8: lane l (g = l/4, t = l%4) holds A[g][4t..4t+3] in a0,
//     A[g+8][4t..] in a1, A[g][16+4t..] in a2, A[g+8][16+4t..] in a3; B[k][g] for
//     k = 4t..4t+3 in b0 and 16+4t.. in b1; D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
// Built only into the test extension lowbit._models (no CUDA needed); slow, for small
// test shapes only.
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cuda/int8_gemm_layout.h"

namespace lowbit::cuda {
namespace {

using namespace int8_gemm;
using Regs4 = std::array<uint32_t, 4>;

// ldmatrix.x4 as the PTX ISA defines it, from the 32 lanes' row addresses.
std::array<Regs4, 32> ldmatrix_x4(const uint8_t* smem, const std::array<int, 32>& addr) {
  std::array<Regs4, 32> out{};
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) std::memcpy(&out[lane][j], smem + addr[8 * j + lane / 4] + 4 * (lane % 4), 4);
  return out;
}

// The kernels' load_tile: the tile_rows x 128-k slice at (row0, k0) of a K-major int8
// matrix into a swizzled stage tile, zero past `rows` and past k.
void copy_tile(uint8_t* tile, int tile_rows, const int8_t* src, int rows, int row0, int k0, int k) {
  for (int row = 0; row < tile_rows; ++row)
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      const int grow = row0 + row, gk = k0 + chunk * 16;
      uint8_t* dst = tile + smem_offset(row, chunk);
      if (grow < rows && gk < k) std::memcpy(dst, src + static_cast<int64_t>(grow) * k + gk, 16);
      else std::memset(dst, 0, 16);
    }
}

int8_t byte_of(uint32_t reg, int i) { return static_cast<int8_t>((reg >> (8 * i)) & 0xFF); }

// mma.m16n8k32 s8 x s8 + s32 over the warp's fragments, as the PTX ISA defines them.
void mma(std::array<std::array<int32_t, 4>, 32>& c, const std::array<Regs4, 32>& a,
         const std::array<std::array<uint32_t, 2>, 32>& b) {
  int8_t A[16][32], B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      A[g][4 * t + i] = byte_of(a[lane][0], i);
      A[g + 8][4 * t + i] = byte_of(a[lane][1], i);
      A[g][16 + 4 * t + i] = byte_of(a[lane][2], i);
      A[g + 8][16 + 4 * t + i] = byte_of(a[lane][3], i);
      B[4 * t + i][g] = byte_of(b[lane][0], i);
      B[16 + 4 * t + i][g] = byte_of(b[lane][1], i);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) sum += int32_t{A[rows[i]][k]} * int32_t{B[k][cols[i]]};
      c[lane][i] += sum;
    }
  }
}

template <typename T>
void model_block(const int8_t* a, const int8_t* b, int m, int n, int k, int bm, int bn, int32_t* out) {
  const int m0 = bm * T::BM, n0 = bn * T::BN;
  std::vector<uint8_t> stage(T::STAGE_BYTES);
  // acc[warp][mi][ni][lane][i]
  std::vector<std::array<std::array<int32_t, 4>, 32>> acc(T::WARPS_M * T::WARPS_N * T::MI * T::NI);
  auto accum = [&](int warp, int mi, int ni) -> auto& { return acc[(warp * T::MI + mi) * T::NI + ni]; };
  for (int k0 = 0; k0 < k; k0 += kBK) {
    copy_tile(stage.data(), T::BM, a, m, m0, k0, k);
    copy_tile(stage.data() + T::BM * kBK, T::BN, b, n, n0, k0, k);
    const uint8_t* sa = stage.data();
    const uint8_t* sb = sa + T::BM * kBK;
    for (int warp = 0; warp < T::WARPS_M * T::WARPS_N; ++warp) {
      const int wm0 = (warp / T::WARPS_N) * T::WM, wn0 = (warp % T::WARPS_N) * T::WN;
      for (int kk = 0; kk < kKSteps; ++kk) {
        std::vector<std::array<Regs4, 32>> af(T::MI);
        std::vector<std::array<std::array<uint32_t, 2>, 32>> bf(T::NI);
        for (int mi = 0; mi < T::MI; ++mi) {
          std::array<int, 32> addr{};
          for (int lane = 0; lane < 32; ++lane) addr[lane] = a_ldmatrix_offset(lane, wm0 + mi * 16, kk);
          af[mi] = ldmatrix_x4(sa, addr);
        }
        for (int np = 0; np < T::NI / 2; ++np) {
          std::array<int, 32> addr{};
          for (int lane = 0; lane < 32; ++lane) addr[lane] = b_ldmatrix_offset(lane, wn0 + np * 16, kk);
          const auto r = ldmatrix_x4(sb, addr);
          for (int lane = 0; lane < 32; ++lane) {
            bf[2 * np][lane] = {r[lane][0], r[lane][1]};
            bf[2 * np + 1][lane] = {r[lane][2], r[lane][3]};
          }
        }
        for (int mi = 0; mi < T::MI; ++mi)
          for (int ni = 0; ni < T::NI; ++ni) mma(accum(warp, mi, ni), af[mi], bf[ni]);
      }
    }
  }
  for (int warp = 0; warp < T::WARPS_M * T::WARPS_N; ++warp) {
    const int wm0 = (warp / T::WARPS_N) * T::WM, wn0 = (warp % T::WARPS_N) * T::WN;
    for (int mi = 0; mi < T::MI; ++mi)
      for (int ni = 0; ni < T::NI; ++ni)
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) {
            const int gm = m0 + wm0 + mi * 16 + acc_row(lane, i), gn = n0 + wn0 + ni * 8 + acc_col(lane, i);
            if (gm < m && gn < n) out[static_cast<int64_t>(gm) * n + gn] = accum(warp, mi, ni)[lane][i];
          }
  }
}

// An element of a K-major operand that a wgmma matrix descriptor (128-byte swizzling)
// describes, as the PTX ISA defines it: (row r, k byte kb) lies at
// start + (r / 8) * SBO + (r % 8) * 128 + kb, with address bits 4-6 XOR-ed with bits 7-9
// (the stage buffer here stands for a 1024-byte aligned shared-memory tile).
int8_t wgmma_element(const uint8_t* smem, unsigned long long desc, int r, int kb) {
  TORCH_CHECK(desc >> 62 == 1, "the model reads 128-byte swizzled descriptors only");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  uint32_t addr = start + (r / 8) * sbo + (r % 8) * 128 + kb;
  addr ^= ((addr >> 7) & 7) << 4;
  return static_cast<int8_t>(smem[addr]);
}

// The Hopper kernel (int8_gemm_wgmma_kernel): the same stage layout, read per warpgroup
// through the descriptors the kernel builds; the m64n128 accumulator is handed out to
// threads as mma.m16n8 C fragments, warp w of a warpgroup holding rows 16w..16w+15.
void model_wgmma_block(const int8_t* a, const int8_t* b, int m, int n, int k, int bm, int bn, int32_t* out) {
  const int m0 = bm * kWgmmaBM, n0 = bn * kWgmmaBN;
  std::vector<uint8_t> stage(kWgmmaStageBytes);
  std::vector<int32_t> d(2 * 64 * 128, 0);  // [warpgroup][row][col], as the hardware computes it
  for (int k0 = 0; k0 < k; k0 += kBK) {
    copy_tile(stage.data(), kWgmmaBM, a, m, m0, k0, k);
    copy_tile(stage.data() + kWgmmaBM * kBK, kWgmmaBN, b, n, n0, k0, k);
    for (int wg = 0; wg < 2; ++wg) {
      const unsigned a_base = wg * 64 * kBK, b_base = kWgmmaBM * kBK;
      for (int kk = 0; kk < kKSteps; ++kk) {
        const unsigned long long da = wgmma_desc(a_base + kk * kKStep), db = wgmma_desc(b_base + kk * kKStep);
        for (int r = 0; r < 64; ++r)
          for (int c = 0; c < 128; ++c) {
            int32_t sum = 0;
            for (int kb = 0; kb < kKStep; ++kb)
              sum += int32_t{wgmma_element(stage.data(), da, r, kb)} * int32_t{wgmma_element(stage.data(), db, c, kb)};
            d[(wg * 64 + r) * 128 + c] += sum;
          }
      }
    }
  }
  for (int wg = 0; wg < 2; ++wg)
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < kWgmmaBN / 8; ++j)
          for (int i = 0; i < 4; ++i) {
            // ISA: register 4j + i of thread (warp, lane) is D[16 warp + g + 8 (i / 2)][8j + 2t + i % 2].
            const int hr = 16 * warp + lane / 4 + 8 * (i / 2), hc = 8 * j + 2 * (lane % 4) + i % 2;
            const int32_t reg = d[(wg * 64 + hr) * 128 + hc];
            // The kernel's epilogue places it at:
            const int gm = m0 + wg * 64 + warp * 16 + acc_row(lane, i), gn = n0 + 8 * j + acc_col(lane, i);
            if (gm < m && gn < n) out[static_cast<int64_t>(gm) * n + gn] = reg;
          }
}

template <typename T>
void model_gemm(const int8_t* a, const int8_t* b, int m, int n, int k, int32_t* out) {
  for (int bm = 0; bm * T::BM < m; ++bm)
    for (int bn = 0; bn * T::BN < n; ++bn) model_block<T>(a, b, m, n, k, bm, bn, out);
}

at::Tensor int8_gemm_model(const at::Tensor& a, const at::Tensor& b, int64_t tile) {
  check_matrix(a, at::kChar, "a");
  check_matrix(b, at::kChar, "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "a is [M, K] = ", a.sizes(), " but b is [N, K] = ", b.sizes());
  TORCH_CHECK_VALUE(a.size(1) % 16 == 0, "the CUDA int8 GEMM needs K to be a multiple of 16, got K = ", a.size(1));
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), "the model runs on CPU tensors");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int m = static_cast<int>(a.size(0)), n = static_cast<int>(b.size(0)), k = static_cast<int>(a.size(1));
  // Every output starts as a sentinel, so a position the epilogue never writes shows.
  at::Tensor out = at::full({m, n}, INT32_MIN, a.options().dtype(at::kInt));
  switch (tile) {
#define LOWBIT_TILE_CASE(id, bm, bn, wm, wn, stages)                                                  \
  case id:                                                                                           \
    model_gemm<Tile<bm, bn, wm, wn, stages>>(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), m, n, k, \
                                             out.mutable_data_ptr<int32_t>());                      \
    break;
    LOWBIT_INT8_GEMM_TILES(LOWBIT_TILE_CASE)
#undef LOWBIT_TILE_CASE
    case kWgmmaTile:
      for (int bm = 0; bm * kWgmmaBM < m; ++bm)
        for (int bn = 0; bn * kWgmmaBN < n; ++bn)
          model_wgmma_block(ac.const_data_ptr<int8_t>(), bc.const_data_ptr<int8_t>(), m, n, k, bm, bn,
                            out.mutable_data_ptr<int32_t>());
      break;
    default: TORCH_CHECK_VALUE(false, "tile must be in [0, ", kWgmmaTile, "], got ", tile);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lowbit_model, m) {
  m.def("int8_gemm(Tensor a, Tensor b, int tile) -> Tensor");
  m.impl("int8_gemm", c10::DispatchKey::CPU, &int8_gemm_model);
}

}  // namespace lowbit::cuda
