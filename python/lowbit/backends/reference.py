"""The reference backend: ``lowbit.reference`` in pure PyTorch, on any device.

It is the oracle the kernels are tested against and the backend of last resort; when
the chooser picks it, the choice shows in the layer's repr and in the quantize report.
"""

from __future__ import annotations

import torch

from lowbit import reference
from lowbit.backends.base import Backend
from lowbit.formats import QuantizedWeight, Scheme


class ReferenceBackend(Backend):
    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, "pure PyTorch, any device (slow: the test oracle)"

    def can_implement(self, scheme: Scheme, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def apply(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.scheme.is_int4:
            return reference.w4a16_linear(x, weight.qweight, weight.scales, weight.zeros, weight.group_size, bias)
        if weight.scheme.weight_only:
            return reference.w8a16_linear(x, weight.qweight, weight.scales, bias)
        return reference.w8a8_linear(x, weight.qweight, weight.scales, bias, weight.act_scale)
