"""What every interop format provides: an encoder for export and a checkpoint reader for
import, with the checks both share (docs/interop.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lowbit import checkpoint
from lowbit.formats import QuantizedWeight, Scheme


class ExportError(ValueError):
    """A model that a format cannot hold exactly; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantized layer as an export sees it before reading its tensors."""

    name: str
    scheme: Scheme
    out_features: int
    in_features: int
    has_input_scale: bool
    has_input_perm: bool


class Format:
    """One external checkpoint format. ``refusal`` decides from the layer's description
    alone (scheme, shape, extra tensors) whether the format can hold it; ``encode`` writes
    its tensors and raises ``ValueError`` when the data itself does not fit exactly (a scale
    that is not a float16 value, a zero point the format cannot store)."""

    name = ""
    # The dtype scales are stored in (None: the model's float dtype).
    scale_dtype: torch.dtype | None = None

    def refusal(self, layer: Layer) -> str | None:
        raise NotImplementedError

    def encode(self, weight: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, layers: list[Layer], ignored: list[str], scale_dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def engine_notes(self, layers: list[Layer]) -> list[str]:
        """Where the chosen scheme falls off a serving engine's fast path."""
        if any(layer.scheme.kind == "w8a16" for layer in layers):
            return ["vLLM's CPU build has no 8-bit weight-only kernel and refuses W8A16 (GPUs serve it through "
                    "Marlin); for vLLM on CPU export W8A8 or W4A16"]
        return []


def stored_scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales in ``dtype``, refused (ValueError) unless every one is exactly a
    ``dtype`` value: a format must not round a layer silently."""
    converted = scales.to(dtype)
    if not torch.equal(converted.float(), scales):
        raise ValueError(f"scales are not {dtype} values, which this format stores them as; quantize with "
                         f"scale_dtype={dtype} (lowbit export does) so that the format holds the weight exactly")
    return converted


def uniform(layers: list[Layer], fmt: str) -> Scheme:
    """The one scheme of every quantized layer: GPTQ and AWQ configs describe one."""
    schemes = sorted({str(layer.scheme) for layer in layers})
    if len(schemes) != 1:
        raise ExportError(f"{fmt} describes one scheme for every quantized layer; this model mixes {schemes} "
                          "(export it as compressed-tensors, which holds one config group per scheme)")
    return layers[0].scheme


class Reader(checkpoint.Reader):
    """A checkpoint reader for a foreign format: no lowbit metadata, no digests; the
    quantized layers are the keys ending in ``marker``."""

    digests = False
    name = ""
    marker = ""

    def __init__(self, config: dict, directory: Path, model=None):
        self.config, self.directory, self.model = config, directory, model

    def header(self, files: list[Path]) -> checkpoint.Header:
        shapes, file_of, _ = checkpoint.read_shapes(files)
        layers = {}
        for key, (shape, dtype) in shapes.items():
            if key.endswith("." + self.marker):
                name = key[: -len(self.marker) - 1]
                try:
                    layers[name] = self.spec(name, shape, dtype, shapes)
                except ValueError as e:
                    raise checkpoint.CheckpointError(f"{self.directory}: layer {name!r}: {e}") from e
        if not layers:
            raise checkpoint.CheckpointError(f"{self.directory}: no quantized layer (no key ending in "
                                             f".{self.marker}) in the {self.name} checkpoint")
        return checkpoint.Header(layers, {}, shapes, file_of)

    def spec(self, name: str, shape: tuple, dtype: str, shapes: dict) -> dict:
        """The layer's spec (out_features, in_features and what ``weight`` needs) from its
        marker tensor's shape and the config."""
        raise NotImplementedError

    def take(self, name: str, header: checkpoint.Header, required: list[str], optional: list[str]) -> dict[str, str]:
        parts = {p: f"{name}.{p}" for p in required + optional if f"{name}.{p}" in header.shapes}
        missing = [p for p in required if p not in parts]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
        return parts
