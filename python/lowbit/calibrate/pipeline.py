"""Calibration inside the replacement pass: statistics from forward hooks, then GPTQ,
AWQ, SmoothQuant or static activation scales, whole-model or one block at a time.

The work is done in *stages*. A stage is a module, the list of inputs it is run on, and
the selected Linear layers inside it:

* whole-model mode: one stage — the model itself, run on the calibration batches;
* layer-wise (sequential) mode: the model is run on each batch until the first block
  (a forward pre-hook records the block's arguments and stops the forward); the Linear
  layers that ran before it form the first stage. Then each block is a stage run on the
  recorded arguments, its outputs becoming the next block's first argument; with
  ``propagate="quantized"`` (the default, as GPTQ does) they are the outputs of the
  already quantized block, with ``"float"`` those of the float block (layers are then
  replaced only at the end, which makes the result identical to whole-model mode). Selected layers outside the blocks and after
  them form a last stage, run through the whole model. Only one stage's inputs,
  outputs and statistics are held at a time.

Within a stage:

1. *Probe*: run the first input once, recording which tensor each selected layer reads
   and which module produced it. Layers that read the same tensor form a group (they get
   one smoothing scale and share one Hessian); a LayerNorm/RMSNorm or Linear whose output
   *is* that tensor is the group's producer.
2. *Scaling* (SmoothQuant, AWQ): per-channel activation statistics of every group, then
   the scale ``s`` (``lowbit.calibrate.scaling``): the group's weights are multiplied by
   ``s`` and ``1/s`` is folded into the producer. The fold is exact only when the
   producer's output feeds nothing but the group (not, e.g., a residual connection, as in
   post-LayerNorm BERT); hooks cannot see every consumer, so the stage is re-run on the
   first input and the fold is kept only if the stage's outputs are unchanged. Otherwise
   it is undone and the layers keep ``1/s`` as an ``input_scale`` (an extra elementwise
   multiply in the quantized layer).
3. *Statistics* for GPTQ (the Hessian ``E[x x^T]`` per group) and static activation
   scales (an observer per group, per tensor).
4. Each layer is quantized (GPTQ or round-to-nearest) and replaced.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lowbit.calibrate.gptq import factor_hessian, gptq_quantize, workspace_bytes
from lowbit.calibrate.methods import AWQ, GPTQ, SmoothQuant, Method
from lowbit.calibrate.observers import make_observer
from lowbit.calibrate.scaling import awq_clip_search, awq_scale_search, smoothquant_factors
from lowbit.formats import QuantizedWeight, Scheme, from_codes, quantize_weight

PROPAGATE = ("quantized", "float")
# Relative change of a stage's output that a fold may cause by rounding alone (fp32).
FOLD_TOLERANCE = 1e-4


@dataclasses.dataclass(eq=False)
class Entry:
    """One selected Linear layer: its name, the module, its scheme, a user-given
    activation scale (w8a8-static)."""

    name: str
    linear: nn.Linear
    scheme: Scheme
    act_scale: torch.Tensor | None = None


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
        if self.input_scales:
            lines.append("  kept as input_scale: " + ", ".join(self.input_scales))
        lines.append(f"  peak calibration state {self.peak_state_bytes / 2**20:.1f} MB "
                     f"(largest stage: weights {self.block_weight_bytes / 2**20:.1f} MB + inputs "
                     f"{self.block_activation_bytes / 2**20:.1f} MB); peak RSS growth "
                     f"{self.peak_rss_delta_bytes / 2**20:.1f} MB")
        return "\n".join(lines)


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _relative_change(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    num = den = 0.0
    for x, y in zip(ta, tb):
        if not (x.is_floating_point() and y.is_floating_point()):
            continue
        if x.shape != y.shape:
            return float("inf")
        num += (x.double() - y.double()).pow(2).sum().item()
        den += y.double().pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else num**0.5


def _foldable(m: nn.Module) -> bool:
    """A module whose output channels can absorb a per-channel factor: a Linear (rows and
    bias), or a normalization with a 1-D affine weight (weight and bias)."""
    if type(m) is nn.Linear:
        return True
    w = getattr(m, "weight", None)
    name = type(m).__name__
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and
            (isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm"))))


class _RssPeak:
    """Samples the process's resident set every 2 ms while active; ``delta`` is the peak
    growth over the resident set at entry (0 where /proc is not available)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta = self.peak - self.base


