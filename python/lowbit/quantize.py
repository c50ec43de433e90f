"""The replacement pass: ``lowbit.quantize(model, "w4a16-g128")`` and ``lowbit.dequantize``.

The pass walks any ``nn.Module`` tree by fully-qualified name and replaces each selected
``nn.Linear`` with the quantized layer of its scheme (``lowbit.nn``). Selection, in
order: ``overrides`` (first matching glob pattern gives the scheme, or ``None`` to keep
the layer float), ``include`` / ``exclude`` glob patterns, ``filter_fn(module, name)``,
then what the format can take (group size divides in_features, at least ``min_numel``
weights, not inside ``nn.MultiheadAttention``, which reads its projection weights
directly). A module reachable under several names is quantized once; Linear layers that
share one weight Parameter share one quantized weight. The returned report lists every
Linear layer with its scheme and backend, or why it was skipped.

Calibration (``lowbit.calibrate``) is part of the config: ``method`` ("rtn", "gptq",
"awq", "smoothquant", or a method object such as ``GPTQ(act_order=True)``) and
``observer`` (for the static activation scales of w8a8-static), with the data given as
``calibration=batches``. Methods other than round-to-nearest, and w8a8-static without
explicit ``act_scales``, need calibration data. In layer-wise mode a calibration error
raised in a later block leaves the earlier blocks quantized.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowbit import fusion
from lowbit.calibrate import pipeline
from lowbit.calibrate.methods import as_method
from lowbit.calibrate.pipeline import needs_calibration
from lowbit.calibrate.stages import Entry
from lowbit.formats import QuantizedWeight, Scheme, quantize_weight
from lowbit.nn import QuantEmbedding, QuantLinear, WeightStore, module_for


@dataclasses.dataclass
class QuantConfig:
    """What ``lowbit.quantize`` does; every field can also be passed as a keyword.

    ``method``: calibration method (name or ``lowbit.calibrate`` method object).
    ``observer``: observer for static activation scales (name in
    ``lowbit.calibrate.OBSERVERS``, class or factory). ``sequential``: layer-wise
    calibration (None: on for GPTQ/AWQ when blocks are found). ``blocks``: the blocks'
    container name or a list of modules (None: found automatically). ``propagate``:
    "quantized" or "float" block outputs feed the next block in layer-wise mode.
    ``calibration_device``: where calibration statistics (GPTQ Hessians, activation
    ranges) are held (None: on the activations' device; "cpu" for models whose Hessians
    do not fit beside them on the GPU). ``scale_dtype`` (torch.float16, "bfloat16"):
    scales rounded to that dtype as they are chosen, so that a format storing them so
    (GPTQ, AWQ: float16; compressed-tensors: the model's dtype) holds the model exactly.
    ``embeddings``: also quantize the ``nn.Embedding`` tables (``QuantEmbedding``), int8 per
    row ("w8a16") or int4 per group ("w4a16-g32", ...), selected by the same include /
    exclude / min_numel; a table whose weight is tied to a Linear layer's stays float (its
    Linear is quantized on its own terms), and so does one with ``max_norm``.
    ``fuse``: run sibling projections that read one input (q/k/v, gate/up; the name groups
    of ``lowbit.fusion.DEFAULT_GROUPS``, or a list of such tuples) as one GEMM, exactly
    (``lowbit.fusion``); False keeps them apart. The report notes each member.
    """

    scheme: Scheme | str = "w8a8"
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    overrides: Mapping[str, Scheme | str | None] = dataclasses.field(default_factory=dict)
    min_numel: int = 4096
    backend: str | None = None
    method: Any = "rtn"
    observer: Any = "minmax"
    sequential: bool | None = None
    blocks: Any = None
    propagate: str = "quantized"
    calibration_device: str | None = None
    scale_dtype: torch.dtype | str | None = None
    embeddings: Scheme | str | None = None
    fuse: bool | Sequence[Sequence[str]] = True

    def __post_init__(self):
        if isinstance(self.scale_dtype, str):
            self.scale_dtype = getattr(torch, self.scale_dtype)
        self.scheme = _as_scheme(self.scheme)
        if self.embeddings is not None:
            self.embeddings = _as_scheme(self.embeddings)
            if not self.embeddings.weight_only:
                raise ValueError(f"embeddings are quantized to w8a16 (int8 per row) or w4a16-gG (int4 per group), "
                                 f"not {self.embeddings}")
        self.method = as_method(self.method)
        self.overrides = {p: (None if s is None else _as_scheme(s)) for p, s in self.overrides.items()}


def _as_scheme(s: Scheme | str) -> Scheme:
    return Scheme.parse(s) if isinstance(s, str) else s


@dataclasses.dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    scheme: str
    backend: str
    reason: str
    bytes_before: int
    bytes_after: int
    kind: str = "linear"  # or "embedding"


class QuantizeReport(list):
    """One ``LayerReport`` per Linear layer; prints as a table with totals (and the
    calibration summary, when there was calibration)."""

    calibration = None

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self if r.backend != "-"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self if r.backend == "-"]

    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self)

    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>11}  {'scheme':<14} {'backend':<9} {'MB before':>9} {'MB after':>9}  note"]
        for r in self:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {shape:>11}  {r.scheme:<14} {r.backend:<9} "
                         f"{r.bytes_before / 2**20:>9.3f} {r.bytes_after / 2**20:>9.3f}  {r.reason}")
        for kind, label in (("linear", "Linear layers"), ("embedding", "embedding tables")):
            rows = [r for r in self if r.kind == kind]
            if not rows and kind == "embedding":
                continue
            before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
            ratio = before / after if after else float("nan")
            quantized = sum(r.backend != "-" for r in rows)
            lines.append(f"{quantized} of {len(rows)} {label} quantized; their weights "
                         f"{before / 2**20:.2f} MB -> {after / 2**20:.2f} MB ({ratio:.2f}x smaller)")
        if getattr(self, "calibration", None) is not None:
            lines.append(str(self.calibration))
        return "\n".join(lines)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _decide(config: QuantConfig, module: nn.Linear, name: str, parent: nn.Module,
            allow_meta: bool = False) -> tuple[Scheme | None, str]:
    """The scheme for one Linear layer, or None and the reason it stays float."""
    scheme = config.scheme
    for pattern, override in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if override is None:
                return None, f"override {pattern!r} keeps it float"
            scheme = override
            break
    else:
        if config.include is not None and not _matches(name, config.include):
            return None, "not matched by include"
        if _matches(name, config.exclude):
            return None, "matched by exclude"
        if config.filter_fn is not None and not config.filter_fn(module, name):
            return None, "filter_fn returned False"
    if isinstance(parent, nn.MultiheadAttention):
        return None, "inside nn.MultiheadAttention, which reads the weight directly"
    n, k = module.weight.shape
    if n * k < config.min_numel:
        return None, f"tiny: {n * k} weights < min_numel={config.min_numel}"
    if module.weight.device.type == "meta" and not allow_meta:
        return None, "weight on the meta device"
    if scheme.is_int4:
        g = scheme.group_for(k)
        if k % 2 or k % g:
            return None, f"in_features={k} is not a multiple of the group size {g}"
    return scheme, ""


def _linear_sites(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, nn.Linear]]]:
    """Every nn.Linear by identity, with each (name, parent, attribute) it is reachable at."""
    sites: dict[int, list] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        # _modules, not named_children(): the latter yields a child only under its first name.
        for attr, child in parent._modules.items():
            if isinstance(child, nn.Linear):
                name = f"{parent_name}.{attr}" if parent_name else attr
                sites.setdefault(id(child), []).append((name, parent, attr, child))
    return sites


class Selection:
    """Which Linear layers of a model the config quantizes (``entries``, the ``report``
    row of every Linear), and ``replace(entry, weight)``, which swaps a selected layer for
    its quantized module at every name it is reachable at. ``allow_meta``: select layers
    whose weights are still on the meta device (the streaming quantizer fills them later)."""

    def __init__(self, model: nn.Module, config: QuantConfig, act_scales: Mapping[str, torch.Tensor] | None = None,
                 allow_meta: bool = False):
        self.config = config
        self.report = QuantizeReport()
        self.report.calibration = None
        self.entries: list[Entry] = []
        self._rows: dict[int, LayerReport] = {}
        self._sites: dict[int, list] = {}
        self._by_weight: dict[tuple[int, Scheme], WeightStore] = {}
        # Which selected layers share a weight, fixed now: the streaming quantizer swaps the
        # weights' tensors later, and tensor ids are reused.
        self._weight_key: dict[int, int] = {}
        users: dict[int, int] = {}
        act_scales = act_scales or {}
        for sites in _linear_sites(model).values():
            name, parent, _, linear = sites[0]
            scheme, reason = _decide(config, linear, name, parent, allow_meta)
            before = linear.weight.numel() * linear.weight.element_size()
            row = LayerReport(name, tuple(linear.weight.shape), "-", "-", reason, before, before)
            self.report.append(row)
            if scheme is None:
                continue
            self._rows[id(linear)] = row
            self._sites[id(linear)] = sites
            self._weight_key[id(linear)] = id(linear.weight)
            users[id(linear.weight)] = users.get(id(linear.weight), 0) + 1
            self.entries.append(Entry(name, linear, scheme, act_scales.get(name)))
        # Weights read by more than one selected layer: calibration leaves their scaling alone.
        self.shared_weights = {w for w, n in users.items() if n > 1}

    def skip(self, entry: Entry, reason: str) -> None:
        """Leave a selected layer float after all, saying why in the report."""
        self.entries.remove(entry)
        self._rows[id(entry.linear)].reason = reason

    def release(self, entries: Sequence[Entry]) -> None:
        """Forget the stores of layers already written out (the streaming quantizer), so
        that they are freed with their modules."""
        for e in entries:
            self._by_weight.pop((self._weight_key[id(e.linear)], e.scheme), None)

    def spec(self, entry: Entry) -> dict:
        """The checkpoint's description of a selected layer (``lowbit.checkpoint``)."""
        n, k = entry.linear.weight.shape
        return {"scheme": str(entry.scheme), "group_size": entry.scheme.group_for(k), "in_features": k,
                "out_features": n, "bias": entry.linear.bias is not None}

    def replace(self, entry: Entry, weight: QuantizedWeight) -> None:
        key = (self._weight_key[id(entry.linear)], entry.scheme)
        shared = key in self._by_weight
        bias = None if entry.linear.bias is None else entry.linear.bias.detach().clone()
        # Layers that share a weight share its store: held once, as the float weight was.
        new = module_for(entry.scheme)(self._by_weight[key] if shared else weight, bias, self.config.backend,
                                       entry.name)
        self._by_weight.setdefault(key, new.store)
        sites = self._sites[id(entry.linear)]
        for _, site_parent, attr, _ in sites:
            setattr(site_parent, attr, new)
        notes = []
        if len(sites) > 1:
            notes.append("also at " + ", ".join(s[0] for s in sites[1:]))
        if shared:
            notes.append("weight tied to an earlier layer")
        notes += [f"not {r}" for r in new.store.refusals]
        row = self._rows[id(entry.linear)]
        row.scheme, row.backend, row.reason = str(entry.scheme), new.backend.name, "; ".join(notes)
        row.bytes_after = 0 if shared else new.packed.nbytes()


