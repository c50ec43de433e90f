"""The ``triton`` backend: lowbit's Triton kernels (``lowbit.kernels``) on CUDA tensors.

W8A8 keeps the canonical int8 weight (the int8 GEMM reads it K-major, as the tensor cores
want); W4A16 and W8A16 prepack into the weight-only kernels' layout
(``lowbit.kernels.weight_only``). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors in Triton's interpreter — for tests only, so on CPU tensors this backend is never
chosen by priority; ask for it by name (``backend="triton"``).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from lowbit.backends.base import Backend
from lowbit.formats import QuantizedWeight, Scheme
from lowbit.kernels import interpreting


def _kernels():
    """The Triton modules, imported on first use: importing them decides between the
    compiler and the interpreter (TRITON_INTERPRET is read when a kernel is defined)."""
    from lowbit.kernels import ops, weight_only

    return ops, weight_only


@dataclasses.dataclass
class TritonPacked:
    canonical: QuantizedWeight
    weight_only: object | None  # lowbit.kernels.weight_only.Packed for W4A16 / W8A16


class TritonBackend(Backend):
    name = "triton"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        import triton

        if interpreting():
            return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, for tests"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible (TRITON_INTERPRET=1 runs the kernels on CPU, slowly)"
        return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"

    def can_implement(self, scheme: Scheme, device: torch.device) -> tuple[bool, str]:
        if device.type == "cuda" or (device.type == "cpu" and interpreting()):
            return True, ""
        return False, f"runs on cuda tensors (cpu ones only under TRITON_INTERPRET=1), not {device.type}"

    def chosen_by_priority(self, device: torch.device) -> bool:
        return device.type != "cpu"  # the interpreter is for tests, never a fallback

    def prepack(self, weight: QuantizedWeight) -> TritonPacked:
        _, weight_only = _kernels()
        if weight.scheme.is_int4:
            return TritonPacked(weight, weight_only.prepack_int4(weight.qweight, weight.scales, weight.zeros,
                                                                 weight.group_size))
        if weight.scheme.weight_only:
            return TritonPacked(weight, weight_only.prepack_int8(weight.qweight, weight.scales))
        return TritonPacked(weight, None)

    def apply(self, x, weight: TritonPacked, bias):
        ops, _ = _kernels()
        w, p = weight.canonical, weight.weight_only
        if p is not None:
            return ops.weight_only_linear(x, p.codes, p.scales, p.zeros, bias, p.group_size, p.bits,
                                          p.out_features, p.in_features)
        return ops.w8a8_linear(x, w.qweight, w.scales, bias, w.act_scale)
