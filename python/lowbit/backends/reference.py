"""The reference backend: ``lowbit.reference`` in pure PyTorch, on any device.

It is the oracle the kernels are tested against and the backend of last resort; when
the chooser picks it, the choice shows in the layer's repr and in the quantize report.
"""

from __future__ import annotations

import torch

from lowbit import reference
from lowbit.backends.base import Backend
from lowbit.formats import Scheme


class ReferenceBackend(Backend):
    name = "reference"
    ops = reference

    def available(self) -> tuple[bool, str]:
        return True, "pure PyTorch, any device (slow: the test oracle)"

    def can_implement(self, scheme: Scheme, device: torch.device) -> tuple[bool, str]:
        return True, ""
