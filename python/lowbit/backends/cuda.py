"""The ``cuda`` backend: lowbit's CUDA kernels (csrc/cuda).

W8A8 runs on the int8 tensor-core GEMM from the canonical weight (it is already K-major).
W4A16 runs on the W4A16 GEMM, whose weight order (csrc/cuda/w4a16_layout.h) is built once
on the CPU by ``w4a16_cuda_prepack`` and moved to the layer's GPU: tensor cores for float16 /
bfloat16 activations, CUDA-core FMAs on the same weights for float32 ones. Schemes without
a CUDA kernel in the build (W8A16) fall to the next backend (``triton``) when the layer is
built.

Whether a GPU runs the build depends on its compute capability and the targets compiled in
(``lowbit._C.cuda_targets()``, from cmake/cuda_archs.py): SASS for sm_XY runs on GPUs of the
same major version and a minor at least Y; sm_XYa only on sm_XY itself; PTX compute_XY on
every GPU of capability XY or newer, compiled when the library loads. The kernels need
capability 8.0 (cp.async, bf16 tensor cores).
"""

from __future__ import annotations

import torch

from lowbit import _extension, ops
from lowbit.backends.base import Packed
from lowbit.backends.native import NativeBackend
from lowbit.formats import QuantizedWeight, Scheme


MIN_CAPABILITY = (8, 0)
# The int8 GEMM accumulates in int32: 127 * 127 * K stays exact below K = 2^17.
INT8_MAX_K = 2**17


def cuda_targets() -> list[str]:
    """The GPU targets compiled into lowbit._C ("sm_80", "sm_90a", "compute_90", ...)."""
    return [t for t in _extension.load("_C").cuda_targets().split(",") if t]


def runs_on_capability(capability: tuple[int, int], targets: list[str]) -> tuple[bool, str]:
    """Whether code with ``targets`` runs on a GPU of ``capability``, and how (or why not)."""
    major, minor = capability
    cc = 10 * major + minor
    if capability < MIN_CAPABILITY:
        return False, (f"the GPU is sm_{cc}; lowbit's CUDA kernels need compute capability "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (cp.async, bf16 tensor cores)")
    for t in targets:
        kind, arch = t.split("_", 1)
        number, specific = int(arch.rstrip("a")), arch.endswith("a")
        if kind == "sm" and (number == cc if specific else number // 10 == major and number <= cc):
            return True, f"{t} code"
    for t in targets:
        kind, arch = t.split("_", 1)
        if kind == "compute" and not arch.endswith("a") and int(arch) <= cc:
            return True, f"{t} PTX, compiled for sm_{cc} when loaded"
    return False, (f"the GPU is sm_{cc} and this build holds {', '.join(targets) or 'no CUDA code'}; rebuild "
                   f"with TORCH_CUDA_ARCH_LIST={major}.{minor}")


class CudaBackend(NativeBackend):
    def __init__(self):
        super().__init__("cuda", "cuda", "CUDA")

    def kernel_op(self, scheme: Scheme) -> str:
        return "lowbit::w4a16_linear_cuda_prepacked" if scheme.is_int4 else f"lowbit::{scheme.op}"

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        if ok and not torch.cuda.is_available():
            return False, "built, but no CUDA device is visible"
        if ok:
            ok, how = runs_on_capability(torch.cuda.get_device_capability(), cuda_targets())
            why = f"{why}: {torch.cuda.get_device_name()}, {how}" if ok else how
        return ok, why

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        ok, why = super().can_implement(scheme, device, shape)
        if not ok:
            return ok, why
        ok, why = runs_on_capability(torch.cuda.get_device_capability(device), cuda_targets())
        if ok and shape is not None and not scheme.is_int4 and shape[1] > INT8_MAX_K:
            return False, f"the int8 GEMM takes K <= {INT8_MAX_K}, got K = {shape[1]}"
        return ok, "" if ok else why

    def prepack(self, weight: QuantizedWeight) -> Packed:
        """W8A8: the canonical tensors. W4A16: the GEMM's (codes, scales, zeros), built on
        the CPU and moved to the layer's GPU."""
        if not weight.scheme.is_int4:
            return Packed.of(weight, {"qweight": weight.qweight, "scales": weight.scales})
        device = weight.qweight.device
        cpu = [None if t is None else t.cpu() for t in (weight.qweight, weight.scales, weight.zeros)]
        codes, scales, zeros = (t.to(device) for t in ops.w4a16_cuda_prepack(*cpu, weight.group_size))
        return Packed.of(weight, {"codes": codes, "scales": scales, "zeros": zeros})

    def unpack(self, packed: Packed) -> QuantizedWeight:
        t = packed.tensors
        if not packed.scheme.is_int4:
            return packed.canonical(t["qweight"], t["scales"], None)
        device = packed.device
        cpu = [t[name].cpu() for name in ("codes", "scales", "zeros")]
        canonical = ops.w4a16_cuda_unpack(*cpu, packed.group_size, packed.out_features, packed.in_features)
        return packed.canonical(*(c.to(device) for c in canonical))

    def apply(self, x, weight: Packed, bias):
        t = weight.tensors
        if weight.scheme.is_int4:
            return ops.w4a16_linear_cuda_prepacked(x, t["codes"], t["scales"], t["zeros"], weight.group_size,
                                                   weight.out_features, bias)
        return ops.w8a8_linear(x, t["qweight"], t["scales"], bias, weight.act_scale)
