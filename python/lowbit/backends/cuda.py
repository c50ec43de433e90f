"""The ``cuda`` backend: lowbit's CUDA kernels (csrc/cuda).

W8A8 runs on the int8 tensor-core GEMM from the canonical weight (it is already K-major).
W4A16 runs on the W4A16 GEMM, whose weight order (csrc/cuda/w4a16_layout.h) is built once
on the CPU by ``w4a16_cuda_prepack`` and moved to the layer's GPU: tensor cores for float16 /
bfloat16 activations, CUDA-core FMAs on the same weights for float32 ones. Schemes without
a CUDA kernel in the build (W8A16) fall to the next backend (``triton``) when the layer is
built.
"""

from __future__ import annotations

import dataclasses

import torch

from lowbit import ops
from lowbit.backends.native import NativeBackend
from lowbit.formats import QuantizedWeight, Scheme


@dataclasses.dataclass
class CudaPacked:
    canonical: QuantizedWeight
    tensors: tuple[torch.Tensor, ...]  # W4A16: (codes, scales, zeros) on the GPU; W8A8: ()


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

    def prepack(self, weight: QuantizedWeight) -> CudaPacked:
        if not weight.scheme.is_int4:
            return CudaPacked(weight, ())
        device = weight.qweight.device
        cpu = [None if t is None else t.cpu() for t in (weight.qweight, weight.scales, weight.zeros)]
        packed = ops.w4a16_cuda_prepack(*cpu, weight.group_size)
        return CudaPacked(weight, tuple(t.to(device) for t in packed))

    def apply(self, x, weight: CudaPacked, bias):
        w = weight.canonical
        if weight.tensors:
            return ops.w4a16_linear_cuda_prepacked(x, *weight.tensors, w.group_size, w.out_features, bias)
        return ops.w8a8_linear(x, w.qweight, w.scales, bias, w.act_scale)
