"""A smoke test of an installed lowbit, run from outside the checkout with no pytest: by
`make test-wheel` in a fresh venv holding only the repaired wheel, the torch it pins and
its dependencies (with --pinned), and by tests/test_setup.py after the README's
`pip install --no-build-isolation .`.

It checks that the installed lowbit is the wheel's (not an editable checkout), that the
extension loaded and was built for this torch, then quantizes a small model with every
scheme and compares each quantized layer's output with the reference backend on the same
canonical weight: bit-equal for the int8-activation schemes (integer sums), within the fp32
summation bound for the weight-only ones. Exits non-zero naming the first failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import torch

import lowbit
from lowbit import _build_info, backends
from lowbit.nn import QuantLinear

SCHEMES = ["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g128", "w4a16-g64-sym", "w4a16-gK"]
INTEGER_SUMS = {"w8a8", "w8a8-static"}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 192))


def check_layer(name: str, scheme: str, layer: QuantLinear, x: torch.Tensor) -> None:
    ref = backends.get_backend("reference")
    weight = layer.canonical()
    out, want = layer(x), ref.apply(x, ref.prepack(weight), layer.bias)
    if scheme in INTEGER_SUMS:
        ok = torch.equal(out, want)
    else:
        # K + 2 fp32 roundings of the products' magnitude (as tests/conftest.py bounds it).
        mag = x.abs() @ weight.dequantize().float().abs().t() + layer.bias.abs()
        ok = bool(((out - want).abs() <= 2 * (x.shape[-1] + 2) * 2.0**-23 * mag + 1e-30).all())
    if not ok:
        sys.exit(f"{scheme} layer {name} on backend {layer.backend.name}: output differs from the reference")


def main() -> None:
    parser = argparse.ArgumentParser(description="lowbit's post-install smoke test")
    parser.add_argument("--pinned", action="store_true", help="the distribution must require exactly this torch "
                        "(a wheel of make wheel)")
    args = parser.parse_args()
    installed = Path(lowbit.__file__).resolve()
    if "site-packages" not in installed.parts:
        sys.exit(f"lowbit imported from {installed}, not from the installed wheel")
    if _build_info.TORCH_VERSION.split("+")[0] != torch.__version__.split("+")[0]:
        sys.exit(f"built for torch {_build_info.TORCH_VERSION}, running {torch.__version__}")
    pin = f"torch=={torch.__version__.split('+')[0]}"
    if args.pinned and pin not in importlib.metadata.requires("lowbit"):
        sys.exit(f"the wheel does not require {pin}: {importlib.metadata.requires('lowbit')}")
    batches = [torch.randn(8, 256) for _ in range(2)]
    for scheme in SCHEMES:
        m = model()
        calibration = batches if scheme == "w8a8-static" else None
        lowbit.quantize(m, scheme, calibration=calibration, progress=False)
        layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
        if len(layers) != 2 or any(layer.backend.name != "cpu" for layer in layers.values()):
            sys.exit(f"{scheme}: expected both layers on the cpu backend, got "
                     f"{ {n: layer.backend.name for n, layer in layers.items()} }")
        x = torch.randn(5, 256)
        for name, layer in layers.items():
            check_layer(name, scheme, layer, x)
            x = torch.nn.functional.gelu(layer(x))
        print(f"{scheme}: {len(layers)} layers on cpu match the reference")
    print(f"lowbit {lowbit.__version__} from {installed.parent}, torch {torch.__version__}, "
          f"CPU path {backends.cpu_isa()}: smoke test passed")


if __name__ == "__main__":
    main()
