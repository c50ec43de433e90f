"""The ``cpu`` backend: lowbit's C++ kernels, with int8 weights prepacked for the GEMM.

The kernels pick an instruction-set path at run time (AVX-512 VNNI, AVX2 or portable
C++); ``use_cpu_isa`` forces a lower one, for tests and A/B benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import torch

from lowbit import ops
from lowbit.backends.native import NativeBackend
from lowbit.formats import QuantizedWeight


def _ext():
    return sys.modules["lowbit._C"]


def cpu_isa() -> str:
    """The instruction-set path the CPU kernels take now."""
    return _ext().cpu_isa()[0]


def best_cpu_isa() -> str:
    """The best path this CPU supports."""
    return _ext().cpu_isa()[1]


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels' path: "auto", "scalar", "avx2" or "avx512_vnni"."""
    _ext().set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str):
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


@dataclasses.dataclass
class PackedInt8:
    """int8 weights in the CPU GEMM's blocked layout (csrc/cpu/int8_gemm.h)."""

    canonical: QuantizedWeight
    packed: torch.Tensor
    comp: torch.Tensor


class CpuBackend(NativeBackend):
    def __init__(self):
        super().__init__("cpu", "cpu", "CPU")

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        return ok, f"{why} ({cpu_isa()} path; best here: {best_cpu_isa()})" if ok else why

    def prepack(self, weight: QuantizedWeight):
        if weight.scheme.kind in ("w8a8", "w8a8-static"):
            packed, comp = ops.int8_prepack(weight.qweight)
            return PackedInt8(weight, packed, comp)
        return weight

    def apply(self, x, weight, bias):
        if isinstance(weight, PackedInt8):
            w = weight.canonical
            return ops.w8a8_linear_prepacked(x, weight.packed, weight.comp, w.scales, bias, w.act_scale)
        return super().apply(x, weight, bias)
