"""SmoothQuant and AWQ inside a stage: per-channel scales, folded where that is exact.

For each group of layers that read one tensor: per-channel statistics of that tensor
(``run_pass``), the scale ``s`` (``lowbit.calibrate.scaling``), the group's weights
multiplied by ``s``, and ``1/s`` folded into the producer (a LayerNorm/RMSNorm or Linear).
The fold is exact only when the producer's output feeds nothing but the group (not, e.g.,
a residual connection, as in post-LayerNorm BERT); hooks cannot see every consumer, so
the stage is re-run on its first input and the fold is kept only if the stage's output is
unchanged. Otherwise it is undone, and the layers keep ``1/s`` as an ``input_scale`` (an
extra elementwise multiply in the quantized layer), applied meanwhile by a forward
pre-hook that the caller removes once the layer is quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.calibrate.accounting import tensors
from lowbit.calibrate.methods import AWQ, SmoothQuant
from lowbit.calibrate.scaling import awq_clip_search, awq_scale_search, smoothquant_factors, smoothquant_search
from lowbit.calibrate.stages import Context, Entry, Group, Stage, distributed, run_pass

# Relative change of a stage's output that a fold may cause by rounding alone (fp32).
FOLD_TOLERANCE = 1e-4


def relative_change(a, b) -> float:
    """||a - b|| / ||b|| over the float tensors of two stage outputs (inf if they differ
    in structure)."""
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    num = den = 0.0
    for x, y in zip(ta, tb):
        if not (x.is_floating_point() and y.is_floating_point()):
            continue
        if x.shape != y.shape:
            return float("inf")
        num += (x.double() - y.double()).pow(2).sum().item()
        den += (y.double().pow(2).sum()).item()
    return (num / den) ** 0.5 if den > 0 else num**0.5


def _scale_hook(factor: torch.Tensor):
    def hook(_m, args):
        return (args[0] * factor.to(args[0].dtype), *args[1:])
    return hook


def _collector(ctx: Context, st: dict, quota: int, rng: list):
    """Per-channel max|x| and sum|x| of a group's input, and (AWQ) a random sample of
    ``quota`` rows of each batch."""
    def fn(x):
        if st["max"] is None:
            device, k = ctx.device_for(x), x.shape[1]
            st["max"] = torch.zeros(k, device=device)
            st["sum"] = torch.zeros(k, dtype=torch.float64, device=device)
        x = x.to(st["max"].device)
        st["max"] = torch.maximum(st["max"], x.abs().amax(dim=0))
        st["sum"] += x.abs().sum(dim=0, dtype=torch.float64)
        st["n"] += x.shape[0]
        if quota:
            if rng[0] is None:  # on the activations' device, where the sample is taken
                rng[0] = torch.Generator(device=x.device).manual_seed(0)
            rows = torch.randperm(x.shape[0], generator=rng[0], device=x.device)[:quota]
            st["sample"].append(x[rows])
            ctx.hold(len(rows) * x.shape[1] * 4)
    return fn


def scale_groups(ctx: Context, stage: Stage, groups: list[Group], shared_weights: set[int]
                 ) -> tuple[dict[Entry, torch.Tensor], dict[Entry, list]]:
    """Apply SmoothQuant or AWQ to every group whose weights no other group shares.

    Returns the layers' input scales (where the fold was not exact) and, for those layers,
    the hook handles that apply the scale until the layer is quantized."""
    method = ctx.method
    groups = [g for g in groups if not any(id(e.linear.weight) in shared_weights for e in g.entries)]
    stats = {}
    for group in groups:
        k = group.lead.linear.in_features
        stats[group] = {"max": None, "sum": None, "n": 0, "sample": []}
        ctx.hold(3 * 4 * k)
    # AWQ's searches and SmoothQuant's alpha search use a sample of the inputs: an equal
    # share of rows from every batch, drawn at random (seeded), max_tokens rows in all.
    searches = isinstance(method, AWQ) or method.searches
    quota = -(-method.max_tokens // len(stage.inputs)) if searches else 0
    rng = [None]  # one generator for the stage, made at the first input
    run_pass(ctx, stage, {g.lead: _collector(ctx, stats[g], quota, rng) for g in groups}, "activation ranges")
    if isinstance(method, SmoothQuant) and distributed():
        for st in stats.values():  # every rank's shard of the calibration data: the global ranges
            torch.distributed.all_reduce(st["max"], op=torch.distributed.ReduceOp.MAX)
    reference = stage.run(stage.inputs[0])
    input_scales: dict[Entry, torch.Tensor] = {}
    hooks: dict[Entry, list] = {}
    with torch.no_grad():
        for group in groups:
            st = stats[group]
            weights = [e.linear.weight for e in group.entries]
            device = weights[0].device
            if isinstance(method, SmoothQuant) and method.searches:
                s, alpha = smoothquant_search(torch.cat(st["sample"]).to(device), st["max"].to(device), weights,
                                              group.lead.scheme, method.grid,
                                              reduce=_sum_over_ranks if distributed() else None)
                ctx.summary.alphas.append(f"{group.lead.name} {'none' if alpha is None else f'{alpha:g}'}")
            elif isinstance(method, SmoothQuant):
                s = smoothquant_factors(st["max"].to(device), weights, method.alpha)
            else:
                x = torch.cat(st["sample"]).to(device)
                s, _, _ = awq_scale_search(x, (st["sum"] / max(st["n"], 1)).float().to(device), weights,
                                           group.lead.scheme, method.grid, method.duo)
            for e in group.entries:
                e.linear.weight.mul_(s.to(e.linear.weight.dtype))
            if not _fold(ctx, stage, group, s, reference):
                for e in group.entries:
                    input_scales[e] = (1 / s).float()
                    hooks.setdefault(e, []).append(e.linear.register_forward_pre_hook(_scale_hook(1 / s)))
                ctx.summary.input_scales.extend(e.name for e in group.entries)
            if isinstance(method, AWQ) and method.clip:
                xs = torch.cat(st["sample"]).to(device) / s
                for e in group.entries:
                    e.linear.weight.copy_(awq_clip_search(xs, e.linear.weight, e.scheme, method.clip_grid,
                                                          method.max_shrink))
            ctx.release(3 * 4 * s.numel() + sum(t.numel() * 4 for t in st["sample"]))
            st["sample"] = []
    return input_scales, hooks


def _sum_over_ranks(t: torch.Tensor) -> None:
    """In place: every rank's sample scores the candidates, so every rank picks the same one."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _fold(ctx: Context, stage: Stage, group: Group, s: torch.Tensor, reference) -> bool:
    """Divide the producer's output channels by ``s``; keep it if the stage's output
    is unchanged, else restore the producer and return False."""
    if group.producer is None:
        return False
    name, module = group.producer
    saved = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    inv = 1 / s
    if isinstance(module, nn.Linear):
        module.weight.mul_(inv.unsqueeze(1).to(module.weight.dtype))
    else:
        module.weight.mul_(inv.to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(inv.to(module.bias.dtype))
    if relative_change(stage.run(stage.inputs[0]), reference) <= FOLD_TOLERANCE:
        ctx.summary.folds.append(f"{name} -> " + ", ".join(e.name for e in group.entries))
        return True
    for n, p in module.named_parameters(recurse=False):
        p.copy_(saved[n])
    return False
