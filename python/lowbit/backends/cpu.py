"""The ``cpu`` backend: lowbit's C++ kernels, each weight prepacked once for its kernel.

The kernels pick an instruction-set path at run time (AMX, AVX-512 VNNI, AVX2 or portable
C++); ``use_cpu_isa`` forces a lower one for a block of code (tests, A/B benchmarks), and
``set_cpu_isa`` for the rest of the process.
"""

from __future__ import annotations

import contextlib
import dataclasses


from lowbit import _extension, ops, plan
from lowbit.backends.base import Packed
from lowbit.backends.native import NativeBackend
from lowbit.formats import QuantizedWeight, Scheme

_C = _extension.load("_C")

def cpu_isa() -> str:
    """The instruction-set path the CPU kernels take now."""
    return _C.cpu_isa()[0]


def best_cpu_isa() -> str:
    """The best path this CPU supports."""
    return _C.cpu_isa()[1]


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels' path from now on: "auto", "scalar", "avx2", "avx512_vnni" or
    "amx" (a path this CPU lacks raises ValueError)."""
    _C.set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """``with use_cpu_isa("avx2"): ...`` runs the block on that path, then restores the
    previous one."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


@dataclasses.dataclass(kw_only=True)
class CpuPacked(Packed):
    """A weight in the CPU kernels' layout. ``tensors``: int8 — "weight" (int8_prepack's
    blocked layout) and "scales" (canonical); w8a16 — "weight" (w8a16_prepack's panels) and
    "scales"; w4a16 — "weight" and "params" (w4a16_prepack's panels and per-group scales
    and zero points)."""

    # ((M bucket, kernel path id), ...) from the tuned plan (lowbit.plan), or None: the
    # kernel chooses by its built-in heuristics.
    paths: tuple[tuple[int, int], ...] | None = None


class CpuBackend(NativeBackend):
    def __init__(self):
        super().__init__("cpu", "cpu", "CPU")

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        return ok, f"{why} ({cpu_isa()} path; best here: {best_cpu_isa()})" if ok else why

    def kernel_op(self, scheme: Scheme) -> str:
        return f"lowbit::{scheme.op}_prepacked"  # the linear op on this backend's own layout

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        ok, why = super().can_implement(scheme, device, shape)
        max_k = ops.LAYOUT["int8_max_k"]  # the int8 GEMM's int32 sums of (w + 128) * x stay exact
        if ok and shape is not None and not scheme.weight_only and shape[1] > max_k:
            return False, f"the int8 GEMM takes K <= {max_k}, got K = {shape[1]}"
        return ok, why

    def prepack(self, weight: QuantizedWeight) -> CpuPacked:
        scheme = weight.scheme
        if scheme.is_int4:
            w, params = ops.w4a16_prepack(weight.qweight, weight.scales, weight.zeros, weight.group_size)
            tensors = {"weight": w, "params": params}
        elif scheme.weight_only:
            tensors = {"weight": ops.w8a16_prepack(weight.qweight), "scales": weight.scales}
        else:
            tensors = {"weight": ops.int8_prepack(weight.qweight), "scales": weight.scales}
        active = plan.active_plan()
        paths = None if active is None else active.paths(scheme, "cpu", weight.out_features, weight.in_features)
        return CpuPacked.of(weight, tensors, paths=paths)

    def unpack(self, packed: CpuPacked) -> QuantizedWeight:
        t, n = packed.tensors, packed.out_features
        if packed.scheme.is_int4:
            return packed.canonical(*ops.w4a16_unpack(t["weight"], t["params"], packed.group_size, n))
        if packed.scheme.weight_only:
            return packed.canonical(ops.w8a16_unpack(t["weight"], n), t["scales"], None)
        return packed.canonical(ops.int8_unpack(t["weight"], n, packed.in_features), t["scales"], None)

    def apply(self, x, weight: CpuPacked, bias):
        t = weight.tensors
        path = plan.AUTO_ID
        if weight.paths is not None:
            # The first run of buckets whose bound is at or above M (Plan.paths), inline:
            # this runs on every call, where a function call alone would cost about 3% of
            # a 20-microsecond small-M call.
            shape = x.shape
            m = shape[0] if len(shape) == 2 else x.numel() // shape[-1]
            path = weight.paths[-1][1]
            for bound, p in weight.paths:
                if m <= bound:
                    path = p
                    break
        if weight.scheme.is_int4:
            return ops.w4a16_linear_prepacked(x, t["weight"], t["params"], weight.group_size, weight.out_features,
                                              bias, path)
        if weight.scheme.weight_only:
            return ops.w8a16_linear_prepacked(x, t["weight"], t["scales"], bias, path)
        return ops.w8a8_linear_prepacked(x, t["weight"], t["scales"], weight.in_features, bias, weight.act_scale, path)
