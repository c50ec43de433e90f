"""Observers: statistics of a stream of tensors, turned into quantization parameters.

Every observer sees each tensor as a matrix ``[C, L]``: ``C`` channels that each get
their own parameters and ``L`` values per channel. The granularity fixes the view:

=============  ==========================================================================
``"tensor"``   one channel: everything observed
``"channel"``  one channel per index of ``axis`` (``-1``: an activation's input channels;
               ``0``: a weight's output channels), accumulated over all updates
``"token"``    one channel per token (every index but the last dimension). Tokens change
               with every batch, so a per-token observer describes the latest batch only
               — the view of dynamic per-token quantization
=============  ==========================================================================

``calculate_qparams()`` returns ``(scale, zero_point)`` for ``bits``-bit integers, shaped
``[C]`` (a 0-d tensor for per-tensor). Symmetric: ``scale = t / (2^(bits-1) - 1)`` for a
threshold ``t`` and no zero point (``None``). Asymmetric: the range ``[lo, hi]`` widened to
include zero, ``scale = (hi - lo) / (2^bits - 1)``, ``zero = clamp(round(-lo/scale))`` —
the canonical format's rule (docs/design.md, "Canonical formats"). A zero scale becomes 1.

Observers (``OBSERVERS`` maps names to classes):

* ``MinMaxObserver`` — running min and max.
* ``MovingAverageMinMaxObserver`` — exponential moving average of each update's min/max.
* ``PercentileObserver`` — the ``percentile`` of |x| (symmetric) or the two tails.
* ``MSEObserver`` — the clip ratio of the min/max range that minimizes the expected
  squared quantization error, by grid search.
* ``HistogramObserver`` — the threshold that minimizes the KL divergence between the
  distribution of |x| and its quantized version (TensorRT's entropy calibration);
  symmetric only.

The last three keep a histogram of ``bins`` bins per channel over ``[-R, R]``; when a
value beyond ``R`` arrives the range doubles (as often as needed) and pairs of bins merge,
so the histogram is exact up to its resolution whatever the order of the data.
"""

from __future__ import annotations


import torch

GRANULARITIES = ("tensor", "channel", "token")