@dataclasses.dataclass(eq=False)
class _Stage:
    name: str
    module: nn.Module
    inputs: list
    run: Callable[[Any], Any]
    entries: list[Entry]


class _Calibrator:
    def __init__(self, method: Method, observer, propagate: str, progress: bool,
                 replace: Callable[[Entry, QuantizedWeight], None], summary: CalibrationSummary):
        self.method, self.observer = method, observer
        self.propagate, self.progress, self.replace, self.summary = propagate, progress, replace, summary
        self.state_bytes = 0
        self.deferred: list[tuple[Entry, QuantizedWeight]] = []

    # --- memory accounting -------------------------------------------------------------------

    def hold(self, nbytes: int) -> None:
        self.state_bytes += nbytes
        self.summary.peak_state_bytes = max(self.summary.peak_state_bytes, self.state_bytes)

    def release(self, nbytes: int) -> None:
        self.state_bytes -= nbytes

    # --- running a stage with hooks ----------------------------------------------------------

    def run_pass(self, stage: _Stage, on_input: dict[Entry, Callable[[torch.Tensor], None]], desc: str) -> None:
        """Run the stage on every input with ``on_input[entry](x)`` called on each selected
        layer's input (as float32 ``[tokens, K]``)."""
        batch = [0]

        def pre_hook(entry, fn):
            def hook(_module, args):
                x = args[0]
                if not torch.isfinite(x).all():
                    raise ValueError(f"calibration batch {batch[0]}: the input of {entry.name} holds NaN or Inf")
                fn(x.detach().reshape(-1, x.shape[-1]).float())
            return hook

        handles = [e.linear.register_forward_pre_hook(pre_hook(e, fn)) for e, fn in on_input.items()]
        try:
            for i, inp in enumerate(tqdm(stage.inputs, desc=f"{stage.name}: {desc}", leave=False,
                                         disable=not self.progress)):
                batch[0] = i
                stage.run(inp)
        finally:
            for h in handles:
                h.remove()

    def probe(self, stage: _Stage) -> list[tuple[list[Entry], tuple[str, nn.Module] | None]]:
        """Groups of layers reading one tensor, each with the module that produced it."""
        keys: dict[Entry, tuple] = {}
        produced: dict[tuple, tuple[str, nn.Module]] = {}
        keep = []  # holds the probed tensors so that no address is reused during the probe

        def record_input(entry):
            def hook(_m, args):
                keys.setdefault(entry, _key(args[0]))
                keep.append(args[0])
            return hook

        def record_output(name):
            def hook(m, _args, out):
                if isinstance(out, torch.Tensor):
                    produced.setdefault(_key(out), (name, m))
                    keep.append(out)
            return hook

        handles = [e.linear.register_forward_pre_hook(record_input(e)) for e in stage.entries]
        handles += [m.register_forward_hook(record_output(n)) for n, m in stage.module.named_modules() if _foldable(m)]
        try:
            stage.run(stage.inputs[0])
        finally:
            for h in handles:
                h.remove()
        missing = [e.name for e in stage.entries if e not in keys]
        if missing:
            raise ValueError(f"layers {missing} did not run on the first calibration batch; "
                             "calibration needs every selected layer to see every batch")
        groups: dict[tuple, list[Entry]] = {}
        for e in stage.entries:
            groups.setdefault(keys[e], []).append(e)
        result = []
        for key, group in groups.items():
            producer = produced.get(key)
            if producer is not None and any(producer[1] is e.linear for e in group):
                producer = None
            result.append((group, producer))
        return result

    # --- scaling (SmoothQuant, AWQ) ---------------------------------------------------------

    def scale_stage(self, stage: _Stage, groups, shared_weights: set[int]) -> dict[Entry, torch.Tensor]:
        """Apply SmoothQuant or AWQ to every group; returns the layers' input scales."""
        method = self.method
        groups = [(g, p) for g, p in groups if not any(id(e.linear.weight) in shared_weights for e in g)]
        stats = {}
        for group, _ in groups:
            k = group[0].linear.in_features
            stats[id(group[0])] = {"max": torch.zeros(k), "sum": torch.zeros(k, dtype=torch.float64), "n": 0,
                                   "sample": []}
            self.hold(3 * 4 * k)
        # AWQ's searches use a sample of the inputs: an equal share of rows from every
        # batch, drawn at random (seeded), max_tokens rows in all.
        quota = -(-method.max_tokens // len(stage.inputs)) if isinstance(method, AWQ) else 0
        rng = torch.Generator().manual_seed(0)

        def collector(st):
            def fn(x):
                st["max"] = torch.maximum(st["max"], x.abs().amax(dim=0))
                st["sum"] += x.abs().sum(dim=0, dtype=torch.float64)
                st["n"] += x.shape[0]
                if quota:
                    rows = torch.randperm(x.shape[0], generator=rng)[:quota]
                    st["sample"].append(x[rows])
                    self.hold(len(rows) * x.shape[1] * 4)
            return fn

        self.run_pass(stage, {e: collector(stats[id(g[0])]) for g, _ in groups for e in g[:1]}, "activation ranges")
        reference = stage.run(stage.inputs[0])
        input_scales: dict[Entry, torch.Tensor] = {}
        with torch.no_grad():
            for group, producer in groups:
                st = stats[id(group[0])]
                weights = [e.linear.weight for e in group]
                if isinstance(method, SmoothQuant):
                    s = smoothquant_factors(st["max"], weights, method.alpha)
                else:
                    x = torch.cat(st["sample"])
                    s, _, _ = awq_scale_search(x, (st["sum"] / max(st["n"], 1)).float(), weights,
                                               group[0].scheme, method.grid, method.duo)
                for e in group:
                    e.linear.weight.mul_(s.to(e.linear.weight.dtype))
                if not self._fold(stage, group, producer, s, reference):
                    for e in group:
                        input_scales[e] = (1 / s).float()
                        self._hooks.setdefault(e, []).append(e.linear.register_forward_pre_hook(_scale_hook(1 / s)))
                    self.summary.input_scales.extend(e.name for e in group)
                if isinstance(method, AWQ) and method.clip:
                    xs = torch.cat(st["sample"]) / s
                    for e in group:
                        e.linear.weight.copy_(awq_clip_search(xs, e.linear.weight, e.scheme, method.clip_grid,
                                                              method.max_shrink))
                self.release(3 * 4 * s.numel() + sum(t.numel() * 4 for t in st["sample"]))
                st["sample"] = []
        return input_scales

    def _fold(self, stage, group, producer, s, reference) -> bool:
        """Divide the producer's output channels by ``s``; keep it if the stage's output
        is unchanged, else restore the producer and return False."""
        if producer is None:
            return False
        name, module = producer
        saved = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
        inv = (1 / s)
        if isinstance(module, nn.Linear):
            module.weight.mul_(inv.unsqueeze(1).to(module.weight.dtype))
        else:
            module.weight.mul_(inv.to(module.weight.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(inv.to(module.bias.dtype))
        if _relative_change(stage.run(stage.inputs[0]), reference) <= FOLD_TOLERANCE:
            self.summary.folds.append(f"{name} -> " + ", ".join(e.name for e in group))
            return True
        for n, p in module.named_parameters(recurse=False):
            p.copy_(saved[n])
        return False

    # --- statistics, quantization --------------------------------------------------------------

    def quantize_stage(self, stage: _Stage, shared_weights: set[int]) -> None:
        self._hooks: dict[Entry, list] = {}
        groups = self.probe(stage)
        input_scales = {}
        if isinstance(self.method, (SmoothQuant, AWQ)):
            input_scales = self.scale_stage(stage, groups, shared_weights)

        gptq = isinstance(self.method, GPTQ)
        hessians, observers, collectors = {}, {}, {}
        for group, _ in groups:
            k = group[0].linear.in_features
            lead = group[0]
            if gptq:
                hessians[lead] = [torch.zeros(k, k), 0]
                self.hold(4 * k * k)
            if any(e.scheme.kind == "w8a8-static" and e.act_scale is None for e in group):
                observers[lead] = make_observer(self.observer, bits=8, symmetric=True)
            if lead in hessians or lead in observers:
                collectors[lead] = _collector(hessians.get(lead), observers.get(lead))
        if collectors:
            self.run_pass(stage, collectors, "GPTQ Hessians" if gptq else "activation scales")

        for group, _ in groups:
            lead = group[0]
            factor = None
            if gptq:
                # One factor per group, built in the Hessian's own storage.
                h, n = hessians.pop(lead)
                h.div_(max(n, 1))
                workspace = workspace_bytes(0, h.shape[0], self.method.act_order)
                self.hold(workspace)
                factor = factor_hessian(h, damp=self.method.damp, act_order=self.method.act_order,
                                        name=lead.name, overwrite=True)
                self.release(workspace)
                del h
            for e in group:
                act = e.act_scale
                if act is None and lead in observers:
                    act = observers[lead].calculate_qparams()[0].reshape(1).float()
                if e.scheme.kind != "w8a8-static":
                    act = None
                w = e.linear.weight.detach()
                if gptq:
                    workspace = workspace_bytes(*w.shape, act_order=False)
                    self.hold(workspace)
                    codes, scales, zeros = gptq_quantize(w, factor, e.scheme, block_size=self.method.block_size,
                                                         name=e.name)
                    self.release(workspace)
                    qw = from_codes(e.scheme, codes, scales, zeros, act_scale=act, input_scale=input_scales.get(e))
                else:
                    qw = quantize_weight(w, e.scheme, e.name, act_scale=act, input_scale=input_scales.get(e))
                for h in self._hooks.pop(e, []):
                    h.remove()
                if self.propagate == "float":
                    # Later stages (and the layers after the blocks) see the float model.
                    self.deferred.append((e, qw))
                else:
                    self.replace(e, qw)
            if factor is not None:
                self.release(4 * factor.upper.numel())
                del factor


def _scale_hook(factor: torch.Tensor):
    def hook(_m, args):
        return (args[0] * factor.to(args[0].dtype), *args[1:])
    return hook


def _collector(hessian: list | None, observer):
    def fn(x):
        if hessian is not None:
            hessian[0].addmm_(x.T, x)
            hessian[1] += x.shape[0]
        if observer is not None:
            observer.update(x)
    return fn


# --- blocks ------------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The repeated blocks of a model: the ``nn.ModuleList`` (or else ``nn.Sequential``)
    with the most parameters among those holding at least two children that contain
    Linear layers."""
    best = None
    for kind in (nn.ModuleList, nn.Sequential):
        for name, m in model.named_modules():
            if not isinstance(m, kind) or m is model:
                continue
            children = list(m.children())
            with_linear = [c for c in children if any(isinstance(x, nn.Linear) for x in c.modules())]
            if len(with_linear) < 2 or len(with_linear) != len(children):
                continue
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[2]:
                best = (name, m, size)
        if best is not None:
            return best[0], best[1]
    return None


def _resolve_blocks(model, blocks) -> tuple[str, list[nn.Module]] | None:
    if blocks is None:
        found = find_blocks(model)
        return None if found is None else (found[0], list(found[1]))
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError as e:
            raise ValueError(f"blocks={blocks!r}: no such submodule") from e
        return blocks, list(container.children())
    blocks = list(blocks)
    names = {id(m): n for n, m in model.named_modules()}
    if not blocks or any(id(b) not in names for b in blocks):
        raise ValueError("blocks must be a submodule name or a list of submodules of the model")
    return ", ".join(names[id(b)] for b in blocks[:2]) + (", ..." if len(blocks) > 2 else ""), blocks


def _replace_first(inp, out):
    args, kwargs = inp
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: hidden}


def _tokens(batches) -> int:
    total = 0
    for b in batches:
        ts = [t for t in _tensors(b) if t.dim() >= 1]
        if ts:
            total += ts[0].shape[:-1].numel() if ts[0].is_floating_point() else ts[0].numel()
    return total


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
    progress: bool = True,
) -> CalibrationSummary:
    """Calibrate and quantize ``entries`` of ``model``, calling ``replace(entry, weight)`` for
    each; see the module doc."""
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    if calibration is None:
        raise ValueError(f"method {method.name!r} needs calibration data (calibration=batches)")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    forward = calibration_forward or _default_forward
    for e in entries:
        if e.scheme.kind not in method.schemes:
            raise ValueError(f"{e.name}: method {method.name!r} does not apply to {e.scheme} "
                             f"(it takes {', '.join(method.schemes)})")
    wants_static = any(e.scheme.kind == "w8a8-static" and e.act_scale is None for e in entries)
    summary = CalibrationSummary(method.name, str(observer) if wants_static else None, False, None,
                                 len(batches), _tokens(batches))
    resolved = None
    if sequential is not False and isinstance(method, (GPTQ, AWQ)) or sequential:
        resolved = _resolve_blocks(model, blocks)
        if resolved is None and sequential:
            raise ValueError("sequential calibration needs blocks: none found (pass blocks=)")
    cal = _Calibrator(method, observer, propagate, progress, replace, summary)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), _RssPeak() as rss:
            if resolved is None:
                stage = _Stage("model", model, batches, lambda b: forward(model, b), entries)
                summary.block_weight_bytes = sum(e.linear.weight.numel() * e.linear.weight.element_size()
                                                 for e in entries)
                summary.block_activation_bytes = _nbytes(batches)
                cal.quantize_stage(stage, shared_weights)
            else:
                summary.sequential, summary.blocks = True, resolved[0]
                _run_sequential(cal, model, entries, batches, forward, resolved[1], shared_weights)
            for entry, weight in cal.deferred:
                replace(entry, weight)
        summary.peak_rss_delta_bytes = rss.delta
    finally:
        model.train(was_training)
    summary.seconds = time.perf_counter() - start
    return summary


def _default_forward(model, batch):
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def _run_sequential(cal: _Calibrator, model, entries, batches, forward, blocks, shared_weights):
    in_block = {}
    for i, b in enumerate(blocks):
        for m in b.modules():
            in_block[id(m)] = i
    outside = [e for e in entries if id(e.linear) not in in_block]

    # Which outside layers run before the first block: those the capture forward reaches.
    seen = set()
    handles = [e.linear.register_forward_pre_hook(lambda m, a, e=e: seen.add(e)) for e in outside]

    def capture():
        captured = []

        def stop(_m, args, kwargs):
            captured.append((args, kwargs))
            raise _Stop

        h = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for b in batches:
                try:
                    forward(model, b)
                except _Stop:
                    pass
        finally:
            h.remove()
        if len(captured) != len(batches):
            raise ValueError(f"the first block ran on {len(captured)} of {len(batches)} calibration batches")
        return captured

    try:
        inputs = capture()
    finally:
        for h in handles:
            h.remove()
    before = [e for e in outside if e in seen]
    after = [e for e in outside if e not in seen]
    if before:
        def stop(_m, _args):
            raise _Stop

        def run_until_blocks(b):
            try:
                forward(model, b)
            except _Stop:
                pass

        stop_handle = blocks[0].register_forward_pre_hook(stop)
        try:
            cal.quantize_stage(_Stage("before blocks", model, batches, run_until_blocks, before), shared_weights)
        finally:
            stop_handle.remove()
        inputs = capture()  # the first block's inputs, from the quantized layers before it

    held = _nbytes(inputs)
    cal.hold(held)
    for i, block in enumerate(blocks):
        stage_entries = [e for e in entries if in_block.get(id(e.linear)) == i]
        stage = _Stage(f"block {i}", block, inputs, lambda inp, block=block: block(*inp[0], **inp[1]), stage_entries)
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        cal.summary.block_weight_bytes = max(cal.summary.block_weight_bytes, weights)
        cal.summary.block_activation_bytes = max(cal.summary.block_activation_bytes, held)
        if cal.propagate == "float":
            # The float outputs, before the block changes; inputs and outputs are both held.
            outputs = [stage.run(inp) for inp in inputs]
            cal.hold(_nbytes(outputs))
        if stage_entries:
            cal.quantize_stage(stage, shared_weights)
        if cal.propagate == "float":
            inputs[:] = [_replace_first(inp, out) for inp, out in zip(inputs, outputs)]
            del outputs
        else:
            # Each output replaces its input at once: one batch more than the inputs, at most.
            for j, inp in enumerate(inputs):
                inputs[j] = _replace_first(inp, stage.run(inp))
        cal.release(cal.state_bytes)
        held = _nbytes(inputs)
        cal.hold(held)
    cal.release(held)
    del inputs
    if after:
        cal.quantize_stage(_Stage("after blocks", model, batches, lambda b: forward(model, b), after), shared_weights)
