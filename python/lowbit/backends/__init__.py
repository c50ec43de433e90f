"""Backends: who runs a quantized linear layer, chosen once per layer (see base.py).

Priority order: the CUDA kernels, the C++ CPU kernels, the Triton kernels (on CUDA tensors;
they take whatever the CUDA kernels do not), then the pure-PyTorch reference.
"""

from lowbit.backends.base import (
    DISABLE_ENV,
    Backend,
    BackendReport,
    BackendStatus,
    Choice,
    Packed,
    choose,
    choose_backend,
    get_backend,
    list_backends,
    register,
)
from lowbit.backends.cpu import CpuBackend, best_cpu_isa, cpu_isa, set_cpu_isa, use_cpu_isa
from lowbit.backends.cuda import CudaBackend
from lowbit.backends.reference import ReferenceBackend
from lowbit.backends.triton import TritonBackend

register(CudaBackend())
register(CpuBackend())
register(TritonBackend())
register(ReferenceBackend())

__all__ = [
    "DISABLE_ENV",
    "Backend",
    "BackendReport",
    "BackendStatus",
    "Choice",
    "Packed",
    "best_cpu_isa",
    "cpu_isa",
    "set_cpu_isa",
    "use_cpu_isa",
    "choose",
    "choose_backend",
    "get_backend",
    "list_backends",
    "register",
]