def _as_matrix(x: torch.Tensor, granularity: str, axis: int) -> torch.Tensor:
    x = x.detach().float()
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "token":
        return x.reshape(-1, x.shape[-1])
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Scale and zero point for the range [lo, hi] (lo <= 0 <= hi; symmetric uses hi)."""
    if symmetric:
        scale = hi / (2 ** (bits - 1) - 1)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    return scale, zero


class Observer:
    """Base class: ``update(x)`` any number of times, then ``calculate_qparams()``."""

    symmetric_only = False

    def __init__(self, bits: int = 8, symmetric: bool = True, granularity: str = "tensor", axis: int = -1):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {bits}")
        if self.symmetric_only and not symmetric:
            raise ValueError(f"{type(self).__name__} computes symmetric thresholds only (symmetric=True)")
        self.bits, self.symmetric, self.granularity, self.axis = bits, symmetric, granularity, axis
        self.count = 0  # updates seen

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            raise ValueError(f"{type(self).__name__}: cannot observe an empty tensor")
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__}: observed tensor holds NaN or Inf")
        m = _as_matrix(x, self.granularity, self.axis)
        if self.granularity == "token" or self.count == 0:
            self._reset(m)
        elif m.shape[0] != self._channels:
            raise ValueError(f"{type(self).__name__}: {m.shape[0]} channels, earlier updates had {self._channels}")
        self._channels = m.shape[0]
        self._update(m)
        self.count += 1

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__}: no data observed")
        lo, hi = self._range()
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if self.symmetric:
            hi = torch.maximum(hi, -lo)
        scale, zero = _qparams(lo, hi, self.bits, self.symmetric)
        if self.granularity == "tensor":
            scale = scale.reshape(())
            zero = None if zero is None else zero.reshape(())
        return scale, zero

    def _reset(self, m: torch.Tensor) -> None:
        pass

    def _update(self, m: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def _update(self, m):
        lo, hi = m.amin(dim=1), m.amax(dim=1)
        if self.count == 0 or self.granularity == "token":
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _range(self):
        return self.lo, self.hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """``range <- (1 - momentum) * range + momentum * this update's range``."""

    def __init__(self, momentum: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _update(self, m):
        lo, hi = m.amin(dim=1), m.amax(dim=1)
        if self.count == 0 or self.granularity == "token":
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class _HistogramBase(Observer):
    """A per-channel histogram of ``bins`` bins over ``[-R, R]`` (see the module doc)."""

    def __init__(self, bins: int = 2048, **kwargs):
        super().__init__(**kwargs)
        if bins < 16 or bins % 4:
            raise ValueError(f"bins must be a multiple of 4 and at least 16, got {bins}")
        self.bins = bins

    def _reset(self, m):
        amax = m.abs().amax(dim=1)
        self.R = torch.where(amax > 0, amax, torch.ones_like(amax))
        self.hist = torch.zeros(m.shape[0], self.bins, dtype=torch.float64, device=m.device)
        self.lo, self.hi = m.amin(dim=1), m.amax(dim=1)

    def _grow(self, amax: torch.Tensor) -> None:
        # Double R where needed: the old bins merge in pairs into the centre half.
        while True:
            need = amax > self.R
            if not need.any():
                return
            merged = self.hist[need].reshape(-1, self.bins // 2, 2).sum(-1)
            pad = torch.zeros(merged.shape[0], self.bins // 4, dtype=merged.dtype, device=merged.device)
            self.hist[need] = torch.cat([pad, merged, pad], dim=1)
            self.R = torch.where(need, self.R * 2, self.R)

    def _update(self, m):
        if self.count > 0 and self.granularity != "token":
            self.lo, self.hi = torch.minimum(self.lo, m.amin(dim=1)), torch.maximum(self.hi, m.amax(dim=1))
        self._grow(m.abs().amax(dim=1))
        width = 2 * self.R / self.bins
        idx = ((m + self.R[:, None]) / width[:, None]).floor().clamp(0, self.bins - 1).long()
        idx = idx + torch.arange(m.shape[0], device=m.device).unsqueeze(1) * self.bins
        self.hist.view(-1).index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64, device=m.device))

    def centers(self) -> torch.Tensor:
        """Bin centres [C, bins]."""
        width = 2 * self.R / self.bins
        return -self.R[:, None] + (torch.arange(self.bins, dtype=torch.float32, device=width.device) + 0.5) * width[:, None]

    def abs_hist(self) -> torch.Tensor:
        """The histogram of |x|: [C, bins/2] over [0, R]."""
        half = self.bins // 2
        return self.hist[:, half:] + self.hist[:, :half].flip(1)


class PercentileObserver(_HistogramBase):
    """Symmetric: the ``percentile`` of |x|. Asymmetric: the ``100 - percentile`` and
    ``percentile`` points of x."""

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _quantile_edge(self, hist: torch.Tensor, q: float, lo_edge: torch.Tensor, width: torch.Tensor):
        cdf = hist.cumsum(1)
        target = q * cdf[:, -1:]
        idx = torch.searchsorted(cdf, target).clamp(max=hist.shape[1] - 1).squeeze(1)
        return (lo_edge + (idx + 1).to(torch.float32) * width).float()

    def _range(self):
        width = 2 * self.R / self.bins
        q = self.percentile / 100
        if self.symmetric:
            t = self._quantile_edge(self.abs_hist(), q, torch.zeros_like(self.R), width)
            t = torch.minimum(t, torch.maximum(self.hi, -self.lo))
            return -t, t
        hi = torch.minimum(self._quantile_edge(self.hist, q, -self.R, width), self.hi)
        lo = torch.maximum(-self._quantile_edge(self.hist.flip(1), q, -self.R, width), self.lo)
        return lo, hi


class MSEObserver(_HistogramBase):
    """The range ``ratio * [lo, hi]`` (``ratio`` on a grid of ``grid`` points in
    ``[min_ratio, 1]``) that minimizes the histogram's expected squared quantization error."""

    def __init__(self, grid: int = 100, min_ratio: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if grid < 1 or not 0 < min_ratio <= 1:
            raise ValueError(f"need grid >= 1 and min_ratio in (0, 1], got {grid}, {min_ratio}")
        self.grid, self.min_ratio = grid, min_ratio

    def _range(self):
        v, w = self.centers(), self.hist.float()
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)
        if self.symmetric:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        best_err = torch.full_like(hi, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.grid):
            r = 1 - (1 - self.min_ratio) * i / max(self.grid - 1, 1)
            clo, chi = lo * r, hi * r
            scale, zero = _qparams(clo, chi, self.bits, self.symmetric)
            if self.symmetric:
                qmax = 2 ** (self.bits - 1) - 1
                deq = torch.clamp(torch.round(v / scale[:, None]), -qmax, qmax) * scale[:, None]
            else:
                q = torch.clamp(torch.round(v / scale[:, None]) + zero[:, None], 0, 2**self.bits - 1)
                deq = (q - zero[:, None]) * scale[:, None]
            err = ((deq - v) ** 2 * w).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, clo, best_lo), torch.where(better, chi, best_hi)
        return best_lo, best_hi