def _as_config(config: QuantConfig | Scheme | str, fields: dict) -> QuantConfig:
    if not isinstance(config, QuantConfig):
        config = QuantConfig(scheme=config)
    return dataclasses.replace(config, **fields) if fields else config


def quantize(
    model: nn.Module,
    config: QuantConfig | Scheme | str = "w8a8",
    *,
    act_scales: Mapping[str, torch.Tensor] | None = None,
    calibration: Iterable | None = None,
    calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    **fields,
) -> QuantizeReport:
    """Replace the selected ``nn.Linear`` layers of ``model`` in place; return the report.

    ``config`` is a scheme string (``"w8a8"``, ``"w4a16-g128"``, ...), a ``Scheme`` or a
    ``QuantConfig``; keywords override its fields (``exclude=["lm_head"]``,
    ``method="gptq"``, ...). ``act_scales`` maps layer names to calibrated activation
    scales for w8a8-static. ``calibration`` is an iterable of batches for the
    calibration method and observer; ``calibration_forward(model, batch)`` runs one
    batch when ``model(*batch)`` / ``model(batch)`` does not. The report's
    ``calibration`` attribute summarizes the calibration (None without one).
    """
    config = _as_config(config, fields)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    selection = Selection(model, config, act_scales)
    entries = selection.entries
    reason = needs_calibration(config.method, entries) if entries else None
    if reason is None:
        for e in entries:
            selection.replace(e, quantize_weight(e.linear.weight.detach(), e.scheme, e.name, act_scale=e.act_scale,
                                                 scale_dtype=config.scale_dtype))
        _quantize_embeddings(model, config, selection.report, linear_weights)
        _fuse(model, config, selection.report)
        return selection.report
    if calibration is None:
        raise ValueError(f"{reason}: needs calibration data (calibration=batches) or act_scales")
    selection.report.calibration = pipeline.run(
        model, entries, config.method, calibration, replace=selection.replace, calibration_forward=calibration_forward,
        observer=config.observer, sequential=config.sequential, blocks=config.blocks, propagate=config.propagate,
        shared_weights=selection.shared_weights, stats_device=config.calibration_device,
        scale_dtype=config.scale_dtype, progress=progress)
    _quantize_embeddings(model, config, selection.report, linear_weights)
    _fuse(model, config, selection.report)
    return selection.report


