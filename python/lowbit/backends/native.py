"""The native backends: the C++ (``cpu``) and CUDA (``cuda``) kernels of ``lowbit._C``.

Both call the ``torch.ops.lowbit`` ops, which the dispatcher routes by device; a backend
can implement a scheme on a device exactly when the extension registered a kernel for
that scheme's op under the device's dispatch key.
"""

from __future__ import annotations

import torch

from lowbit import ops as native_ops
from lowbit.backends.base import Backend
from lowbit.formats import Scheme

# The op that runs each scheme's linear layer.
LINEAR_OPS = {
    "w8a8": "lowbit::w8a8_linear",
    "w8a8-static": "lowbit::w8a8_linear",
    "w8a16": "lowbit::w8a16_linear",
    "w4a16": "lowbit::w4a16_linear",
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


class NativeBackend(Backend):
    ops = native_ops

    def __init__(self, name: str, device_type: str, dispatch_key: str):
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key

    def available(self) -> tuple[bool, str]:
        if not any(has_kernel(op, self.dispatch_key) for op in LINEAR_OPS.values()):
            return False, f"lowbit._C has no {self.dispatch_key} linear kernels in this build"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return False, "built, but no CUDA device is visible"
        return True, f"lowbit._C {self.dispatch_key} kernels"

    def can_implement(self, scheme: Scheme, device: torch.device) -> tuple[bool, str]:
        if device.type != self.device_type:
            return False, f"runs on {self.device_type} tensors, not {device.type}"
        op = LINEAR_OPS[scheme.kind]
        if not has_kernel(op, self.dispatch_key):
            return False, f"no {self.dispatch_key} kernel for {op} in this build"
        return True, ""
