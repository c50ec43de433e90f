"""The ``cuda`` backend: lowbit's CUDA kernels (csrc/cuda).

W8A8 runs on the int8 tensor-core GEMM from the canonical weight (it is already K-major).
W4A16 runs on the W4A16 GEMM, whose weight order (csrc/cuda/w4a16_layout.h) is built once
on the CPU by ``w4a16_cuda_prepack`` and moved to the layer's GPU: tensor cores for float16 /
bfloat16 activations, CUDA-core FMAs on the same weights for float32 ones. Schemes without
a CUDA kernel in the build (W8A16) fall to the next backend (``triton``) when the layer is
built.
"""

from __future__ import annotations

import torch

from lowbit import ops
from lowbit.backends.base import Packed
from lowbit.backends.native import NativeBackend
from lowbit.formats import QuantizedWeight, Scheme


class CudaBackend(NativeBackend):
    def __init__(self):
        super().__init__("cuda", "cuda", "CUDA")

    def kernel_op(self, scheme: Scheme) -> str:
        return "lowbit::w4a16_linear_cuda_prepacked" if scheme.is_int4 else f"lowbit::{scheme.op}"

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        if ok and not torch.cuda.is_available():
            return False, "built, but no CUDA device is visible"
        return ok, why

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
