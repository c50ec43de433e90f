"""The backend interface, the registry and the chooser (docs/design.md, "Backends").

A backend states what it can run (``can_implement``), turns canonical weights into its
own layout once (``prepack``), gives them back exactly (``unpack``: a quantized layer holds
only the prepacked form), and runs a linear layer on them (``apply``). The chooser
walks the registry in priority order once, when a layer is quantized or moved; nothing
falls back silently at run time. ``LOWBIT_DISABLE_BACKENDS=cpu,cuda`` takes backends out
of the choice (for debugging and A/B benchmarks).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from lowbit.formats import QuantizedWeight, Scheme

DISABLE_ENV = "LOWBIT_DISABLE_BACKENDS"


@dataclasses.dataclass(kw_only=True)
class Packed:
    """A weight in a backend's runtime layout: the one copy a quantized layer holds.

    ``tensors`` are the backend's runtime tensors by name; the other fields are what the
    backend's ``unpack`` needs to give the canonical weight back."""

    scheme: Scheme
    group_size: int
    out_features: int
    in_features: int
    tensors: dict[str, torch.Tensor]
    act_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    input_perm: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: QuantizedWeight, tensors: dict[str, torch.Tensor], **fields) -> Packed:
        """``tensors`` in place of ``weight``'s canonical ones, with its shape and scales."""
        return cls(scheme=weight.scheme, group_size=weight.group_size, out_features=weight.out_features,
                   in_features=weight.in_features, tensors=tensors, act_scale=weight.act_scale,
                   input_scale=weight.input_scale, input_perm=weight.input_perm, **fields)

    def canonical(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> QuantizedWeight:
        """The canonical weight made of these tensors and this weight's shape and scales."""
        if zeros is not None and self.scheme.symmetric:
            zeros = None  # an unpacked symmetric weight stores its implicit zero point 8
        return QuantizedWeight(scheme=self.scheme, qweight=qweight, scales=scales, zeros=zeros,
                               group_size=self.group_size, out_features=self.out_features,
                               in_features=self.in_features, act_scale=self.act_scale,
                               input_scale=self.input_scale, input_perm=self.input_perm)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def nbytes(self) -> int:
        """Bytes held at run time (the backend's tensors and the scales beside them)."""
        extra = [t for t in (self.act_scale, self.input_scale, self.input_perm) if t is not None]
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *extra))


class Backend:
    """One way of running quantized linear layers; subclasses set ``name``."""

    name: str = ""

    def available(self) -> tuple[bool, str]:
        """Whether this backend can run anything here at all, and why (not)."""
        raise NotImplementedError

    def runs_on(self, device: torch.device) -> bool:
        """Whether this backend runs tensors of ``device``'s type at all."""
        raise NotImplementedError

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        """Whether this backend runs ``scheme`` on ``device`` (of a type it ``runs_on``) for a
        weight of ``shape`` (N, K; None: any shape); the reason when it does not."""
        raise NotImplementedError

    def chosen_by_priority(self, device: torch.device) -> bool:
        """False where the backend runs only when asked for by name (``prefer``)."""
        return True

    def prepack(self, weight: QuantizedWeight) -> Packed:
        """The weight in this backend's layout."""
        raise NotImplementedError

    def unpack(self, packed: Packed) -> QuantizedWeight:
        """The exact inverse of ``prepack``: the canonical weight, on the packed weight's device."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, weight: Packed, bias: torch.Tensor | None) -> torch.Tensor:
        """``y = x @ w'^T + bias`` for a prepacked weight."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<lowbit backend {self.name}>"


_REGISTRY: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Add a backend; earlier registrations have higher priority."""
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _REGISTRY.append(backend)
    return backend


def get_backend(name: str) -> Backend:
    for b in _REGISTRY:
        if b.name == name:
            return b
    raise KeyError(f"no backend named {name!r}; known: {[b.name for b in _REGISTRY]}")


def disabled_backends() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _status(backend: Backend) -> tuple[bool, str]:
    if backend.name in disabled_backends():
        return False, f"disabled by {DISABLE_ENV}"
    return backend.available()


@dataclasses.dataclass
class Choice:
    """The backend chosen for a layer, and why each backend of higher priority that runs
    on the device refused it (shown in the quantize report)."""

    backend: Backend
    refusals: list[str]


def choose(scheme: Scheme, device: torch.device | str, prefer: str | None = None,
           shape: tuple[int, int] | None = None) -> Choice:
    """The first backend, in priority order, that runs ``scheme`` on ``device`` for a weight
    of ``shape`` (N, K).

    ``prefer`` names a backend to use instead of the priority order; it must be able to
    run the scheme. When nothing fits, the error lists every backend's reason.
    """
    device = torch.device(device)
    candidates = _REGISTRY if prefer is None else [get_backend(prefer)]
    reasons, refusals = [], []
    for backend in candidates:
        if not backend.runs_on(device):
            ok, why = False, f"does not run {device.type} tensors"
        else:
            ok, why = _status(backend)
            if ok:
                ok, why = backend.can_implement(scheme, device, shape)
            if not ok:
                refusals.append(f"{backend.name}: {why}")
        if ok and prefer is None and not backend.chosen_by_priority(device):
            ok, why = False, f"runs {device.type} tensors only when asked for by name"
        if ok:
            return Choice(backend, refusals)
        reasons.append(f"  {backend.name}: {why}")
    raise RuntimeError(f"no lowbit backend runs {scheme} on {device}" + (f" for a weight of {shape[0]}x{shape[1]}"
                       if shape else "") + ":\n" + "\n".join(reasons))


def choose_backend(scheme: Scheme, device: torch.device | str, prefer: str | None = None,
                   shape: tuple[int, int] | None = None) -> Backend:
    """``choose(...).backend``: the first backend, in priority order, that runs ``scheme``
    on ``device`` (for a weight of ``shape``, N x K, when given)."""
    return choose(scheme, device, prefer, shape).backend


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


class BackendReport(list):
    """``lowbit.list_backends()``: one row per backend; prints as a table."""

    def __str__(self) -> str:
        width = max((len(s.name) for s in self), default=7)
        lines = [f"{'backend':<{width}}  available  reason"]
        lines += [f"{s.name:<{width}}  {'yes' if s.available else 'no':<9}  {s.reason}" for s in self]
        return "\n".join(lines)


def list_backends() -> BackendReport:
    """Every registered backend, whether it is available here, and why (not)."""
    return BackendReport(BackendStatus(b.name, *_status(b)) for b in _REGISTRY)
