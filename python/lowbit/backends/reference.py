"""The reference backend: ``lowbit.reference`` in pure PyTorch, on any device.

It is the oracle the kernels are tested against and the backend of last resort; when
the chooser picks it, the choice shows in the layer's repr and in the quantize report.
Its runtime form is the canonical one.
"""

from __future__ import annotations

import torch

from lowbit import reference
from lowbit.backends.base import Backend, Packed
from lowbit.formats import QuantizedWeight, Scheme


class ReferenceBackend(Backend):
    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, "pure PyTorch, any device (slow: the test oracle)"

    def runs_on(self, device: torch.device) -> bool:
        return True

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        return True, ""

    def prepack(self, weight: QuantizedWeight) -> Packed:
        tensors = {"qweight": weight.qweight, "scales": weight.scales}
        if weight.zeros is not None:
            tensors["zeros"] = weight.zeros
        return Packed.of(weight, tensors)

    def unpack(self, packed: Packed) -> QuantizedWeight:
        t = packed.tensors
        return packed.canonical(t["qweight"], t["scales"], t.get("zeros"))

    def apply(self, x: torch.Tensor, weight: Packed, bias: torch.Tensor | None) -> torch.Tensor:
        t = weight.tensors
        if weight.scheme.is_int4:
            return reference.w4a16_linear(x, t["qweight"], t["scales"], t.get("zeros"), weight.group_size, bias)
        if weight.scheme.weight_only:
            return reference.w8a16_linear(x, t["qweight"], t["scales"], bias)
        y = reference.w8a8_linear(x.detach(), t["qweight"], t["scales"], bias, weight.act_scale)
        if x.requires_grad:
            # Straight through the activation quantization, as the native ops' gradient is:
            # the added term is exactly zero, its gradient that of x @ W'^T.
            w = reference.dequantize_int8(t["qweight"], t["scales"], torch.float32)
            through = (x.float() @ w.t()).to(x.dtype)
            y = y + (through - through.detach())
        return y
