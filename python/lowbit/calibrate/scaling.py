"""Per-input-channel scaling searches: SmoothQuant and AWQ.

Both rewrite ``y = x W^T`` as ``y = (x / s) (W s)^T`` with a per-input-channel ``s > 0``
that makes the product easier to quantize; the division is folded into the layer that
produces ``x`` when the graph allows (see ``lowbit.calibrate.pipeline``). Layers that read
the same input share one ``s``.

* SmoothQuant (Xiao et al., 2023), for W8A8: ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``
  migrates activation outliers into the weights; ``alpha`` is the migration strength,
  given, or searched per group of layers (``smoothquant_search``: the grid of alphas and
  ``s = 1``, scored by the output error with weights and activations both quantized as
  the scheme quantizes them, on sampled calibration inputs).
* AWQ (Lin et al., 2024), for weight-only schemes: ``s = mean|x|^r`` (or, weight-aware,
  ``mean|x|^r / salience(W)^(1-r)``) normalized to a geometric mean of one, with ``r`` on
  a grid in ``[0, 1)`` chosen to minimize the output error of the quantized layers on
  sampled calibration inputs (salient input channels get larger weights, hence smaller
  relative rounding error); then, per output channel and
  group, the weight range is shrunk by the ratio (grid down to ``1 - max_shrink``) that
  minimizes that group's output error ("clip search").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit import reference
from lowbit.formats import Scheme, fake_quantize


def smoothquant_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s[K]`` from the per-channel max|x| and the layers' weights ``[N_i, K]``."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    # Channels that never saw input or hold only zero weights keep their scale.
    s = torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def smoothquant_search(x: torch.Tensor, act_max: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme,
                       grid: int = 20, reduce: Callable[[torch.Tensor], None] | None = None
                       ) -> tuple[torch.Tensor, float | None]:
    """The best ``s[K]`` for sampled inputs ``x[T, K]`` among ``s = 1`` and
    ``smoothquant_factors`` at ``alpha = i / grid``; returns ``(s, alpha)``, alpha None
    for ``s = 1``.

    The score is the summed mean squared output error of the layers with the weight
    quantized as ``scheme`` does and the activations ``x / s`` rounded to int8 per token
    (dynamic), or (static) with ``s`` and the one activation scale (as the max observer
    sets it) from the range of the even sample rows and the error taken on the odd rows:
    a static scale meets tokens beyond its calibration range, and scored on the rows that
    set it, the search preferred alpha = 1 (every channel's range exactly 1) for layers
    whose error on new tokens it then doubled (a single row is scored on itself). The
    chosen alpha's ``s`` is then computed from ``act_max``, the whole calibration range.
    ``reduce`` (in place, on the candidates' errors) lets ranks that sampled different
    inputs agree on one choice."""
    x = x.float()
    ws = [w.detach().float() for w in weights]
    fit_max = act_max
    if scheme.static_activations and x.shape[0] > 1:
        fit_max, x = x[0::2].abs().amax(dim=0), x[1::2]
    exact = [x @ w.T for w in ws]
    alphas = [None] + [i / grid for i in range(grid + 1)]

    def factors(alpha, ranges):
        return torch.ones_like(ranges, dtype=torch.float32) if alpha is None else smoothquant_factors(ranges, ws, alpha)

    errors = torch.zeros(len(alphas), dtype=torch.float64, device=x.device)
    for i, alpha in enumerate(alphas):
        s = factors(alpha, fit_max)
        xs = x / s
        if scheme.static_activations:
            scale = ((fit_max / s).amax() / reference.INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            xq = reference.quantize_per_tensor(xs, scale).float() * scale
        else:
            codes, scale = reference.quantize_per_token(xs)
            xq = codes.float() * scale.unsqueeze(-1)
        errors[i] = sum(((xq @ fake_quantize(w * s, scheme).T - y) ** 2).mean() for w, y in zip(ws, exact))
    if reduce is not None:
        reduce(errors)
    alpha = alphas[int(errors.argmin())]
    return factors(alpha, act_max), alpha


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return ((x @ (wq - w).T) ** 2).mean()


def _weight_salience(weights: list[torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """Mean over output channels of |w| relative to its quantization group's max, per input
    channel: how close each input channel's weights already sit to their group's range."""
    rel = []
    for w in weights:
        n, k = w.shape
        g = scheme.group_for(k)
        wg = w.abs().reshape(n, k // g, g)
        rel.append((wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(n, k))
    return torch.cat(rel).mean(0)


def awq_scale_search(
    x: torch.Tensor, act_mean: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme, grid: int = 20,
    duo: bool = True,
) -> tuple[torch.Tensor, float, float]:
    """Best ``s[K]`` for sampled inputs ``x[T, K]``; returns ``(s, error at s, error at s = 1)``.

    Candidates: ``s = 1``, ``mean|x|^r`` and, with ``duo``, ``mean|x|^r / salience(W)^(1-r)``
    (the weight-aware variant of AutoAWQ), for ``r = i / grid``."""
    x = x.float()
    ws = [w.detach().float() for w in weights]
    base = sum(_output_error(x, w, fake_quantize(w, scheme)) for w in ws).item()
    best, best_s = base, torch.ones_like(act_mean)
    mean = act_mean.float().clamp(min=1e-4)
    families = [None] + ([_weight_salience(ws, scheme).clamp(min=1e-4)] if duo else [])
    for w_sal in families:
        for i in range(grid):
            r = i / grid
            s = mean.pow(r) if w_sal is None else mean.pow(r) / w_sal.pow(1 - r)
            if w_sal is None and i == 0:
                continue  # s = 1, the baseline
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = sum(_output_error(x, w, fake_quantize(w * s, scheme) / s) for w in ws).item()
            if err < best:
                best, best_s = err, s
    return best_s, best, base


def awq_clip_search(
    x: torch.Tensor, w: torch.Tensor, scheme: Scheme, grid: int = 20, max_shrink: float = 0.5,
    chunk: int = 256,
) -> torch.Tensor:
    """``w`` with each (output channel, group) range shrunk to the ratio that minimizes
    ``|x_g . (w_g - Q(clip(w_g)))|^2`` over the sampled inputs ``x[T, K]``."""
    x = x.float()
    w = w.detach().float()
    n, k = w.shape
    g = scheme.group_for(k)
    xg = x.reshape(x.shape[0], k // g, g)  # [T, groups, G]
    out = torch.empty_like(w)
    for r0 in range(0, n, chunk):
        wc = w[r0 : r0 + chunk].reshape(-1, k // g, g)  # [n, groups, G]
        ref = torch.einsum("tgj,ngj->ntg", xg, wc)
        hi, lo = wc.amax(-1, keepdim=True), wc.amin(-1, keepdim=True)
        best_err = torch.full(wc.shape[:2], float("inf"), device=wc.device)
        best = wc.clone()
        for i in range(int(max_shrink * grid) + 1):
            r = 1 - i / grid
            clipped = torch.maximum(torch.minimum(wc, hi * r), lo * r)
            q = fake_quantize(clipped.reshape(-1, k), scheme).reshape(wc.shape)
            err = ((torch.einsum("tgj,ngj->ntg", xg, q) - ref) ** 2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(-1), clipped, best)
        out[r0 : r0 + chunk] = best.reshape(-1, k)
    return out
