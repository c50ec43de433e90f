"""The native backends: the C++ (``cpu``) and CUDA (``cuda``) kernels of ``lowbit._C``.

Both call ``torch.ops.lowbit`` ops, which the dispatcher routes by device; a backend can
implement a scheme on a device when the extension registered a kernel for the op it
runs (``kernel_op``) under the device's dispatch key.
"""

from __future__ import annotations

import torch

from lowbit.backends.base import Backend
from lowbit.formats import KINDS, Scheme


def has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


class NativeBackend(Backend):
    def __init__(self, name: str, device_type: str, dispatch_key: str):
        self.name = name
        self.device_type = device_type
        self.dispatch_key = dispatch_key

    def kernel_op(self, scheme: Scheme) -> str:
        """The qualified op this backend runs a layer of ``scheme`` with."""
        raise NotImplementedError

    def available(self) -> tuple[bool, str]:
        if not any(has_kernel(self.kernel_op(Scheme.default(kind)), self.dispatch_key) for kind in KINDS):
            return False, f"lowbit._C has no {self.dispatch_key} linear kernels in this build"
        return True, f"lowbit._C {self.dispatch_key} kernels"

    def runs_on(self, device: torch.device) -> bool:
        return device.type == self.device_type

    def can_implement(self, scheme: Scheme, device: torch.device,
                      shape: tuple[int, int] | None = None) -> tuple[bool, str]:
        op = self.kernel_op(scheme)
        if not has_kernel(op, self.dispatch_key):
            return False, f"no {self.dispatch_key} kernel for {op} in this build"
        return True, ""
