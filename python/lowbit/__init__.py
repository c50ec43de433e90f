"""lowbit: low-bit (INT8 / INT4) inference for PyTorch."""

import importlib.util
import os
import sys

import torch

# Loading the extension registers the torch.ops.lowbit schemas and kernels.
# LOWBIT_EXTENSION points at another build of it (the sanitizer build of `make sanitize`).
if os.environ.get("LOWBIT_EXTENSION"):
    _spec = importlib.util.spec_from_file_location("lowbit._C", os.environ["LOWBIT_EXTENSION"])
    _C = importlib.util.module_from_spec(_spec)
    sys.modules["lowbit._C"] = _C
    _spec.loader.exec_module(_C)
else:
    from lowbit import _C  # noqa: F401

from lowbit import ops  # noqa: E402  (fake implementations for torch.compile)
from lowbit.backends import backends, choose_backend, cpu_isa, use_cpu_isa  # noqa: E402
from lowbit.checkpoint import CheckpointError, load, save  # noqa: E402
from lowbit.formats import QuantizedWeight, Scheme, quantize_weight  # noqa: E402
from lowbit.nn import QuantLinear, W4A16Linear, W8A8Linear, W8A8StaticLinear, W8A16Linear  # noqa: E402
from lowbit.quantize import QuantConfig, QuantizeReport, dequantize, quantize  # noqa: E402
from lowbit import calibrate, plan  # noqa: E402  (lowbit.calibrate.GPTQ, lowbit.plan.Plan, ...)

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "QuantConfig",
    "QuantLinear",
    "QuantizeReport",
    "QuantizedWeight",
    "Scheme",
    "W4A16Linear",
    "W8A8Linear",
    "W8A8StaticLinear",
    "W8A16Linear",
    "backends",
    "calibrate",
    "choose_backend",
    "cpu_isa",
    "dequantize",
    "load",
    "ops",
    "plan",
    "quantize",
    "quantize_weight",
    "save",
    "use_cpu_isa",
]
