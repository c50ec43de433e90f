// The CUDA W4A16 GEMM's weight prepack and its inverse (both run on the CPU; the backend
// moves the prepacked tensors to the GPU).
//
// lowbit::w4a16_cuda_prepack(packed, scales, zeros, G) -> (codes, scales_t, zeros_t):
//   codes uint8[KP/16 * NP/64 * 512] in the order of w4a16_layout.h; scales_t float32 and
//   zeros_t uint8 [ceil(KP/G), NP] (k-major, so a lane's columns are contiguous; padded
//   rows and columns have scale 0; symmetric weights get zero point 8).
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "cuda/w4a16_layout.h"

namespace lowbit::cuda {
namespace {

using namespace w4a16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> w4a16_cuda_prepack(const at::Tensor& packed, const at::Tensor& scales,
                                                                  const std::optional<at::Tensor>& zeros,
                                                                  int64_t group_size) {
  check_int4_weight(packed, scales, zeros, group_size);
  TORCH_CHECK_VALUE(packed.device().is_cpu(), "w4a16_cuda_prepack runs on CPU tensors (the backend moves the result)");
  // The kernel subtracts {magic + z} in 16 bits, exact for the int4 zero points 0..15.
  TORCH_CHECK_VALUE(!zeros || zeros->numel() == 0 || zeros->max().item<uint8_t>() <= 15,
                    "zeros must lie in [0, 15] (int4 zero points), got ", zeros->max().item<int>());
  const int n = static_cast<int>(packed.size(0)), k = static_cast<int>(packed.size(1) * 2);
  const int np = round_up(n, kBN), kp = round_up(k, kBK);
  const int groups = k / static_cast<int>(group_size), groups_p = (kp + group_size - 1) / group_size;
  const at::Tensor pc = packed.contiguous();
  const uint8_t* src = pc.const_data_ptr<uint8_t>();
  auto code = [&](int row, int col) -> uint8_t {  // int4 code of w[row (n), col (k)]; 0 in the padding
    if (row >= n || col >= k) return 0;
    const uint8_t byte = src[static_cast<int64_t>(row) * (k / 2) + col / 2];
    return col % 2 ? byte >> 4 : byte & 0x0F;
  };
  at::Tensor codes = at::empty({static_cast<int64_t>(kp) / 16 * (np / kWarpN) * 512}, packed.options());
  uint8_t* dst = codes.mutable_data_ptr<uint8_t>();
  for (int kt = 0; kt < kp / 16; ++kt)
    for (int nt = 0; nt < np / kWarpN; ++nt)
      for (int lane = 0; lane < 32; ++lane) {
        uint8_t* vec = dst + vector_index(kt, nt, np, lane) * 16;
        std::memset(vec, 0, 16);
        for (int word = 0; word < 4; ++word)
          for (int nib = 0; nib < 8; ++nib) {
            const uint8_t q = code(nt * kWarpN + nibble_n(lane, word, nib), kt * 16 + nibble_k(lane, nib));
            vec[4 * word + nib / 2] |= nib % 2 ? q << 4 : q;
          }
      }
  at::Tensor s_t = at::zeros({groups_p, np}, scales.options());
  s_t.narrow(0, 0, groups).narrow(1, 0, n).copy_(scales.t());
  at::Tensor z_t = at::full({groups_p, np}, 8, packed.options());
  if (zeros) z_t.narrow(0, 0, groups).narrow(1, 0, n).copy_(zeros->t());
  return {codes, s_t, z_t};
}

// The exact inverse of w4a16_cuda_prepack (CPU tensors): (packed uint8[N, K/2], scales
// float32[N, K/G], zeros uint8[N, K/G]); symmetric weights come back with zero point 8.
std::tuple<at::Tensor, at::Tensor, at::Tensor> w4a16_cuda_unpack(const at::Tensor& codes, const at::Tensor& s_t,
                                                                 const at::Tensor& z_t, int64_t group_size,
                                                                 int64_t out_features, int64_t in_features) {
  check_dtype(codes, at::kByte, "codes");
  check_dtype(s_t, at::kFloat, "scales");
  check_dtype(z_t, at::kByte, "zeros");
  TORCH_CHECK_VALUE(codes.device().is_cpu() && s_t.device().is_cpu() && z_t.device().is_cpu(),
                    "w4a16_cuda_unpack runs on CPU tensors");
  const int n = static_cast<int>(out_features), k = static_cast<int>(in_features);
  TORCH_CHECK_VALUE(n > 0 && k > 0 && k % 2 == 0, "w4a16_cuda_unpack: bad shape [N, K] = [", n, ", ", k, "]");
  check_group_size(group_size, k);
  const int np = round_up(n, kBN), kp = round_up(k, kBK);
  const int groups = k / static_cast<int>(group_size), groups_p = (kp + group_size - 1) / group_size;
  TORCH_CHECK_VALUE(codes.numel() == static_cast<int64_t>(kp) / 16 * (np / kWarpN) * 512 &&
                        s_t.sizes() == at::IntArrayRef({groups_p, np}) && z_t.sizes() == at::IntArrayRef({groups_p, np}),
                    "codes, scales and zeros must come from w4a16_cuda_prepack of an [N, K] = [", n, ", ", k,
                    "] weight with group_size ", group_size);
  const at::Tensor cc = codes.contiguous();
  const uint8_t* src = cc.const_data_ptr<uint8_t>();
  at::Tensor packed = at::zeros({n, k / 2}, codes.options());
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();
  for (int kt = 0; kt < kp / 16; ++kt)
    for (int nt = 0; nt < np / kWarpN; ++nt)
      for (int lane = 0; lane < 32; ++lane) {
        const uint8_t* vec = src + vector_index(kt, nt, np, lane) * 16;
        for (int word = 0; word < 4; ++word)
          for (int nib = 0; nib < 8; ++nib) {
            const int row = nt * kWarpN + nibble_n(lane, word, nib), col = kt * 16 + nibble_k(lane, nib);
            if (row >= n || col >= k) continue;
            const uint8_t byte = vec[4 * word + nib / 2];
            const uint8_t q = nib % 2 ? byte >> 4 : byte & 0x0F;
            dst[static_cast<int64_t>(row) * (k / 2) + col / 2] |= col % 2 ? q << 4 : q;
          }
      }
  at::Tensor scales = s_t.narrow(0, 0, groups).narrow(1, 0, n).t().contiguous();
  at::Tensor zeros = z_t.narrow(0, 0, groups).narrow(1, 0, n).t().contiguous();
  return {packed, scales, zeros};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("w4a16_cuda_prepack", &w4a16_cuda_prepack);
  m.impl("w4a16_cuda_unpack", &w4a16_cuda_unpack);
}

}  // namespace lowbit::cuda
