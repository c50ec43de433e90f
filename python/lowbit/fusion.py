"""One GEMM for the projections that read the same input (q/k/v; gate/up).

At decode a model calls each of q_proj, k_proj and v_proj on the same one-row input:
three small GEMVs, each with its own call, thread-pool wake-up and partial use of the
cores (k and v are 4x narrower than q under grouped-query attention). ``fuse`` packs the
members' weights into one weight of their rows stacked (a ``WeightStore`` of N = sum of
the members' N) and runs it once per input.

Exactness: every canonical format is per output row (per-channel or per-group-of-k
scales, per-token activation scales that depend on the input only), and the kernels
compute each output column from its own row with the same k order whatever N is, so the
fused output split by rows equals the separate layers' outputs bit for bit (tested).

The members stay what they were (``W4A16Linear`` ...) with their names, state dict,
checkpoint entries, ``canonical()`` and ONNX forms: each holds a ``RowSlice`` store, a view of
its rows of the group's weight, so the model still holds every weight once. The
projections are called one by one by the model's own code, so the group keeps the last
fused output: the first member called with an input computes it, the others called with
the same input object (not modified since, by its version counter) take their rows, and
it is dropped when all have. A member called with another input (or twice) computes
afresh, so the answer is right whatever the calling order. One limit: an input written in
place between two members' calls is seen through its version counter in eager autograd
mode only; inference-mode tensors and compiled code have none, so there the group takes
the same object for the same values (decoders never write their shared input between the
projections; a model that does should be quantized with ``fuse=False``).

Members are fused only when they agree on scheme, group size, backend and bias presence
and have no input scale or permutation (those make a new input per layer); the others
stay apart and the report says why. ``unfuse`` gives every member its own weight back.
Loading a state dict into a member gives it its own weight (the group is left to the
others).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.backends import Packed
from lowbit.formats import QuantizedWeight
from lowbit.nn import QuantLinear, WeightStore

# Sibling names that read one input in the common decoders (Llama/Mistral/Qwen/Gemma
# attention and MLP, BERT's self-attention, Mixtral's experts).
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


class FusedGroup:
    """The stacked weight of a group's members and the last output it computed.

    A plain object (not a module): the members own the state dict; the group is reached
    through their stores and moves with them."""

    def __init__(self, whole: WeightStore, members: Sequence[QuantLinear]):
        self.whole = whole
        # The member layers themselves: their biases are read at each fused call, so a cast,
        # a move or an in-place edit of a member's bias is what the group computes with.
        self.members = list(members)
        self.biased = members[0].bias is not None
        self.sizes = [m.out_features for m in members]
        self._input: torch.Tensor | None = None
        self._version = 0
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._taken = 0  # bit i: member i has taken its rows of _outputs

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        bit, version = 1 << index, _version(x)
        if self._input is not x or self._taken & bit or self._version != version:
            bias = torch.cat([m.bias for m in self.members]) if self.biased else None
            y = self.whole.backend.apply(x, self.whole.packed, bias)
            self._input, self._version, self._taken = x, version, 0
            self._outputs = tuple(y.split(self.sizes, dim=-1))
        out = self._outputs[index]
        self._taken |= bit
        if self._taken == (1 << len(self.sizes)) - 1:
            self._input, self._outputs = None, ()  # every member has its rows: hold nothing between calls
        return out


def _version(x: torch.Tensor) -> int:
    # Neither traced code nor inference-mode tensors have version counters; there the
    # group relies on the input object alone (see the module's docstring).
    return 0 if torch.compiler.is_compiling() or x.is_inference() else x._version


class _GroupBackend:
    """What a member's store answers as its backend: ``apply`` takes the member's rows of
    the group's output (computed with every member's bias)."""

    def __init__(self, group: FusedGroup, index: int):
        self.group = group
        self.index = index

    @property
    def name(self) -> str:
        return self.group.whole.backend.name

    def apply(self, x, packed, bias):
        return self.group.output(x, self.index)

    def unpack(self, packed: RowsPacked) -> QuantizedWeight:
        return packed.rows(self.group.whole.canonical())


@dataclasses.dataclass(kw_only=True)
class RowsPacked(Packed):
    """A member's view of rows [start, stop) of its group's packed weight."""

    start: int = 0
    stop: int = 0
    group: FusedGroup | None = None

    @property
    def device(self) -> torch.device:
        return self.group.whole.device

    def nbytes(self) -> int:
        # The member's share of the stacked weight, by rows.
        return self.group.whole.packed.nbytes() * (self.stop - self.start) // self.group.whole.packed.out_features

    def rows(self, whole: QuantizedWeight) -> QuantizedWeight:
        def cut(t):
            return None if t is None else t[self.start:self.stop]

        return dataclasses.replace(whole, qweight=cut(whole.qweight), scales=cut(whole.scales),
                                   zeros=cut(whole.zeros), out_features=self.stop - self.start,
                                   act_scale=self.act_scale)  # the member's own (equal) tensor


class RowSlice(WeightStore):
    """A member's store: its rows of the group's weight, run through the group."""

    def __init__(self, group: FusedGroup, index: int, start: int, stop: int, like: WeightStore):
        whole = group.whole.packed
        self.packed = RowsPacked(scheme=whole.scheme, group_size=whole.group_size, out_features=stop - start,
                                 in_features=whole.in_features, tensors={}, act_scale=like.packed.act_scale,
                                 start=start, stop=stop, group=group)
        self.backend = _GroupBackend(group, index)
        self.group = group
        self.preferred = like.preferred
        self.refusals = like.refusals

    @property
    def device(self) -> torch.device:
        return self.group.whole.device

    def move(self, device: torch.device) -> None:
        self.group.whole.move(device)  # a no-op for the members after the first


def _why_apart(members: Sequence[QuantLinear]) -> str | None:
    first = members[0]
    for m in members:
        if isinstance(m.store, RowSlice):
            return "already fused"
        if m.packed.input_scale is not None or m.packed.input_perm is not None:
            return "an input scale or permutation makes a new input per layer"
    keys = {(str(m.scheme), m.group_size, m.in_features, m.backend.name, m.bias is None, m.device) for m in members}
    if len(keys) > 1:
        return "the members differ in scheme, group size, in_features, backend, bias or device"
    if first.scheme.static_activations and len({float(m.act_scale) for m in members}) > 1:
        return "the members' static activation scales differ"
    return None


def fuse(model: nn.Module, groups: Sequence[Sequence[str]] = DEFAULT_GROUPS) -> dict[str, str]:
    """Fuse every group of sibling quantized layers named in ``groups`` (in place).

    Returns {layer name: note} for every member considered: "fused with ..." or why it
    stays apart."""
    notes: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        for names in groups:
            members = [parent._modules.get(n) for n in names]
            if not all(isinstance(m, QuantLinear) for m in members):
                continue
            full = [f"{parent_name}.{n}" if parent_name else n for n in names]
            why = _why_apart(members)
            if why is None:
                _fuse(members)
                note = "fused with " + "+".join(n for n in names)
            else:
                note = f"not fused: {why}"
            notes.update(dict.fromkeys(full, note))
    return notes


def _fuse(members: Sequence[QuantLinear]) -> None:
    parts = [m.canonical() for m in members]

    def stack(name):
        ts = [getattr(p, name) for p in parts]
        return None if ts[0] is None else torch.cat(ts)

    whole = dataclasses.replace(parts[0], qweight=stack("qweight"), scales=stack("scales"), zeros=stack("zeros"),
                                out_features=sum(p.out_features for p in parts))
    group = FusedGroup(WeightStore.build(whole, members[0].store.preferred), members)
    start = 0
    for index, m in enumerate(members):
        m.store = RowSlice(group, index, start, start + m.out_features, m.store)
        start += m.out_features


def unfuse(model: nn.Module) -> int:
    """Give every fused layer its own weight again (exact); returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.store, RowSlice):
            m.store = WeightStore.build(m.store.canonical(), m.store.preferred)
            count += 1
    return count
