"""GPTQ: round a weight column by column, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Algorithm (Frantar et al., 2022), for ``w[N, K]`` and ``H = E[x x^T]`` (``[K, K]``):

1. Columns that never saw a non-zero input (``H[k, k] = 0``) are zeroed and given a unit
   diagonal. With ``act_order`` the columns are processed by descending ``H[k, k]``.
2. ``H += damp * mean(diag H) * I``; ``U`` = the upper Cholesky factor of ``H^-1`` (float32,
   as the reference implementation). If a
   factorization fails, the dampening grows tenfold and it is retried (at most
   ``MAX_RETRIES`` times), so the result is never NaN.
3. Columns are rounded in blocks of ``block_size``: within a block, column ``i`` is
   rounded, its error ``e = (w_i - q_i) / U[i, i]`` is subtracted from the block's later
   columns as ``e * U[i, j]``; after the block, the accumulated errors update all later
   columns in one matrix product (the "lazy batch" update).

Quantization parameters follow the canonical format exactly (``formats.int4_params`` /
``int8_scale``), so the codes GPTQ picks are a valid canonical weight:

* int8 (w8a8, w8a16): per-channel scales from the original weight.
* int4, groups of consecutive k: without ``act_order``, a group's scale and zero point are
  computed from the updated weights when its first column is reached (the block size is a
  multiple of the group size, so the whole group is up to date). With ``act_order`` the
  columns of a group are visited out of order, so all group parameters come from the
  original weight up front ("static groups") — the only variant whose groups stay
  consecutive in k, which the canonical format requires.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit.formats import Scheme, int4_params, int8_scale

MAX_RETRIES = 6


@dataclasses.dataclass
class HessianFactor:
    """What GPTQ needs of a Hessian, shared by every layer that reads the same input:
    ``upper``, the upper Cholesky factor of the dampened ``H^-1`` in processing order;
    ``perm``, that order (columns by descending ``H[k, k]`` with ``act_order``, else
    identity); ``dead``, the inputs that were always zero."""

    upper: torch.Tensor
    perm: torch.Tensor
    dead: torch.Tensor
    act_order: bool


def factor_hessian(
    h: torch.Tensor, *, damp: float = 0.01, act_order: bool = False, name: str = "layer", overwrite: bool = False
) -> HessianFactor:
    """Factor ``H`` (float32 ``[K, K]``) for GPTQ. With ``overwrite`` the factor is built in
    ``h``'s storage, so the peak is two ``K x K`` matrices (``h`` and a backup for retries;
    three with ``act_order``, which permutes a copy). Dampening ``d = damp * mean(diag H)`` grows tenfold on each failed
    factorization (at most ``MAX_RETRIES`` times); a Hessian that still fails raises."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: Hessian must be square, got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: the input Hessian holds NaN or Inf")
    h = h if overwrite and h.dtype == torch.float32 else h.to(torch.float32, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(h.shape[0], device=h.device)
    if act_order:
        h = h[perm.unsqueeze(1), perm.unsqueeze(0)]  # one copy in processing order
    base = h.diagonal().double().mean().clamp(min=1e-12).item()
    backup = h.clone()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(MAX_RETRIES + 1):
        if attempt:
            h.copy_(backup)
        h.diagonal().add_(damp * (10**attempt) * base)
        # In place: L, then (L L^T)^-1, then its upper factor, all in h's storage.
        torch.linalg.cholesky_ex(h, out=(h, info))
        if info != 0:
            continue
        torch.cholesky_inverse(h, out=h)
        torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
        if info == 0 and torch.isfinite(h).all():
            return HessianFactor(h, perm, dead, act_order)
    raise ValueError(f"{name}: the input Hessian is not positive definite even with dampening "
                     f"{damp * 10**MAX_RETRIES:g} x mean(diag); are the calibration inputs degenerate?")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    scheme: Scheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    name: str = "layer",
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-rounded codes of ``w[N, K]`` -> ``(codes, scales, zeros)`` as ``formats.from_codes``
    takes them: int codes ``[N, K]`` (int8 in [-127, 127] or uint8 int4 in [0, 15]), scales
    ``[N]`` or ``[N, K/G]``, zero points ``[N, K/G]`` (float, integer-valued) or None.
    ``hessian`` is ``E[x x^T]`` or its ``factor_hessian`` (then ``damp`` and ``act_order``
    are the factor's). ``scale_dtype``: scales rounded to it as they are chosen (see
    ``formats.quantize_weight``)."""
    w = w.detach().float().clone()
    n, k = w.shape
    if isinstance(hessian, HessianFactor):
        factor = hessian
    else:
        if hessian.shape != (k, k):
            raise ValueError(f"{name}: Hessian is {tuple(hessian.shape)}, expected ({k}, {k})")
        factor = factor_hessian(hessian, damp=damp, act_order=act_order, name=name)
    if factor.upper.shape != (k, k):
        raise ValueError(f"{name}: Hessian factor is {tuple(factor.upper.shape)}, expected ({k}, {k})")
    act_order, perm, u = factor.act_order, factor.perm, factor.upper
    w[:, factor.dead] = 0

    int4 = scheme.is_int4
    g = scheme.group_for(k)
    if int4:
        qmin, qmax, code_dtype = 0, 15, torch.uint8
        # Static group parameters (act_order, or one group per row): from the original weight.
        scales, zeros = int4_params(w.reshape(n, k // g, g), scheme.symmetric, scale_dtype)
    else:
        qmin, qmax, code_dtype = -127, 127, torch.int8
        scales, zeros = int8_scale(w, scale_dtype).unsqueeze(1), torch.zeros(n, 1, device=w.device)
    dynamic_groups = int4 and not act_order and g < k
    if dynamic_groups:
        block_size = max(block_size // g, 1) * g

    w = w[:, perm]
    group_of = perm // g  # the canonical group of each (permuted) column

    codes = torch.zeros(n, k, dtype=code_dtype, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if dynamic_groups and col % g == 0:
                s, z = int4_params(wb[:, i : i + g], scheme.symmetric, scale_dtype)
                scales[:, col // g], zeros[:, col // g] = s, z
            s, z = scales[:, group_of[col]], zeros[:, group_of[col]]
            x = wb[:, i]
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
            codes[:, col] = q.to(code_dtype)
            e = (x - (q - z) * s) / ub[i, i]
            wb[:, i:] -= e.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            errs[:, i] = e
        w[:, b1:] -= errs @ u[b0:b1, b1:]

    codes = codes[:, torch.argsort(perm)]
    if not int4:
        return codes, scales.squeeze(1), None
    return codes, scales, None if scheme.symmetric else zeros


def workspace_bytes(n: int, k: int, act_order: bool) -> int:
    """Peak bytes GPTQ allocates beyond the Hessian it factors in place: the backup copy
    kept for retries (and the permuted copy with ``act_order``), and the float32 weight
    copy and 1-byte codes of ``[n, k]``."""
    return 4 * k * k * (2 if act_order else 1) + 5 * n * k
