"""Checkpoints in the formats serving engines read: GPTQ, AWQ (GEMM) and compressed-tensors
(docs/interop.md).

* ``lowbit.export(model, out, format, source=DIR)`` writes a quantized model as a
  transformers-style directory of that format: config.json with the format's
  ``quantization_config``, safetensors shards with an index, the source's tokenizer and
  generation files. Layers a format cannot hold exactly are refused, all of them named,
  before anything is written.
* ``lowbit.load_pretrained(DIR)`` reads those formats, written by any tool, into lowbit
  layers (``reader_for``); anything it cannot serve exactly is refused naming the layer or
  the config field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit import checkpoint
from lowbit.interop.awq import AWQ, AWQReader
from lowbit.interop.base import ExportError, Format, Layer
from lowbit.interop.compressed_tensors import CompressedTensors, CompressedTensorsReader
from lowbit.interop.gptq import GPTQ, GPTQReader
from lowbit.nn import QuantEmbedding, QuantLinear

FORMATS = ("compressed-tensors", "gptq", "awq")  # checkpoint directories; "onnx" writes a file


class EngineWarning(UserWarning):
    """An export that serving engines read, but off their fast path (docs/interop.md)."""

_READERS = {"gptq": GPTQReader, "awq": AWQReader, "compressed-tensors": CompressedTensorsReader}


def format_for(name: str, checkpoint_format: str = "gptq") -> Format:
    """The exporter of a format by name; ``checkpoint_format`` ("gptq" or "gptq_v2") picks
    GPTQ's zero-point convention."""
    if name == "gptq":
        return GPTQ(checkpoint_format)
    if name == "awq":
        return AWQ()
    if name == "compressed-tensors":
        return CompressedTensors()
    raise ValueError(f"unknown export format {name!r}; expected one of {FORMATS} or 'onnx'")


@dataclasses.dataclass
class ExportReport:
    format: str
    path: Path
    layers: list[str]
    ignored: list[str]
    notes: list[str]

    def __str__(self) -> str:
        lines = [f"exported {len(self.layers)} quantized layer(s) as {self.format} to {self.path}; kept float: "
                 f"{', '.join(self.ignored) if self.ignored else 'none'}"]
        lines += [f"warning: {note}" for note in self.notes]
        return "\n".join(lines)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float tensors (embeddings, norms): what it serves in."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _by_reason(why: dict[str, str]) -> str:
    """Layers grouped by the reason given ("a, b: reason; c: other reason")."""
    layers_of: dict[str, list[str]] = {}
    for name, reason in why.items():
        layers_of.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in layers_of.items())


def export(model: nn.Module, out: str | os.PathLike, format: str = "compressed-tensors", *,
           source: str | os.PathLike | None = None, checkpoint_format: str = "gptq",
           scale_dtype: torch.dtype | None = None, max_shard_size: int | str | None = None,
           example_inputs=None, accuracy_level: int = 4):
    """Write a lowbit-quantized model to ``out`` in ``format``:

    * "compressed-tensors", "gptq", "awq": a transformers model (or SentenceTransformer) as
      the new directory ``out``, with the configuration and tokenizer files of ``source``
      (the float model's directory; else the model's own config). ``scale_dtype``: how
      scales are stored (GPTQ and AWQ: float16; compressed-tensors: the model's float
      dtype); a scale that is not exactly such a value is refused, so quantize with
      ``scale_dtype=`` that dtype (``lowbit export`` does). Returns an ``ExportReport``.
    * "onnx": the file ``out`` for onnxruntime (``lowbit.interop.onnx.export_onnx``:
      ``example_inputs``, ``accuracy_level``). Returns an ``OnnxReport``.

    Raises ``ExportError`` naming every layer the format cannot hold, writing nothing."""
    from lowbit import pretrained

    if format == "onnx":
        from lowbit.interop.onnx import export_onnx

        return export_onnx(model, out, example_inputs, accuracy_level=accuracy_level)

    fmt = format_for(format, checkpoint_format)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    inner = pretrained._transformer_model(model)
    modules = list(checkpoint._modules(inner))
    tables = [prefix[:-1] for prefix, m in modules if isinstance(m, QuantEmbedding)]
    if tables:
        raise ExportError(f"{fmt.name} holds quantized Linear layers only; these embedding tables are quantized: "
                          f"{', '.join(tables)} (quantize without embeddings= for this format)")
    layers = [Layer(prefix[:-1], m.scheme, m.out_features, m.in_features, m.packed.input_scale is not None,
                    m.packed.input_perm is not None) for prefix, m in modules if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no quantized layer to export (quantize it first)")
    refused = {layer.name: reason for layer in layers if (reason := fmt.refusal(layer)) is not None}
    if refused:
        raise ExportError(f"{fmt.name} cannot hold {len(refused)} layer(s): {_by_reason(refused)}")
    ignored = [prefix[:-1] for prefix, m in modules if type(m) is nn.Linear]
    dtype = scale_dtype or fmt.scale_dtype or _float_dtype(inner)
    config = fmt.quantization_config(layers, ignored, dtype)

    failed: dict[str, str] = {}
    seen: set[tuple] = set()  # storages written: a tied tensor is written once, as transformers does
    with checkpoint.CheckpointWriter(out, {}, {}, max_shard_size=max_shard_size,
                                     metadata=lambda shard: {"format": "pt"}) as writer:
        for prefix, module in modules:
            if isinstance(module, QuantLinear):
                try:
                    tensors = fmt.encode(module.canonical(), dtype)
                except ValueError as e:
                    failed[prefix[:-1]] = str(e)
                    continue
                for key, t in tensors.items():
                    writer.add(prefix + key, t)
                if module.bias is not None:
                    writer.add(prefix + "bias", module.bias)
                continue
            own: dict[str, torch.Tensor] = {}
            module._save_to_state_dict(own, prefix, keep_vars=True)
            for key, t in own.items():
                storage = checkpoint._storage_key(t)
                if storage not in seen:
                    seen.add(storage)
                    writer.add(key, t)
        if failed:
            raise ExportError(f"{fmt.name} cannot hold {len(failed)} layer(s) exactly: {_by_reason(failed)}")
        writer.close()
    pretrained.finish_directory(out, None if source is None else Path(source), inner, config)
    notes = fmt.engine_notes(layers)
    for note in notes:
        warnings.warn(note, EngineWarning, stacklevel=2)
    return ExportReport(fmt.name, out, [layer.name for layer in layers], ignored, notes)


def quantization_config(directory: str | os.PathLike) -> dict | None:
    """A model directory's ``quantization_config``: config.json's, or an older GPTQ
    checkpoint's quantize_config.json; None for a float model."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    found = config.get("quantization_config")
    if found is None and (directory / "quantize_config.json").is_file():
        found = {"quant_method": "gptq", **json.loads((directory / "quantize_config.json").read_text())}
    return found


def reader_for(directory: str | os.PathLike, model: nn.Module) -> checkpoint.Reader:
    """The checkpoint reader of a GPTQ, AWQ or compressed-tensors directory;
    ``CheckpointError`` naming the field lowbit cannot serve."""
    config = quantization_config(directory) or {}
    method = config.get("quant_method")
    if method not in _READERS:
        raise checkpoint.CheckpointError(f"{directory}: quantization_config.quant_method = {method!r}; lowbit reads "
                                         f"lowbit, {', '.join(FORMATS)}")
    try:
        return _READERS[method](config, Path(directory), model)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{directory}: {e}") from e


__all__ = ["FORMATS", "EngineWarning", "ExportError", "ExportReport", "export", "format_for", "quantization_config",
           "reader_for"]
