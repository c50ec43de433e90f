"""Stages, and probing a stage for groups of layers that read one tensor.

A *stage* is a module, the inputs it is run on and the selected Linear layers inside it
(the whole model in whole-model mode; one block, or the layers before / after the blocks,
in layer-wise mode: ``blocks``). Everything calibration learns, it learns by running a
stage with forward hooks on its layers:

* ``run_pass`` runs the stage on all its inputs and hands each selected layer's input, as
  float32 ``[tokens, K]``, to a collector of that layer;
* ``probe`` runs it once and groups the layers that read the *same* tensor (they share one
  smoothing scale and one Hessian), each group with the module that produced that tensor
  when it is a LayerNorm / RMSNorm or Linear whose output channels can absorb a scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lowbit.calibrate.accounting import StateBytes
from lowbit.formats import QuantizedWeight, Scheme


def distributed() -> bool:
    """Whether calibration runs under torch.distributed (each rank on its shard of the data)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclasses.dataclass(eq=False)
class Entry:
    """One selected Linear layer: its name, the module, its scheme, a user-given
    activation scale (w8a8-static)."""

    name: str
    linear: nn.Linear
    scheme: Scheme
    act_scale: torch.Tensor | None = None

    @property
    def needs_act_scale(self) -> bool:
        """A static-activation layer whose scale calibration must find."""
        return self.scheme.static_activations and self.act_scale is None


@dataclasses.dataclass(eq=False)
class Stage:
    name: str
    module: nn.Module
    inputs: list
    run: Callable[[Any], Any]
    entries: list[Entry]


@dataclasses.dataclass(eq=False)
class Group:
    """Layers that read one tensor; ``producer`` is (name, module) of a module that can
    absorb a per-channel scale of it, or None."""

    entries: list[Entry]
    producer: tuple[str, nn.Module] | None

    @property
    def lead(self) -> Entry:
        return self.entries[0]


@dataclasses.dataclass(eq=False)
class Context:
    """What every stage of one calibration run shares."""

    method: Any
    observer: Any
    propagate: str
    progress: bool
    replace: Callable[[Entry, QuantizedWeight], None]
    summary: Any  # pipeline.CalibrationSummary
    # Where statistics live: None for the activations' own device, else this device.
    stats_device: torch.device | None = None
    scale_dtype: torch.dtype | None = None  # scales rounded to it as they are chosen
    state: StateBytes = dataclasses.field(default_factory=StateBytes)
    deferred: list[tuple[Entry, QuantizedWeight]] = dataclasses.field(default_factory=list)

    def hold(self, count: int) -> None:
        self.state.hold(count)
        self.summary.peak_state_bytes = max(self.summary.peak_state_bytes, self.state.peak)

    def release(self, count: int) -> None:
        self.state.release(count)

    def device_for(self, x: torch.Tensor) -> torch.device:
        """The device statistics of activations ``x`` are kept on."""
        return x.device if self.stats_device is None else self.stats_device

    def emit(self, entry: Entry, weight: QuantizedWeight) -> None:
        """A layer's quantized weight: replaced now, or at the end with propagate="float"
        (later stages, and the layers after the blocks, then see the float model)."""
        if self.propagate == "float":
            self.deferred.append((entry, weight))
        else:
            self.replace(entry, weight)


def run_pass(ctx: Context, stage: Stage, on_input: dict[Entry, Callable[[torch.Tensor], None]], desc: str) -> None:
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
                                     disable=None if ctx.progress else True)):
            batch[0] = i
            stage.run(inp)
    finally:
        for h in handles:
            h.remove()


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def foldable(m: nn.Module) -> bool:
    """A module whose output channels can absorb a per-channel factor: a Linear (rows and
    bias), or a normalization with a 1-D affine weight (weight and bias)."""
    if type(m) is nn.Linear:
        return True
    w = getattr(m, "weight", None)
    is_norm = isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
    return is_norm and isinstance(w, torch.Tensor) and w.dim() == 1


def probe(stage: Stage) -> list[Group]:
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
    handles += [m.register_forward_hook(record_output(n)) for n, m in stage.module.named_modules() if foldable(m)]
    try:
        stage.run(stage.inputs[0])
    finally:
        for h in handles:
            h.remove()
    missing = [e.name for e in stage.entries if e not in keys]
    if missing:
        raise ValueError(f"layers {missing} did not run on the first calibration batch; "
                         "calibration needs every selected layer to see every batch")
    by_key: dict[tuple, list[Entry]] = {}
    for e in stage.entries:
        by_key.setdefault(keys[e], []).append(e)
    groups = []
    for key, entries in by_key.items():
        producer = produced.get(key)
        if producer is not None and any(producer[1] is e.linear for e in entries):
            producer = None  # a layer reading its own output (recurrent use): nothing to fold into
        groups.append(Group(entries, producer))
    return groups
