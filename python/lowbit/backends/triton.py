"""The ``triton`` backend: lowbit's Triton kernels (``lowbit.kernels``) on CUDA tensors.

W8A8 keeps the canonical int8 weight (the int8 GEMM reads it K-major, as the tensor cores
want); W4A16 and W8A16 prepack into the weight-only kernels' layout
(``lowbit.kernels.weight_only``). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors in Triton's interpreter — for tests only, so on CPU tensors this backend is never
chosen by priority; ask for it by name (``backend="triton"``).
"""

from __future__ import annotations

import importlib.util

import torch

from lowbit.backends.base import Backend, Packed
from lowbit.backends.cuda import INT8_MAX_K, MIN_CAPABILITY
from lowbit.formats import QuantizedWeight, Scheme
from lowbit.kernels import interpreting


def _kernels():
    """The Triton modules, imported on first use: importing them decides between the
    compiler and the interpreter (TRITON_INTERPRET is read when a kernel is defined)."""
    from lowbit.kernels import ops, weight_only

    return ops, weight_only


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

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            major, minor = torch.cuda.get_device_capability(device)
            return False, f"the GPU is sm_{major}{minor}; the Triton kernels are tuned and checked for 8.0 and newer"
        if shape is not None and not scheme.weight_only and shape[1] > INT8_MAX_K:
            return False, f"the int8 GEMM takes K <= {INT8_MAX_K}, got K = {shape[1]}"
        return True, ""

    def chosen_by_priority(self, device: torch.device) -> bool:
        return device.type != "cpu"  # the interpreter is for tests, never a fallback

    def prepack(self, weight: QuantizedWeight) -> Packed:
        """W8A8: the canonical tensors (the int8 GEMM reads them K-major); weight-only: the
        weight-only GEMM's layout (``lowbit.kernels.weight_only``)."""
        if not weight.scheme.weight_only:
            return Packed.of(weight, {"qweight": weight.qweight, "scales": weight.scales})
        _, weight_only = _kernels()
        if weight.scheme.is_int4:
            p = weight_only.prepack_int4(weight.qweight, weight.scales, weight.zeros, weight.group_size)
        else:
            p = weight_only.prepack_int8(weight.qweight, weight.scales)
        tensors = {"codes": p.codes, "scales": p.scales}
        if p.zeros is not None:
            tensors["zeros"] = p.zeros
        return Packed.of(weight, tensors)

    def _kernel_packed(self, weight: Packed):
        _, weight_only = _kernels()
        t = weight.tensors
        return weight_only.Packed(t["codes"], t["scales"], t.get("zeros"), weight.group_size,
                                  4 if weight.scheme.is_int4 else 8, weight.out_features, weight.in_features)

    def unpack(self, packed: Packed) -> QuantizedWeight:
        if not packed.scheme.weight_only:
            return packed.canonical(packed.tensors["qweight"], packed.tensors["scales"], None)
        _, weight_only = _kernels()
        return packed.canonical(*weight_only.unpack(self._kernel_packed(packed)))

    def apply(self, x, weight: Packed, bias):
        ops, _ = _kernels()
        t = weight.tensors
        if weight.scheme.weight_only:
            p = self._kernel_packed(weight)
            return ops.weight_only_linear(x, p.codes, p.scales, p.zeros, bias, p.group_size, p.bits,
                                          p.out_features, p.in_features)
        return ops.w8a8_linear(x, t["qweight"], t["scales"], bias, weight.act_scale)
