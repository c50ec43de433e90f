"""Calibration inside the replacement pass: ``run`` calibrates and quantizes the selected
layers of a model, whole-model or one block at a time.

The work is split by job:

* ``stages``: stages (a module, its inputs, its selected layers), running them with
  hooks, and probing for groups of layers that read one tensor;
* ``folding``: SmoothQuant / AWQ scales, folded into the producing module when exact;
* ``stage_quantize``: statistics (GPTQ Hessians, observers) and each layer's quantization;
* ``blocks``: finding the repeated blocks and the layer-wise (sequential) driver;
* ``accounting`` and ``rss``: the bytes of state held, and the resident set, for the
  summary.

Whole-model mode is one stage: the model on the calibration batches. Layer-wise mode
(default for GPTQ and AWQ when blocks are found) is described in ``blocks``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.calibrate.accounting import nbytes, tensors
from lowbit.calibrate.blocks import resolve_blocks, run_sequential
from lowbit.calibrate.methods import AWQ, GPTQ, RTN, Method
from lowbit.calibrate.rss import RssPeak
from lowbit.calibrate.stage_quantize import quantize_stage
from lowbit.calibrate.stages import Context, Entry, Stage
from lowbit.formats import QuantizedWeight

PROPAGATE = ("quantized", "float")


@dataclasses.dataclass
class CalibrationSummary:
    """What calibration did and what it held in memory."""

    method: str
    observer: str | None
    sequential: bool
    blocks: str | None
    batches: int
    tokens: int
    folds: list[str] = dataclasses.field(default_factory=list)
    input_scales: list[str] = dataclasses.field(default_factory=list)
    alphas: list[str] = dataclasses.field(default_factory=list)  # SmoothQuant("auto")'s choice per group
    peak_state_bytes: int = 0
    peak_rss_delta_bytes: int = 0
    block_weight_bytes: int = 0
    block_activation_bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        mode = f"layer-wise over {self.blocks}" if self.sequential else "whole model"
        lines = [f"calibration: {self.method}"
                 + (f", activation observer {self.observer}" if self.observer else "")
                 + f", {mode}, {self.batches} batches ({self.tokens} tokens), {self.seconds:.1f} s"]
        if self.folds:
            lines.append("  folded scales: " + "; ".join(self.folds))
        if self.alphas:
            lines.append("  SmoothQuant alpha per group: " + "; ".join(self.alphas))
        if self.input_scales:
            lines.append("  kept as input_scale: " + ", ".join(self.input_scales))
        lines.append(f"  peak calibration state {self.peak_state_bytes / 2**20:.1f} MB "
                     f"(largest stage: weights {self.block_weight_bytes / 2**20:.1f} MB + inputs "
                     f"{self.block_activation_bytes / 2**20:.1f} MB); peak RSS growth "
                     f"{self.peak_rss_delta_bytes / 2**20:.1f} MB")
        return "\n".join(lines)


def needs_calibration(method: Method, entries: list[Entry]) -> str | None:
    """Why these layers need calibration data (a method other than round-to-nearest, or
    static activation scales to find), or None when they do not."""
    if not isinstance(method, RTN):
        return f"method {method.name!r}"
    static = [e.name for e in entries if e.needs_act_scale]
    if static:
        return f"w8a8-static layers without an activation scale ({', '.join(static[:3])})"
    return None


def _tokens(batches) -> int:
    total = 0
    for b in batches:
        ts = [t for t in tensors(b) if t.dim() >= 1]
        if ts:
            total += ts[0].shape[:-1].numel() if ts[0].is_floating_point() else ts[0].numel()
    return total


def _default_forward(model, batch):
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def run(
    model: nn.Module,
    entries: list[Entry],
    method: Method,
    calibration: Iterable,
    *,
    replace: Callable[[Entry, QuantizedWeight], None],
    calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
    observer="minmax",
    sequential: bool | None = None,
    blocks=None,
    propagate: str = "quantized",
    shared_weights: set[int] = frozenset(),
    stats_device: torch.device | str | None = None,
    scale_dtype: torch.dtype | None = None,
    block_hooks: tuple[Callable, Callable] | None = None,
    progress: bool = True,
) -> CalibrationSummary:
    """Calibrate and quantize ``entries`` of ``model``, calling ``replace(entry, weight)`` for
    each; see the module doc. ``stats_device`` holds the statistics (Hessians, ranges,
    samples) on that device instead of the activations' own; ``scale_dtype``: scales rounded
    to it (``QuantConfig.scale_dtype``). ``block_hooks`` (layer-wise
    mode): see ``blocks.run_sequential``."""
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    forward = calibration_forward or _default_forward
    for e in entries:
        if e.scheme.kind not in method.schemes:
            raise ValueError(f"{e.name}: method {method.name!r} does not apply to {e.scheme} "
                             f"(it takes {', '.join(method.schemes)})")
    wants_static = any(e.needs_act_scale for e in entries)
    summary = CalibrationSummary(method.name, str(observer) if wants_static else None, False, None,
                                 len(batches), _tokens(batches))
    # Layer-wise unless asked otherwise: by default for GPTQ and AWQ, always when asked.
    layerwise = sequential if sequential is not None else isinstance(method, (GPTQ, AWQ))
    resolved = resolve_blocks(model, blocks) if layerwise else None
    if resolved is None and sequential:
        raise ValueError("sequential calibration needs blocks: none found (pass blocks=)")
    ctx = Context(method, observer, propagate, progress, replace, summary,
                  None if stats_device is None else torch.device(stats_device), scale_dtype)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), RssPeak() as rss:
            if resolved is None:
                stage = Stage("model", model, batches, lambda b: forward(model, b), entries)
                summary.block_weight_bytes = sum(e.linear.weight.numel() * e.linear.weight.element_size()
                                                 for e in entries)
                summary.block_activation_bytes = nbytes(batches)
                quantize_stage(ctx, stage, shared_weights)
            else:
                summary.sequential, summary.blocks = True, resolved[0]
                run_sequential(ctx, model, entries, batches, forward, resolved[1], shared_weights, block_hooks)
            for entry, weight in ctx.deferred:
                replace(entry, weight)
        summary.peak_rss_delta_bytes = rss.delta
    finally:
        model.train(was_training)
    summary.seconds = time.perf_counter() - start
    return summary
