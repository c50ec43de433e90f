"""lowbit: low-bit (INT8 / INT4) inference for PyTorch.

``lowbit.quantize(model, "w4a16-g128")`` swaps a model's ``nn.Linear`` layers for
quantized ones; ``lowbit.save`` / ``lowbit.load`` write and read checkpoints; the
subpackages hold the rest: ``lowbit.ops`` (the custom ops), ``lowbit.formats`` (schemes
and canonical weights), ``lowbit.nn`` (the modules), ``lowbit.backends`` (who runs a
layer), ``lowbit.calibrate`` (GPTQ, AWQ, SmoothQuant, observers), ``lowbit.plan`` (per-M
kernel choice), and, imported on first use, ``lowbit.bench``, ``lowbit.tools``, ``lowbit.lora``
(LoRA adapters over quantized layers), ``lowbit.qat`` (quantization-aware training) and
``lowbit.decode`` (greedy decoding with one compiled step).
"""

import importlib

import torch  # noqa: F401  (the extension links against it)

from lowbit import _extension

# Loading the extension registers the torch.ops.lowbit schemas and kernels.
_C = _extension.load("_C")

from lowbit import ops  # noqa: E402  (fake implementations for torch.compile)
from lowbit import backends, formats, nn  # noqa: E402
from lowbit.backends import (  # noqa: E402
    best_cpu_isa,
    choose_backend,
    cpu_isa,
    list_backends,
    set_cpu_isa,
    use_cpu_isa,
)
from lowbit.checkpoint import CheckpointError, empty_weights, load, save  # noqa: E402
from lowbit.formats import QuantizedWeight, Scheme, quantize_weight  # noqa: E402
from lowbit.nn import QuantLinear, W4A16Linear, W8A8Linear, W8A8StaticLinear, W8A16Linear  # noqa: E402
from lowbit.fusion import fuse, unfuse  # noqa: E402
from lowbit.quantize import QuantConfig, QuantizeReport, dequantize, quantize  # noqa: E402
from lowbit.pretrained import load_pretrained, quantize_pretrained, save_pretrained  # noqa: E402
from lowbit.interop import export  # noqa: E402
from lowbit import calibrate, interop, plan  # noqa: E402

__version__ = "0.1.0"

# Heavier subpackages, imported when first named (``lowbit.bench.run`` after ``import lowbit``).
_LAZY = ("bench", "tools", "demo", "cli", "lora", "qat", "decode")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"lowbit.{name}")
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


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
    "bench",
    "best_cpu_isa",
    "calibrate",
    "choose_backend",
    "cpu_isa",
    "decode",
    "dequantize",
    "empty_weights",
    "export",
    "formats",
    "interop",
    "list_backends",
    "load",
    "load_pretrained",
    "lora",
    "nn",
    "ops",
    "plan",
    "qat",
    "quantize",
    "quantize_pretrained",
    "quantize_weight",
    "save",
    "save_pretrained",
    "set_cpu_isa",
    "tools",
    "use_cpu_isa",
]
