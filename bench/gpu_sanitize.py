"""Small calls of every CUDA-device kernel, for ``compute-sanitizer --tool memcheck``.

Ragged shapes (tails in every dimension) so out-of-bounds accesses at tile edges show up.
Each result is also compared with the reference, so the run fails on a wrong answer too.
"""

from __future__ import annotations

import torch

import lowbit
from lowbit import formats, reference
from lowbit.kernels import ops as tops
from lowbit.kernels import weight_only


def close(y, ref, tol):
    err = ((y.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.2e}"


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    m, n, k = 5, 77, 96
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev) / k**0.5
    qw8, s8 = formats.quantize_int8_per_channel(w)
    p4, sc4, z4 = formats.quantize_int4_groupwise(w, 32, symmetric=False)
    for impl in (lowbit.ops, tops):  # the CUDA (csrc/cuda) and Triton kernels
        q, s = impl.quantize_per_token(x)
        assert torch.equal(q.cpu(), reference.quantize_per_token(x.cpu())[0])
        close(impl.dequantize_int8(qw8, s8, torch.bfloat16), reference.dequantize_int8(qw8, s8, torch.bfloat16), 1e-2)
        close(impl.dequantize_int4(p4, sc4, z4, 32, torch.float16),
              reference.dequantize_int4(p4, sc4, z4, 32, torch.float16), 1e-3)
    for impl in (lowbit.ops, tops):  # the CUDA int8 tensor-core GEMM and the Triton one
        close(impl.w8a8_linear(x, qw8, s8, None, None), reference.w8a8_linear(x, qw8, s8, None), 1e-2)
        for rows in (1, 17, 130):  # every tile size of the CUDA GEMM, with tails
            a = torch.randint(-127, 128, (rows, k), device=dev, dtype=torch.int8)
            sa = torch.rand(rows, device=dev)
            assert torch.equal(impl.int8_scaled_mm(a, qw8, sa, s8, None, torch.float32),
                               reference.int8_scaled_mm(a, qw8, sa, s8, None, torch.float32))
    for rows in (1, 3, 5, 40):  # GEMV, GEMM with split-K, GEMM
        xr = torch.randn(rows, k, device=dev, dtype=torch.float16)
        for p, ref in ((weight_only.prepack_int4(p4, sc4, z4, 32), reference.w4a16_linear(xr, p4, sc4, z4, 32, None)),
                       (weight_only.prepack_int8(qw8, s8), reference.w8a16_linear(xr, qw8, s8, None))):
            for split in (1, 3):
                close(weight_only.linear(xr, p, split_k=split), ref, 1e-2)
    # The CUDA W4A16 GEMM: blocks of 1, 2 and 4 m16 tiles and the float32 kernel, with tails
    # (N = 77, K = 608) and with split-K at small M (K = 608 is ten 64-k stages: two splits).
    k4 = 608
    p4, sc4, z4 = formats.quantize_int4_groupwise(torch.randn(n, k4, device=dev) / k4**0.5, 32, symmetric=False)
    codes, s_t, z_t = (t.to(dev) for t in lowbit.ops.w4a16_cuda_prepack(p4.cpu(), sc4.cpu(), z4.cpu(), 32))
    for rows in (1, 5, 20, 40, 70):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            xr = torch.randn(rows, k4, device=dev, dtype=dtype)
            close(lowbit.ops.w4a16_linear_cuda_prepacked(xr, codes, s_t, z_t, 32, n, None),
                  reference.w4a16_linear(xr, p4, sc4, z4, 32, None), 1e-2)
    torch.cuda.synchronize()
    print("sanitizer cases ran")


if __name__ == "__main__":
    main()
