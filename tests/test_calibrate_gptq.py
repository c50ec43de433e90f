"""GPTQ: better than round-to-nearest on correlated inputs, canonical parameters, exact
agreement with RTN when the Hessian is diagonal, safe on degenerate Hessians."""

from __future__ import annotations

import pytest
import torch
from lowbit.calibrate.gptq import factor_hessian, gptq_quantize
from lowbit.formats import Scheme, fake_quantize, from_codes, int4_params, int8_scale, quantize_weight

SCHEMES = ["w4a16-g32", "w4a16-g128", "w4a16-gK", "w4a16-g64-sym", "w8a16", "w8a8"]


def correlated_inputs(t, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # channels of different energy
    return (torch.randn(t, k, generator=g) @ mix) * scale


def output_error(x, w, wq):
    return (x @ (wq - w).T).pow(2).mean().item()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(scheme, act_order):
    s = Scheme.parse(scheme)
    k, n = 256, 96
    x = correlated_inputs(2048, k, seed=1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) / k**0.5
    h = x.T @ x / x.shape[0]
    codes, scales, zeros = gptq_quantize(w, h, s, act_order=act_order)
    wq = from_codes(s, codes, scales, zeros).dequantize()
    rtn = output_error(x, w, fake_quantize(w, s))
    gptq = output_error(x, w, wq)
    assert gptq < 0.75 * rtn, (gptq, rtn)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_diagonal_hessian_gives_round_to_nearest(scheme):
    # With H diagonal no error is propagated, so every column rounds to nearest.
    s = Scheme.parse(scheme)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.5)
    codes, scales, zeros = gptq_quantize(w, h, s)
    ref = quantize_weight(w, s)
    got = from_codes(s, codes, scales, zeros)
    assert torch.equal(got.qweight, ref.qweight)
    assert torch.equal(got.scales, ref.scales)
    assert (got.zeros is None) == (ref.zeros is None)
    if ref.zeros is not None:
        assert torch.equal(got.zeros, ref.zeros)


def test_act_order_uses_static_group_parameters_of_the_original_weight():
    s = Scheme.parse("w4a16-g32")
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    x = correlated_inputs(512, 128, seed=6)
    codes, scales, zeros = gptq_quantize(w, x.T @ x, s, act_order=True)
    es, ez = int4_params(w.reshape(16, 4, 32), symmetric=False)
    assert torch.equal(scales, es) and torch.equal(zeros, ez)
    codes8, scales8, _ = gptq_quantize(w, x.T @ x, Scheme.parse("w8a16"))
    assert torch.equal(scales8, int8_scale(w)) and codes8.dtype == torch.int8
    assert codes8.abs().max() <= 127 and codes.max() <= 15


def test_dead_inputs_zero_their_columns_and_rank_deficient_hessians_work():
    s = Scheme.parse("w4a16-g32")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))  # 16 tokens: rank 16 < 64
    x[:, 5] = 0
    codes, scales, zeros = gptq_quantize(w, x.T @ x, s)
    wq = from_codes(s, codes, scales, zeros).dequantize()
    assert torch.isfinite(wq).all()
    assert torch.all(wq[:, 5] == 0)


def test_dampening_is_raised_until_the_factorization_succeeds():
    h = torch.ones(8, 8)  # rank one
    h[0, 0] = 1 - 1e-9
    f = factor_hessian(h, damp=1e-12)
    assert torch.isfinite(f.upper).all()
    with pytest.raises(torch.linalg.LinAlgError):  # the requested dampening alone fails
        torch.linalg.cholesky(h + 1e-12 * h.diagonal().mean() * torch.eye(8))
    with pytest.raises(ValueError, match="not positive definite"):
        factor_hessian(-torch.eye(4), damp=0.01, name="layer.x")


def test_the_factor_is_built_in_place_and_shared():
    x = correlated_inputs(256, 64, seed=9)
    h = x.T @ x / 256
    expect = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        h + 0.01 * h.diagonal().mean() * torch.eye(64))), upper=True)
    own = h.clone()
    f = factor_hessian(own, overwrite=True)
    assert f.upper.data_ptr() == own.data_ptr()
    assert torch.allclose(f.upper, expect, rtol=1e-4, atol=1e-5)
    w = torch.randn(8, 64)
    s = Scheme.parse("w4a16-g32")
    a = gptq_quantize(w, f, s)
    b = gptq_quantize(w, h, s)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_hessians_are_refused():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="Hessian is"):
        gptq_quantize(w, torch.eye(16), Scheme.parse("w8a16"))
    h = torch.eye(32)
    h[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, h, Scheme.parse("w8a16"))
