"""Weight quantization to the canonical formats: properties and extreme inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, int8_values, weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit import formats, ops, reference
from lowbit.formats import Scheme

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(FLOAT_DTYPES)
group_sizes = st.sampled_from([32, 64, 128, None])


def step_bound(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Half a quantization step per element, with a few fp32 ulps of slack."""
    per_element = scales.repeat_interleave(group_size, dim=1) if scales.dim() == 2 else scales[:, None].expand(-1, k)
    return per_element * 0.5 * (1 + 1e-5) + 1e-37


def rows(n, k, dtype, seed):
    return weight(n, k, seed=seed).mul(torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)


@given(n=st.integers(1, 20), half_k=st.integers(1, 80), seed=seeds)
def test_pack_unpack_round_trip_bit_exact(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    for impl in (reference, ops):
        assert torch.equal(impl.unpack_int4(impl.pack_int4(q)), q)
    packed = torch.randint(0, 256, (n, half_k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(reference.pack_int4(reference.unpack_int4(packed)), packed)


@given(n=st.integers(1, 16), k=st.integers(1, 200), dtype=dtypes, seed=seeds)
def test_int8_round_trip_within_half_a_step(n, k, dtype, seed):
    w = rows(n, k, dtype, seed)
    q, s = formats.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (n,)
    assert q.abs().max() <= 127
    err = (reference.dequantize_int8(q, s, torch.float32) - w.float()).abs()
    assert torch.all(err <= step_bound(s, k, k))


@given(n=st.integers(1, 16), groups=st.integers(1, 3), g=group_sizes, sym=st.booleans(), dtype=dtypes, seed=seeds)
def test_int4_round_trip_within_half_a_step(n, groups, g, sym, dtype, seed):
    k = groups * (g or 2 * (seed % 60 + 1))
    w = rows(n, k, dtype, seed)
    packed, s, z = formats.quantize_int4_groupwise(w, g, sym)
    gs = g or k
    assert packed.shape == (n, k // 2) and s.shape == (n, k // gs)
    assert (z is None) == sym
    if z is not None:
        assert z.dtype == torch.uint8 and z.max() <= 15
    err = (reference.dequantize_int4(packed, s, z, gs, torch.float32) - w.float()).abs()
    assert torch.all(err <= step_bound(s, k, gs))


def test_asymmetric_int4_zero_is_exact_and_range_includes_zero():
    # An all-positive group: lo is widened to 0, so z = 0 and 0.0 dequantizes exactly.
    w = torch.cat([torch.linspace(0.5, 2.0, 32), torch.linspace(-3, 1, 32)]).reshape(1, 64)
    w[0, 40] = 0.0
    packed, s, z = formats.quantize_int4_groupwise(w, 32, symmetric=False)
    assert z[0, 0].item() == 0 and s[0, 0].item() == pytest.approx(2.0 / 15)
    assert s[0, 1].item() == pytest.approx(4.0 / 15) and z[0, 1].item() == round(3 / (4 / 15))
    assert reference.dequantize_int4(packed, s, z, 32, torch.float32)[0, 40].item() == 0.0


def test_all_zero_weights_give_scale_one_and_zero_output():
    w = torch.zeros(3, 64)
    q, s = formats.quantize_int8_per_channel(w)
    assert torch.all(s == 1) and torch.all(q == 0)
    for sym in (False, True):
        packed, s4, z = formats.quantize_int4_groupwise(w, 32, sym)
        assert torch.all(s4 == 1)
        assert torch.all(reference.dequantize_int4(packed, s4, z, 32, torch.float32) == 0)


def test_one_huge_outlier_keeps_its_row_within_half_a_step():
    w = weight(4, 128)
    w[2, 17] = 1e4
    q, s = formats.quantize_int8_per_channel(w)
    assert s[2].item() == pytest.approx(1e4 / 127) and q[2, 17].item() == 127
    assert torch.all((reference.dequantize_int8(q, s, torch.float32) - w).abs() <= step_bound(s, 128, 128))
    assert s[0].item() < 1  # other rows keep their own fine scale


def test_denormal_weights_do_not_produce_nan():
    w = torch.full((2, 64), 1e-42)
    w[1] = -1e-44
    q, s = formats.quantize_int8_per_channel(w)
    assert torch.isfinite(s).all() and torch.isfinite(reference.dequantize_int8(q, s, torch.float32)).all()
    for sym in (False, True):
        packed, s4, z = formats.quantize_int4_groupwise(w, 32, sym)
        out = reference.dequantize_int4(packed, s4, z, 32, torch.float32)
        assert torch.isfinite(out).all() and (out - w).abs().max() <= 1e-41


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_quantize_like_their_fp32_values(dtype):
    w = weight(8, 64).to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(formats.quantize_int8_per_channel(w),
                                                  formats.quantize_int8_per_channel(w.float())))
    a4 = formats.quantize_int4_groupwise(w, 32, False)
    b4 = formats.quantize_int4_groupwise(w.float(), 32, False)
    assert all(torch.equal(a, b) for a, b in zip(a4, b4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a16", "w4a16-g32", "w4a16-g64-sym"])
def test_non_finite_weights_are_rejected_with_the_layer_name(bad, scheme):
    w = weight(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.fc1.*NaN or Inf"):
        formats.quantize_weight(w, Scheme.parse(scheme), name="encoder.layer.0.fc1")


def test_shapes_the_format_cannot_take_are_refused():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        formats.quantize_int4_groupwise(weight(4, 96), 64, False)
    with pytest.raises(ValueError, match="even in_features"):
        formats.quantize_int4_groupwise(weight(4, 33), None, False)
    with pytest.raises(ValueError, match="2-D"):
        formats.quantize_int8_per_channel(torch.randn(4))
    with pytest.raises(TypeError):
        formats.quantize_int8_per_channel(int8_values((4, 4)))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("w8a8", Scheme("w8a8")),
        ("W8A16", Scheme("w8a16")),
        ("w8a8-static", Scheme("w8a8-static")),
        ("w4a16", Scheme("w4a16", 128)),
        ("w4a16-g32", Scheme("w4a16", 32)),
        ("w4a16-gK-sym", Scheme("w4a16", None, True)),
    ],
)
def test_scheme_strings_parse_and_print_back(text, expected):
    scheme = Scheme.parse(text)
    assert scheme == expected
    assert Scheme.parse(str(scheme)) == scheme


@pytest.mark.parametrize("text", ["w4a16-g48", "w8a8-g32", "int4", "w4a16-sym-g32", "w8a16-sym"])
def test_bad_scheme_strings_are_refused(text):
    with pytest.raises(ValueError):
        Scheme.parse(text)


def test_quantize_weight_records_the_canonical_tensors():
    w = weight(6, 128, torch.bfloat16)
    qw = formats.quantize_weight(w, Scheme.parse("w4a16-g64"))
    assert (qw.out_features, qw.in_features, qw.group_size) == (6, 128, 64)
    assert set(qw.tensors()) == {"qweight", "scales", "zeros"}
    assert qw.nbytes() == 6 * 64 + 6 * 2 * 4 + 6 * 2
    static = formats.quantize_weight(w, Scheme("w8a8-static"), act_scale=torch.tensor([0.1]))
    assert set(static.tensors()) == {"qweight", "scales", "act_scale"}
    with pytest.raises(ValueError, match="activation scale"):
        formats.quantize_weight(w, Scheme("w8a8-static"))
    with pytest.raises(ValueError, match="activation scale"):
        formats.quantize_weight(w, Scheme("w8a8"), act_scale=torch.tensor([0.1]))


@pytest.mark.parametrize("scheme", ["w8a8", "w8a16", "w4a16-g32", "w4a16-g128-sym", "w4a16-gK"])
def test_fake_quantize_is_quantize_then_dequantize(scheme):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(7)) * 3
    s = formats.Scheme.parse(scheme)
    act = torch.tensor([0.1]) if s.kind == "w8a8-static" else None
    assert torch.equal(formats.fake_quantize(w, s), formats.quantize_weight(w, s, act_scale=act).dequantize())
