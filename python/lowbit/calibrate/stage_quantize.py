"""One stage's quantization: probe its groups, scale them (SmoothQuant, AWQ: ``folding``),
gather statistics (GPTQ Hessians ``E[x x^T]`` per group, activation observers for
w8a8-static), then quantize each layer — GPTQ with its group's Hessian factor, or round to
nearest — and hand it to ``Context.emit``.

Under ``torch.distributed`` each rank calibrates on its own shard of the data: GPTQ's
Hessian sums and SmoothQuant's channel ranges are all-reduced, so every rank quantizes
exactly as one process on all the data would (AWQ's searches and the activation observers
keep per-rank samples and are refused there).

Hessians are fp32 on the activations' device (``Context.stats_device`` moves them, e.g.
to the CPU for models whose Hessians do not fit beside them); one is built per group and
factored in its own storage, so a group holds one ``K x K`` matrix plus GPTQ's workspace.
"""

from __future__ import annotations

import torch

from lowbit.calibrate.folding import scale_groups
from lowbit.calibrate.gptq import factor_hessian, gptq_quantize, workspace_bytes
from lowbit.calibrate.methods import AWQ, GPTQ, SmoothQuant
from lowbit.calibrate.observers import make_observer
from lowbit.calibrate.stages import Context, Group, Stage, distributed, probe, run_pass
from lowbit.formats import from_codes, quantize_weight


class _Hessian:
    """A running sum of ``x^T x`` (fp32) and its row count, allocated at the first input."""

    def __init__(self, ctx: Context):
        self.ctx, self.sum, self.rows = ctx, None, 0

    def update(self, x: torch.Tensor) -> None:
        if self.sum is None:
            k = x.shape[1]
            self.sum = torch.zeros(k, k, device=self.ctx.device_for(x))
            self.ctx.hold(4 * k * k)
        x = x.to(self.sum.device)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        """E[x x^T] over every rank's calibration data (under torch.distributed, each rank
        holds a shard of it: the sums and row counts are all-reduced first)."""
        if distributed():
            rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=self.sum.device)
            torch.distributed.all_reduce(self.sum)
            torch.distributed.all_reduce(rows)
            self.rows = int(rows.item())
        return self.sum.div_(max(self.rows, 1))


def _collector(hessian: _Hessian | None, observer):
    def fn(x):
        if hessian is not None:
            hessian.update(x)
        if observer is not None:
            observer.update(x)
    return fn


def quantize_stage(ctx: Context, stage: Stage, shared_weights: set[int]) -> None:
    if distributed() and (isinstance(ctx.method, AWQ) or any(e.needs_act_scale for e in stage.entries)):
        raise ValueError("under torch.distributed lowbit calibrates with GPTQ or SmoothQuant (their statistics are "
                         "all-reduced); AWQ and activation observers would differ per rank: calibrate on one rank")
    groups = probe(stage)
    input_scales, scale_hooks = {}, {}
    if isinstance(ctx.method, (SmoothQuant, AWQ)):
        input_scales, scale_hooks = scale_groups(ctx, stage, groups, shared_weights)

    gptq = isinstance(ctx.method, GPTQ)
    hessians: dict[Group, _Hessian] = {}
    observers = {}
    for group in groups:
        if gptq:
            hessians[group] = _Hessian(ctx)
        if any(e.needs_act_scale for e in group.entries):
            observers[group] = make_observer(ctx.observer, bits=8, symmetric=True)
    collectors = {g.lead: _collector(hessians.get(g), observers.get(g)) for g in groups
                  if g in hessians or g in observers}
    if collectors:
        run_pass(ctx, stage, collectors, "GPTQ Hessians" if gptq else "activation scales")

    for group in groups:
        factor = None
        if gptq:
            # One factor per group, built in the Hessian's own storage.
            h = hessians.pop(group).mean()
            workspace = workspace_bytes(0, h.shape[0], ctx.method.act_order)
            ctx.hold(workspace)
            factor = factor_hessian(h, damp=ctx.method.damp, act_order=ctx.method.act_order,
                                    name=group.lead.name, overwrite=True)
            ctx.release(workspace)
            del h
        for e in group.entries:
            w = e.linear.weight.detach()
            act = e.act_scale if e.scheme.static_activations else None
            if e.needs_act_scale:
                act = observers[group].calculate_qparams()[0].reshape(1).float().to(w.device)
            if gptq:
                workspace = workspace_bytes(*w.shape, act_order=False)
                ctx.hold(workspace)
                codes, scales, zeros = gptq_quantize(w, factor, e.scheme, block_size=ctx.method.block_size,
                                                     name=e.name, scale_dtype=ctx.scale_dtype)
                ctx.release(workspace)
                qw = from_codes(e.scheme, codes, scales, zeros, act_scale=act, input_scale=input_scales.get(e))
            else:
                qw = quantize_weight(w, e.scheme, e.name, act_scale=act, input_scale=input_scales.get(e),
                                     scale_dtype=ctx.scale_dtype)
            for handle in scale_hooks.pop(e, []):
                handle.remove()
            ctx.emit(e, qw)
        if factor is not None:
            ctx.release(4 * factor.upper.numel())
            del factor