class HistogramObserver(_HistogramBase):
    """Entropy calibration: for each candidate threshold ``t`` (a bin edge of the |x|
    histogram at or beyond ``2^(bits-1)`` bins), the reference distribution P is the
    histogram up to ``t`` with the tail folded into the last bin; Q merges P's bins into
    ``2^(bits-1)`` levels and spreads each level evenly over its non-empty bins. The
    threshold with the smallest KL(P || Q) wins. Symmetric only."""

    symmetric_only = True

    def _range(self):
        hist = self.abs_hist()  # [C, B]
        c, b = hist.shape
        levels = 2 ** (self.bits - 1)
        width = (2 * self.R / self.bins)
        best_kl = torch.full((c,), float("inf"), dtype=torch.float64, device=hist.device)
        best_t = torch.full((c,), b, dtype=torch.long, device=hist.device)
        total = hist.sum(1, keepdim=True).clamp(min=1)
        # Candidate thresholds: every bin from `levels` up, in steps that keep the search
        # to at most 256 candidates.
        step = max(1, (b - levels) // 256)
        for i in list(range(levels, b, step)) + [b]:
            # P: the histogram clipped at bin i, the clipped tail added to its last bin.
            p = hist[:, :i].clone()
            p[:, -1] += hist[:, i:].sum(1)
            # Q: the clipped histogram *without* the tail, its bins merged into `levels`
            # levels (bin k joins level floor(k * levels / i)) and each level spread evenly
            # over the bins where P is non-zero. The tail missing from Q is the price of
            # clipping; the merging is the price of resolution.
            level = (torch.arange(i, device=hist.device) * levels) // i
            nz = (p > 0).to(p.dtype)
            mass = torch.zeros(c, levels, dtype=p.dtype, device=p.device).index_add_(1, level, hist[:, :i])
            cnt = torch.zeros(c, levels, dtype=p.dtype, device=p.device).index_add_(1, level, nz).clamp(min=1)
            q = nz * (mass / cnt)[:, level]
            pn, qn = p / total, q / total
            mask = pn > 0
            kl = torch.where(mask, pn * torch.log(pn / qn.clamp(min=1e-30)), torch.zeros_like(pn)).sum(1)
            better = kl < best_kl
            best_kl = torch.where(better, kl, best_kl)
            best_t = torch.where(better, torch.full_like(best_t, i), best_t)
        t = (best_t.to(torch.float32) * width).float()
        amax = torch.maximum(self.hi, -self.lo)
        t = torch.minimum(t, amax)
        return -t, t


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_minmax": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": HistogramObserver,
}


def make_observer(spec, **kwargs) -> Observer:
    """An observer from a name in ``OBSERVERS``, a class, or a zero-argument factory."""
    if isinstance(spec, str):
        if spec not in OBSERVERS:
            raise ValueError(f"unknown observer {spec!r}; expected one of {sorted(OBSERVERS)}")
        return OBSERVERS[spec](**kwargs)
    if isinstance(spec, type) and issubclass(spec, Observer):
        return spec(**kwargs)
    if callable(spec):
        obs = spec()
        if not isinstance(obs, Observer):
            raise TypeError(f"observer factory returned {type(obs).__name__}, not an Observer")
        return obs
    raise TypeError(f"observer must be a name, an Observer class or a factory, got {type(spec).__name__}")
