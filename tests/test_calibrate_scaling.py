"""SmoothQuant factors by hand and its alpha search against each candidate's error computed
apart; AWQ scale and clip searches against round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from lowbit.calibrate.scaling import awq_clip_search, awq_scale_search, smoothquant_factors, smoothquant_search
from lowbit.formats import Scheme, fake_quantize


def test_smoothquant_factors_by_hand():
    act_max = torch.tensor([4.0, 1.0, 0.0])
    w1 = torch.tensor([[1.0, -0.25, 2.0]])
    w2 = torch.tensor([[-0.5, 1.0, 1.0]])
    s = smoothquant_factors(act_max, [w1, w2], alpha=0.5)
    assert s[0].item() == pytest.approx((4**0.5) / (1**0.5))
    assert s[1].item() == pytest.approx(1.0)
    assert s[2].item() == 1.0  # never-seen channel keeps its scale
    s1 = smoothquant_factors(act_max, [w1, w2], alpha=1.0)
    assert s1[0].item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_factors(act_max, [w1], alpha=1.5)


def salient_inputs(t, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: k // 32]] *= 20  # a few salient channels
    return x


@pytest.mark.parametrize("scheme", ["w4a16-g128", "w4a16-g32-sym", "w8a16"])
def test_awq_scale_search_reduces_output_error(scheme):
    s = Scheme.parse(scheme)
    x = salient_inputs(1024, 256, seed=1)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) / 16
    scale, err, base = awq_scale_search(x, x.abs().mean(0), [w], s, grid=20)
    assert err < 0.7 * base
    direct = ((x @ (fake_quantize(w * scale, s) / scale - w).T) ** 2).mean().item()
    assert direct == pytest.approx(err, rel=1e-4)
    assert (scale > 0).all() and torch.isfinite(scale).all()


def test_awq_clip_search_reduces_output_error():
    s = Scheme.parse("w4a16-g32")
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3))
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    clipped = awq_clip_search(x, w, s, grid=20, max_shrink=0.5, chunk=16)
    before = ((x @ (fake_quantize(w, s) - w).T) ** 2).mean()
    after = ((x @ (fake_quantize(clipped, s) - w).T) ** 2).mean()
    assert after < 0.97 * before  # about 5% on Gaussian weights at 4 bits
    assert (clipped.abs() <= w.abs() + 1e-6).all()  # clipping only shrinks


def _smoothquant_error(x, w, alpha, scheme):
    """The output error of one candidate, computed apart from the search's own code."""
    ranges = x[0::2].abs().amax(0) if scheme.static_activations else x.abs().amax(0)
    s = torch.ones(x.shape[1]) if alpha is None else smoothquant_factors(ranges, [w], alpha)
    if scheme.static_activations:  # s and the scale from the even rows, the error on the odd ones
        step = (ranges / s).amax() / 127
        x = x[1::2]
        xq = torch.clamp(torch.round(x / s / step), -127, 127) * step
    else:
        step = (x / s).abs().amax(-1, keepdim=True) / 127
        xq = torch.clamp(torch.round(x / s / step), -127, 127) * step
    return ((xq @ fake_quantize(w * s, scheme).T - x @ w.T) ** 2).mean().item()


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_smoothquant_search_picks_the_alpha_with_the_least_output_error(scheme):
    s = Scheme.parse(scheme)
    x = salient_inputs(512, 256, seed=5)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(6)) / 16
    act_max = x.abs().amax(0)
    scale, alpha = smoothquant_search(x, act_max, [w], s, grid=10)
    errors = {a: _smoothquant_error(x, w, a, s) for a in [None] + [i / 10 for i in range(11)]}
    assert errors[alpha] == pytest.approx(min(errors.values()), rel=1e-3)
    assert errors[alpha] < 0.5 * errors[None]  # salient channels: smoothing pays
    expected = torch.ones(256) if alpha is None else smoothquant_factors(act_max, [w], alpha)
    torch.testing.assert_close(scale, expected)


def test_smoothquant_search_takes_the_ranks_reduced_scores():
    x = salient_inputs(256, 128, seed=7)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))

    def favour_alpha_03(errors):  # as if the other ranks' samples scored 0.3 best
        errors += 1e6
        errors[4] = 0  # candidates: s = 1, then alpha = 0, 0.1, 0.2, 0.3, ...

    _, alpha = smoothquant_search(x, x.abs().amax(0), [w], Scheme.parse("w8a8"), grid=10, reduce=favour_alpha_03)
    assert alpha == pytest.approx(0.3)


def test_smoothquant_search_on_a_single_row_still_chooses():
    x = salient_inputs(1, 64, seed=9)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(10))
    static = Scheme.parse("w8a8-static")
    scale, alpha = smoothquant_search(x, x.abs().amax(0), [w], static, grid=4)
    # Scored on itself: as two copies of the row, one fitting the range, one scored.
    assert alpha is not None and alpha == smoothquant_search(torch.cat([x, x]), x.abs().amax(0), [w], static, grid=4)[1]
    assert torch.isfinite(scale).all() and (scale > 0).all()
