// A CPU model of the CUDA W4A16 GEMM (w4a16_kernels.cu), for testing its weight order and
// fragment math without a GPU; built only into the test extension lowbit._models.
//
// lowbit_model::w4a16_gemm(x, codes, scales_t, zeros_t, G, N) -> float32 x @ w'^T:
//   replays the kernel per warp and lane: A fragments by the ISA's m16n8k16 definition,
//   B fragments by taking each lane's 16-byte vector apart exactly as the kernel's lop3
//   conversion does (pairs of nibbles p and p + 4, word by word), (q - z) exact, one
//   m16n8k16 product per k16 step scaled by the group's scale into fp32 accumulators.
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

#include "checks.h"
#include "cuda/w4a16_layout.h"

namespace lowbit::cuda {
namespace {

using namespace w4a16;

at::Tensor w4a16_gemm_model(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& s_t,
                            const at::Tensor& z_t, int64_t group_size, int64_t out_features) {
  check_dtype(x, at::kFloat, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.device().is_cpu(), "the model takes a 2-D CPU float32 x");
  const int m = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1)), n = static_cast<int>(out_features);
  const int np = static_cast<int>(s_t.size(1)), kp = round_up(k, kBK);
  const at::Tensor xc = x.contiguous();
  const float* xs = xc.const_data_ptr<float>();
  const uint8_t* cv = codes.const_data_ptr<uint8_t>();
  const float* sv = s_t.const_data_ptr<float>();
  const uint8_t* zv = z_t.const_data_ptr<uint8_t>();
  at::Tensor out = at::full({m, n}, std::numeric_limits<float>::quiet_NaN(), x.options());
  float* ov = out.mutable_data_ptr<float>();
  auto xat = [&](int row, int col) { return row < m && col < k ? xs[static_cast<int64_t>(row) * k + col] : 0.0f; };
  for (int m0 = 0; m0 < m; m0 += kBM)
    for (int n0 = 0; n0 < np; n0 += kBN)
      for (int warp = 0; warp < kWarps; ++warp) {
        const int wn0 = n0 + warp * kWarpN;
        float acc[32][8][4] = {};  // [lane][n8 block][C register]
        for (int k16 = 0; k16 < kp; k16 += 16) {
          const int group = k16 / static_cast<int>(group_size);
          // A fragments (ISA, m16n8k16): reg r of lane holds rows g + 8 (r & 1), k 2t + 8 (r >> 1) + e.
          float A[16][16];
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r)
              for (int e = 0; e < 2; ++e) {
                const int g = lane / 4, t = lane % 4;
                const int row = g + 8 * (r & 1), kk = 2 * t + 8 * (r >> 1) + e;
                A[row][kk] = xat(m0 + row, k16 + kk);
              }
          // B fragments, taken apart as the kernel does: word w -> pairs p = 0..3 of
          // nibbles (p, p + 4) -> register (p & 1) of block 2w + (p >> 1).
          float B[8][16][8];  // [block][k][n]
          for (int lane = 0; lane < 32; ++lane) {
            const uint8_t* vec = cv + vector_index(k16 / 16, wn0 / kWarpN, np, lane) * 16;
            const int g = lane / 4, t = lane % 4;
            for (int w = 0; w < 4; ++w) {
              uint32_t word;
              std::memcpy(&word, vec + 4 * w, 4);
              for (int p = 0; p < 4; ++p) {
                const int block = 2 * w + (p >> 1), reg = p & 1;
                const float z = zv[static_cast<int64_t>(group) * np + wn0 + 8 * block + g];
                const float lo = static_cast<float>((word >> (4 * p)) & 0xF) - z;
                const float hi = static_cast<float>((word >> (4 * (p + 4))) & 0xF) - z;
                // ISA: register reg holds k = 2t + 8 reg + e, column g.
                B[block][2 * t + 8 * reg][g] = lo;
                B[block][2 * t + 8 * reg + 1][g] = hi;
              }
            }
          }
          for (int lane = 0; lane < 32; ++lane)
            for (int block = 0; block < 8; ++block)
              for (int i = 0; i < 4; ++i) {
                const int row = lane / 4 + 8 * (i >> 1), col = 2 * (lane % 4) + (i & 1);
                float sum = 0.0f;
                for (int kk = 0; kk < 16; ++kk) sum += A[row][kk] * B[block][kk][col];
                acc[lane][block][i] += sum * sv[static_cast<int64_t>(group) * np + wn0 + 8 * block + col];
              }
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int block = 0; block < 8; ++block)
            for (int i = 0; i < 4; ++i) {
              const int row = m0 + lane / 4 + 8 * (i >> 1), col = wn0 + 8 * block + 2 * (lane % 4) + (i & 1);
              if (row < m && col < n) ov[static_cast<int64_t>(row) * n + col] = acc[lane][block][i];
            }
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_model, m) {
  m.def("w4a16_gemm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int group_size, int out_features) -> Tensor");
  m.impl("w4a16_gemm", c10::DispatchKey::CPU, &w4a16_gemm_model);
}

}  // namespace lowbit::cuda
