"""Observers against hand-computed cases and an independent loop implementation of the
entropy (KL) calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lowbit.calibrate import observers as obs


def test_minmax_symmetric_and_asymmetric_by_hand():
    x = torch.tensor([-2.0, 1.0, 3.0])
    o = obs.MinMaxObserver()
    o.update(x)
    scale, zero = o.calculate_qparams()
    assert scale.item() == pytest.approx(3 / 127) and zero is None and scale.dim() == 0
    o = obs.MinMaxObserver(symmetric=False)
    o.update(x)
    scale, zero = o.calculate_qparams()
    assert scale.item() == pytest.approx(5 / 255)
    assert zero.item() == round(2 / (5 / 255))


def test_minmax_range_is_widened_to_include_zero():
    o = obs.MinMaxObserver(symmetric=False, bits=4)
    o.update(torch.tensor([2.0, 5.0]))
    scale, zero = o.calculate_qparams()
    assert scale.item() == pytest.approx(5 / 15) and zero.item() == 0


def test_minmax_accumulates_over_updates_per_channel():
    o = obs.MinMaxObserver(granularity="channel", axis=-1)
    o.update(torch.tensor([[1.0, -4.0], [2.0, 3.0]]))
    o.update(torch.tensor([[-6.0, 0.5]]))
    scale, _ = o.calculate_qparams()
    assert torch.allclose(scale, torch.tensor([6.0, 4.0]) / 127)
    w = obs.MinMaxObserver(granularity="channel", axis=0, bits=4)
    w.update(torch.tensor([[1.0, -7.0], [0.5, 0.25]]))
    assert torch.allclose(w.calculate_qparams()[0], torch.tensor([7.0, 0.5]) / 7)


def test_per_token_describes_the_latest_batch():
    o = obs.MinMaxObserver(granularity="token")
    o.update(torch.tensor([[[1.0, -2.0], [4.0, 0.0]]]))
    assert torch.allclose(o.calculate_qparams()[0], torch.tensor([2.0, 4.0]) / 127)
    o.update(torch.tensor([[127.0, 0.0]]))
    assert torch.allclose(o.calculate_qparams()[0], torch.tensor([1.0]))


def test_moving_average():
    o = obs.MovingAverageMinMaxObserver(momentum=0.5)
    o.update(torch.tensor([-1.0, 1.0]))
    o.update(torch.tensor([-3.0, 3.0]))
    assert o.calculate_qparams()[0].item() == pytest.approx(2 / 127)


def test_percentile_of_a_known_distribution():
    x = torch.arange(1, 10001, dtype=torch.float32)
    o = obs.PercentileObserver(percentile=99.0, bins=4096)
    o.update(x[torch.randperm(len(x))])
    t = o.calculate_qparams()[0].item() * 127
    assert abs(t - 9900) <= 2 * 2 * 10000 / 4096  # within two bins
    o = obs.PercentileObserver(percentile=99.0, bins=4096, symmetric=False, bits=8)
    o.update(torch.cat([-x[:1000], x]))  # lower tail 1% of 11000 values
    scale, zero = o.calculate_qparams()
    lo = -zero.item() * scale.item()
    assert lo < 0 and abs(lo + 890) < 25


def test_percentile_never_exceeds_the_observed_range():
    o = obs.PercentileObserver(percentile=100.0)
    o.update(torch.tensor([0.5, -0.25, 0.75]))
    assert o.calculate_qparams()[0].item() == pytest.approx(0.75 / 127)


def _direct_mse(x, ratios, bits):
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().max()
    errs = []
    for r in ratios:
        s = amax * r / qmax
        errs.append(((torch.clamp(torch.round(x / s), -qmax, qmax) * s - x) ** 2).sum().item())
    return errs


def test_mse_clips_a_lone_outlier_and_matches_a_direct_search():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g), torch.tensor([40.0])])
    o = obs.MSEObserver(bits=4, grid=50, bins=4096)
    o.update(x)
    t = o.calculate_qparams()[0].item() * 7
    assert t < 0.5 * 40  # the outlier is clipped
    ratios = [1 - 0.8 * i / 49 for i in range(50)]
    errs = _direct_mse(x, ratios, 4)
    chosen = errs[min(range(50), key=lambda i: abs(ratios[i] * 40 - t))]
    assert chosen <= 1.05 * min(errs)  # the histogram's choice is (near) the true optimum
    assert chosen < errs[0]


def test_mse_keeps_the_full_range_of_uniform_data():
    o = obs.MSEObserver(bits=8)
    o.update(torch.linspace(-1, 1, 10001))
    assert o.calculate_qparams()[0].item() * 127 > 0.95


def _kl_threshold_loops(hist_abs: np.ndarray, levels: int, step: int) -> int:
    """TensorRT's entropy calibration, written with plain loops as an oracle."""
    b = len(hist_abs)
    best, best_i = math.inf, b
    total = hist_abs.sum()
    for i in list(range(levels, b, step)) + [b]:
        p = hist_abs[:i].astype(np.float64).copy()
        p[-1] += hist_abs[i:].sum()
        q = np.zeros(i)
        for j in range(levels):
            members = [k for k in range(i) if (k * levels) // i == j]
            mass = sum(hist_abs[k] for k in members)
            nonzero = [k for k in members if p[k] > 0]
            for k in nonzero:
                q[k] = mass / len(nonzero)
        kl = sum(p[k] / total * math.log((p[k] / total) / max(q[k] / total, 1e-30)) for k in range(i) if p[k] > 0)
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_kl_matches_a_loop_implementation():
    g = torch.Generator().manual_seed(3)
    x = torch.distributions.StudentT(3.0).sample((50000,))
    o = obs.HistogramObserver(bits=4, bins=256)
    o.update(x)
    h = o.abs_hist().squeeze(0).numpy()
    i = _kl_threshold_loops(h, 8, max(1, (128 - 8) // 256))
    expect = min(i * (2 * o.R.item() / 256), x.abs().max().item())
    assert o.calculate_qparams()[0].item() * 7 == pytest.approx(expect, rel=1e-5)
    del g


def test_kl_clips_heavy_tails_but_not_a_gaussian():
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(200000, generator=g)
    o = obs.HistogramObserver()
    o.update(gauss)
    assert o.calculate_qparams()[0].item() * 127 > 0.75 * gauss.abs().max().item()
    heavy = torch.distributions.StudentT(1.5).sample((200000,))
    o = obs.HistogramObserver()
    o.update(heavy)
    assert o.calculate_qparams()[0].item() * 127 < 0.5 * heavy.abs().max().item()


def test_histogram_growth_equals_binning_at_the_final_range():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(5000, generator=g) * 2 - 1  # within R = 1 (amax < 1, so R = amax)
    a[0] = 1.0
    b = (torch.rand(5000, generator=g) * 2 - 1) * 3.9
    grown = obs.PercentileObserver(bins=64)
    grown.update(a)
    grown.update(b)
    assert grown.R.item() == 4.0
    direct = obs.PercentileObserver(bins=64)
    direct.update(torch.cat([torch.tensor([4.0]), a, b]))
    expect = direct.hist.clone()
    expect[0, -1] -= 1  # the extra 4.0 that set direct's range
    # Identical but for the first batch's maximum: it sat on the closed top edge of the
    # first range (the last bin), which after merging is one bin below its direct bin.
    diff = grown.hist - expect
    assert grown.hist.sum() == expect.sum() == 10000
    assert diff.abs().sum() <= 2


def test_channel_histograms_are_independent():
    x = torch.stack([torch.linspace(-1, 1, 1001), torch.linspace(-10, 10, 1001)], dim=1)
    o = obs.MSEObserver(granularity="channel", axis=-1)
    o.update(x)
    s = o.calculate_qparams()[0] * 127
    assert s[0].item() == pytest.approx(1, rel=0.05) and s[1].item() == pytest.approx(10, rel=0.05)


@pytest.mark.parametrize("name", sorted(obs.OBSERVERS))
def test_every_observer_bounds_the_error_on_gaussian_data(name):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    o = obs.make_observer(name)
    o.update(x)
    scale, _ = o.calculate_qparams()
    err = (torch.clamp(torch.round(x / scale), -127, 127) * scale - x).pow(2).mean().sqrt()
    assert 0 < scale.item() < x.abs().max().item() / 50
    assert err.item() < 0.02


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="empty"):
        obs.MinMaxObserver().update(torch.empty(0))
    with pytest.raises(ValueError, match="NaN"):
        obs.MSEObserver().update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="symmetric"):
        obs.HistogramObserver(symmetric=False)
    with pytest.raises(ValueError, match="granularity"):
        obs.MinMaxObserver(granularity="row")
    with pytest.raises(RuntimeError, match="no data"):
        obs.MinMaxObserver().calculate_qparams()
    with pytest.raises(ValueError, match="channels"):
        o = obs.MinMaxObserver(granularity="channel")
        o.update(torch.ones(2, 3))
        o.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match="unknown observer"):
        obs.make_observer("entropy")


def test_all_zero_input_gives_a_unit_scale():
    o = obs.MinMaxObserver(symmetric=False)
    o.update(torch.zeros(10))
    scale, zero = o.calculate_qparams()
    assert scale.item() == 1 and zero.item() == 0
