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
from lowbit.backends.native import LINEAR_OPS, NativeBackend, has_kernel
from lowbit.formats import QuantizedWeight, Scheme

W4A16_OP = "lowbit::w4a16_linear_cuda_prepacked"


@dataclasses.dataclass
class CudaPacked:
    canonical: QuantizedWeight
    tensors: tuple[torch.Tensor, ...]  # W4A16: (codes, scales, zeros) on the GPU; W8A8: ()


class CudaBackend(NativeBackend):
    def __init__(self):
        super().__init__("cuda", "cuda", "CUDA")

    def can_implement(self, scheme: Scheme, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"runs on cuda tensors, not {device.type}"
        op = W4A16_OP if scheme.kind == "w4a16" else LINEAR_OPS[scheme.kind]
        if not has_kernel(op, self.dispatch_key):
            return False, f"no CUDA kernel for {scheme.kind} in this build"
        return True, ""

    def prepack(self, weight: QuantizedWeight) -> CudaPacked:
        if weight.scheme.kind != "w4a16":
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