def _fuse(model: nn.Module, config: QuantConfig, report: QuantizeReport) -> None:
    if config.fuse is False:
        return
    notes = fusion.fuse(model) if config.fuse is True else fusion.fuse(model, config.fuse)
    for row in report:
        if row.name in notes:
            row.reason = "; ".join(r for r in (row.reason, notes[row.name]) if r)


def _quantize_embeddings(model: nn.Module, config: QuantConfig, report: QuantizeReport, linear_weights: set[int]):
    """Swap the selected ``nn.Embedding`` tables for ``QuantEmbedding`` (``config.embeddings``)."""
    if config.embeddings is None:
        return
    sites: dict[int, list] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if isinstance(child, nn.Embedding):
                sites.setdefault(id(child), []).append((f"{parent_name}.{attr}" if parent_name else attr, parent, attr,
                                                        child))
    for found in sites.values():
        name, _, _, embedding = found[0]
        scheme, reason = config.embeddings, ""
        v, d = embedding.weight.shape
        if config.include is not None and not _matches(name, config.include):
            reason = "not matched by include"
        elif _matches(name, config.exclude):
            reason = "matched by exclude"
        elif id(embedding.weight) in linear_weights:
            reason = "tied to a Linear layer's weight: kept float"
        elif embedding.max_norm is not None:
            reason = "max_norm renormalizes rows on lookup"
        elif v * d < config.min_numel:
            reason = f"tiny: {v * d} weights < min_numel={config.min_numel}"
        elif scheme.is_int4 and (d % 2 or d % scheme.group_for(d)):
            reason = f"embedding_dim={d} is not a multiple of the group size {scheme.group_for(d)}"
        before = embedding.weight.numel() * embedding.weight.element_size()
        row = LayerReport(name, (v, d), "-", "-", reason, before, before, kind="embedding")
        report.append(row)
        if reason:
            continue
        new = QuantEmbedding.from_embedding(embedding, scheme, name, config.scale_dtype)
        for _, parent, attr, _ in found:
            setattr(parent, attr, new)
        row.scheme, row.backend = str(scheme), "cpu" if new.qweight.device.type == "cpu" else "reference"
        row.bytes_after = new.canonical().nbytes()


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by the float ``nn.Linear`` it computes; returns model.

    Layers that shared one quantized weight share one float weight Parameter again.
    """
    replaced: dict[int, nn.Linear] = {}
    weights: dict[int, nn.Parameter] = {}
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):
            if not isinstance(child, QuantLinear):
                continue
            if id(child) not in replaced:
                dtype = child.bias.dtype if child.bias is not None else torch.float32
                linear = child.to_linear(dtype)
                if id(child.store) in weights:
                    linear.weight = weights[id(child.store)]
                weights.setdefault(id(child.store), linear.weight)
                replaced[id(child)] = linear
            setattr(parent, attr, replaced[id(child)])
    return model
