"""The reference ops against independent computations: hand-worked cases and numpy.

The kernels are tested against lowbit.reference; these tests make sure the reference
itself computes what docs/design.md ("Canonical formats") says, so a wrong reference cannot hide behind
kernels that copy its mistake.
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import activation, int4_weight, int8_values, int8_weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit import reference

seeds = st.integers(0, 2**31 - 1)


def test_quantize_per_token_hand_worked():
    # s = 2.54 / 127 = 0.02: 1.27 / 0.02 = 63.5 -> 64 (half to even), 0.01 / 0.02 = 0.5 -> 0.
    x = torch.tensor([[2.54, -1.27, 0.01, -0.03], [0.0, 0.0, 0.0, 0.0]])
    q, s = reference.quantize_per_token(x)
    assert s[0].item() == np.float32(2.54) / np.float32(127)
    assert s[1].item() == 1.0
    expected = np.clip(np.rint(x[0].numpy() / np.float32(s[0].item())), -127, 127)
    assert q[0].tolist() == expected.astype(np.int8).tolist()
    assert q[0, 0].item() == 127 and q[1].tolist() == [0, 0, 0, 0]


def test_rounding_is_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])  # scale is exactly 1
    q, s = reference.quantize_per_token(x)
    assert s.item() == 1.0
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4]


@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.integers(1, 70), seed=seeds)
def test_int8_scaled_mm_equals_numpy_int64(m, n, k, seed):
    a, b = int8_values((m, k), seed), int8_values((n, k), seed + 1)
    sa, sb = torch.rand(m) + 0.5, torch.rand(n) + 0.5
    bias = torch.randn(n)
    acc = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    expected = (acc.astype(np.float32) * sa.numpy()[:, None]) * sb.numpy()[None, :] + bias.numpy()
    out = reference.int8_scaled_mm(a, b, sa, sb, bias, torch.float32)
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.float32))


@given(m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(2, 40), seed=seeds)
def test_w8a8_linear_equals_quantize_then_numpy(m, n, k, seed):
    x = activation((m, k), seed=seed)
    w, sw = int8_weight(n, k, seed)
    xs = np.abs(x.numpy()).max(axis=1) / np.float32(127)
    qx = np.clip(np.rint(x.numpy() / xs[:, None]), -127, 127).astype(np.int64)
    acc = qx @ w.numpy().astype(np.int64).T
    expected = (acc.astype(np.float32) * xs[:, None]) * sw.numpy()[None, :]
    np.testing.assert_array_equal(reference.w8a8_linear(x, w, sw, None).numpy(), expected)


@given(m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(1, 40), seed=seeds)
def test_w8a16_linear_equals_float64_numpy(m, n, k, seed):
    x = activation((m, k), seed=seed)
    w, sw = int8_weight(n, k, seed)
    expected = x.double().numpy() @ (w.double().numpy() * sw.double().numpy()[:, None]).T
    np.testing.assert_allclose(reference.w8a16_linear(x, w, sw, None).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_int4_packing_layout_even_k_low_nibble():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = reference.pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(reference.unpack_int4(packed), q)


@given(n=st.integers(1, 5), groups=st.integers(1, 3), g=st.sampled_from([32, 64]), sym=st.booleans(), seed=seeds)
def test_dequantize_int4_equals_elementwise_loop(n, groups, g, sym, seed):
    k = groups * g
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    out = reference.dequantize_int4(packed, scales, zeros, g, torch.float32)
    p, s = packed.numpy(), scales.numpy()
    for r in range(n):
        for c in range(k):
            nib = (p[r, c // 2] >> (4 * (c % 2))) & 0xF
            z = 8 if zeros is None else zeros[r, c // g].item()
            assert out[r, c].item() == np.float32(np.float32(int(nib) - z) * s[r, c // g])


@given(m=st.integers(1, 5), n=st.integers(1, 6), g=st.sampled_from([32, 64, 128]), sym=st.booleans(), seed=seeds)
def test_w4a16_linear_equals_float64_numpy(m, n, g, sym, seed):
    k = 2 * g
    x = activation((m, k), seed=seed)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    q = reference.unpack_int4(packed).double().numpy()
    z = 8.0 if zeros is None else np.repeat(zeros.double().numpy(), g, axis=1)
    w = (q - z) * np.repeat(scales.double().numpy(), g, axis=1)
    expected = x.double().numpy() @ w.T
    out = reference.w4a16_linear(x, packed, scales, zeros, g, None)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_outputs_take_the_activation_dtype_and_shape():
    x = activation((2, 3, 64), torch.bfloat16)
    w, sw = int8_weight(5, 64)
    packed, scales, zeros = int4_weight(5, 64, 32, False)
    for y in (reference.w8a8_linear(x, w, sw, None), reference.w8a16_linear(x, w, sw, None),
              reference.w4a16_linear(x, packed, scales, zeros, 32, None)):
        assert y.shape == (2, 3, 5) and y.dtype == torch.bfloat16
        assert y.float().abs().sum() > 0
