"""Per-op microbenchmarks under pytest-benchmark, comparable across runs:

    pytest bench/test_microbench.py --benchmark-only --benchmark-autosave
    pytest bench/test_microbench.py --benchmark-only --benchmark-compare

Each benchmark first checks its op against the reference on the same inputs, so a
fast wrong kernel fails instead of being timed. The side-by-side ratio tables against
torch's own paths are bench/cpu.py's job.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import formats, ops, reference

K = N = 2048


def inputs(m, dtype):
    gen = torch.Generator().manual_seed(m)
    return torch.randn(m, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen) / K**0.5


@pytest.mark.parametrize("m", [1, 32, 256])
def test_w8a8_linear(benchmark, m):
    x, w = inputs(m, torch.float32)
    q, s = formats.quantize_int8_per_channel(w)
    packed = ops.int8_prepack(q)
    assert torch.equal(ops.w8a8_linear_prepacked(x, packed, s), reference.w8a8_linear(x, q, s, None))
    benchmark(ops.w8a8_linear_prepacked, x, packed, s)


@pytest.mark.parametrize("m", [1, 32, 256])
def test_w4a16_linear_bf16(benchmark, m):
    x, w = inputs(m, torch.bfloat16)
    packed, scales, zeros = formats.quantize_int4_groupwise(w, 128, False)
    wp, params = ops.w4a16_prepack(packed, scales, zeros, 128)
    y = ops.w4a16_linear_prepacked(x, wp, params, 128, N)
    ref = reference.w4a16_linear(x, packed, scales, zeros, 128, None)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    benchmark(ops.w4a16_linear_prepacked, x, wp, params, 128, N)


@pytest.mark.parametrize("m", [1, 32, 256])
def test_w8a16_linear_bf16(benchmark, m):
    x, w = inputs(m, torch.bfloat16)
    q, s = formats.quantize_int8_per_channel(w)
    wp = ops.w8a16_prepack(q)
    torch.testing.assert_close(ops.w8a16_linear_prepacked(x, wp, s), reference.w8a16_linear(x, q, s, None),
                               rtol=2e-2, atol=2e-2)
    benchmark(ops.w8a16_linear_prepacked, x, wp, s)


@pytest.mark.parametrize("m", [1, 256])
def test_quantize_per_token(benchmark, m):
    x, _ = inputs(m, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ops.quantize_per_token(x), reference.quantize_per_token(x)))
    benchmark(ops.quantize_per_token, x)
