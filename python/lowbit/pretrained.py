"""Model directories: quantized transformers / sentence-transformers models on disk.

* ``save_pretrained(model, out, source=DIR)``: a directory a quantized model loads from —
  the lowbit checkpoint (one file or shards with an index), the source's configuration,
  tokenizer and generation files, and ``quantization_config`` in config.json (so that
  transformers refuses the directory instead of loading it wrong).
* ``load_pretrained(DIR)``: builds the model from its configuration with parameters on
  the ``meta`` device and loads the checkpoint into it: only the quantized tensors (and the
  float ones the checkpoint holds, like embeddings) are ever allocated.
* ``quantize_pretrained(DIR, out, scheme)``: quantizes a float directory without
  materializing the float model: parameters start on meta; the parts outside the repeated
  blocks are read from the source shards first; then each block is read, calibrated
  (GPTQ / AWQ / SmoothQuant layer-wise, the calibration activations carried from block to
  block) or rounded, written to the output shards and freed. The checkpoint's dtype
  (bf16 / fp16) is kept for what is not quantized; nothing is upcast as a whole.

A sentence-transformers directory keeps its module structure; its Transformer module's
model is what is quantized and stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lowbit import checkpoint
from lowbit.calibrate import pipeline
from lowbit.calibrate.blocks import find_blocks, resolve_blocks
from lowbit.calibrate.stages import Entry
from lowbit.formats import quantize_weight
from lowbit.nn import QuantLinear
from lowbit.quantize import QuantConfig, QuantizeReport, Selection, _as_config

QUANT_METHOD = "lowbit"
# The quant_method values load_pretrained reads: lowbit's own and the interop formats'.
READABLE = (QUANT_METHOD, "gptq", "awq", "compressed-tensors")
# Weight files of a source directory, not copied into a quantized one.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_sentence_transformers(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "modules.json").is_file()


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never a hub
    import transformers

    return transformers


def _config(directory: Path):
    if not directory.is_dir():
        raise FileNotFoundError(f"no model directory at {directory}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a transformers model directory)")
    config = _transformers().AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # lowbit's marker, read by lowbit alone
    return config


def _model_class(config):
    t = _transformers()
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    return t.AutoModelForCausalLM if causal else t.AutoModel


def build_empty(directory: str | os.PathLike) -> nn.Module:
    """The transformers model of a directory, built from its config.json with every
    parameter on the meta device (``checkpoint.empty_weights``)."""
    directory = Path(directory)
    config = _config(directory)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with checkpoint.empty_weights():
        model = _model_class(config).from_config(config, dtype=dtype)
    return model.eval()


def _transformer_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a model: itself, or a SentenceTransformer's first module's."""
    from sentence_transformers import SentenceTransformer

    if not isinstance(model, SentenceTransformer):
        return model
    inner = model[0].auto_model
    quantized_elsewhere = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)
                           and not any(m is x for x in inner.modules())]
    if quantized_elsewhere:
        raise ValueError("a sentence-transformers directory holds quantized layers in its Transformer module only; "
                         f"these are elsewhere: {quantized_elsewhere[:3]}")
    return inner


def _copy_support_files(source: Path, out: Path) -> None:
    """Everything of ``source`` but its weight files: configuration, tokenizer, generation
    config, sentence-transformers modules (their own small weights included)."""
    for item in source.iterdir():
        if item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        elif item.suffix not in _WEIGHT_SUFFIXES and item.name not in _WEIGHT_INDEXES:
            shutil.copy2(item, out / item.name)


def lowbit_config(layers: dict) -> dict:
    """The ``quantization_config`` of a lowbit directory with these layer specs."""
    return {"quant_method": QUANT_METHOD, "format_version": checkpoint.FORMAT_VERSION,
            "schemes": sorted({spec["scheme"] for spec in layers.values()})}


def finish_directory(out: Path, source: Path | None, model: nn.Module | None, quantization_config: dict) -> None:
    """The non-weight files of a quantized model directory: ``source``'s configuration,
    tokenizer and generation files (or the model's own config), and ``quantization_config``
    in config.json (lowbit's, or an export format's)."""
    if source is not None:
        _copy_support_files(source, out)
    elif model is not None and hasattr(model, "config"):
        model.config.to_json_file(out / "config.json")
    config_path = out / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{out}: no config.json to describe the model: pass source=DIR (the float model's "
                         "directory) or a transformers model")
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_pretrained(model: nn.Module, out: str | os.PathLike, *, source: str | os.PathLike | None = None,
                    max_shard_size: int | str | None = None) -> Path:
    """Write a quantized transformers model (or SentenceTransformer) as a directory that
    ``load_pretrained`` reads: the checkpoint, and ``source``'s configuration and tokenizer
    files (a transformers model's own config when no source is given)."""
    out = Path(out)
    inner = _transformer_model(model)
    checkpoint.save(inner, out, max_shard_size=max_shard_size)
    layers = checkpoint._plan(inner).layers
    finish_directory(out, None if source is None else Path(source), inner, lowbit_config(layers))
    return out


@contextlib.contextmanager
def _transformers_builds_from_lowbit(device, backend):
    """While active, ``PreTrainedModel.from_pretrained`` on a lowbit directory builds the
    model empty and loads the lowbit checkpoint into it: how a SentenceTransformer, which
    calls from_pretrained itself, gets its quantized Transformer module."""
    t = _transformers()
    original = t.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        directory = Path(path)
        if _quant_method(directory) not in READABLE:
            return original(cls, path, *args, **kwargs)
        config = kwargs.get("config") or _config(directory)
        with checkpoint.empty_weights():
            model = cls._from_config(config)
        return _load_into(model.eval(), directory, device, backend)

    t.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        t.PreTrainedModel.from_pretrained = classmethod(original)


def _quant_method(directory: Path) -> str | None:
    from lowbit import interop

    return (interop.quantization_config(directory) or {}).get("quant_method")


def _load_into(model: nn.Module, directory: Path, device, backend) -> nn.Module:
    """Load a quantized directory's checkpoint, lowbit's or an interop format's, into a
    model built without weights; every tensor must be filled."""
    reader = None
    if _quant_method(directory) != QUANT_METHOD:
        from lowbit import interop

        reader = interop.reader_for(directory, model)
    checkpoint.load(model, directory, device=device, backend=backend, reader=reader)
    left = checkpoint.meta_tensors(model)
    if left:
        raise checkpoint.CheckpointError(f"{directory}: the checkpoint leaves tensors unloaded: {left[:5]}")
    return model.eval()


def load_pretrained(directory: str | os.PathLike, *, device: torch.device | str | None = None,
                    backend: str | None = None) -> nn.Module:
    """A quantized model directory as a ready model in eval mode: a transformers model, or
    a SentenceTransformer when the directory is one. Reads lowbit's own directories
    (``save_pretrained`` / ``quantize_pretrained`` / ``lowbit quantize``) and GPTQ, AWQ and
    compressed-tensors ones (``lowbit.interop``), whoever wrote them. No float copy of a
    quantized layer is made; each layer picks its backend for ``device`` (default CPU)."""
    directory = Path(directory)
    method = _quant_method(directory)
    if method not in READABLE:
        raise checkpoint.CheckpointError(f"{directory}: not a quantized model directory lowbit reads (config.json's "
                                         f"quantization_config.quant_method is {method!r}; lowbit reads "
                                         f"{', '.join(READABLE)})")
    device = torch.device(device or "cpu")
    if is_sentence_transformers(directory):
        from sentence_transformers import SentenceTransformer

        with _transformers_builds_from_lowbit(device, backend):
            return SentenceTransformer(str(directory), device=str(device)).eval()
    return _load_into(build_empty(directory), directory, device, backend)


# --- quantizing a directory without materializing the float model ---------------------------------


class _Source:
    """The float tensors of a model directory's safetensors checkpoint, read one at a time
    (``checkpoint.read_tensor``: each released with the tensor)."""

    def __init__(self, directory: Path):
        self.file_of: dict[str, Path] = {}
        for file in checkpoint.checkpoint_files(directory):
            with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
                self.file_of.update({k: file for k in f.keys()})

    def get(self, key: str) -> torch.Tensor:
        return checkpoint.read_tensor(self.file_of[key], key)


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Every parameter by identity, with each (module, attribute, state-dict key) holding it."""
    owners: dict[int, list] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr, f"{prefix}.{attr}" if prefix else attr))
    return owners


def _forward(causal: bool) -> Callable[[nn.Module, Any], Any]:
    """A transformers model on a calibration batch (token ids, or a tokenizer's dict). A
    causal LM runs without a KV cache: a block runs several times on the same captured
    arguments, which must not grow a cache."""
    extra = {"use_cache": False} if causal else {}

    def forward(model, batch):
        return model(**batch, **extra) if isinstance(batch, dict) else model(input_ids=batch, **extra)
    return forward


class _Materializer:
    """Fills meta parameters from the source checkpoint and empties them again, keeping
    tied parameters tied (one tensor for every owner)."""

    def __init__(self, model: nn.Module, source: _Source):
        self.source = source
        self.owners = _parameter_owners(model)

    def _stored_key(self, owners) -> str:
        for _, _, key in owners:
            if key in self.source.file_of:
                return key
        raise checkpoint.CheckpointError(f"the source checkpoint has none of {[k for _, _, k in owners]}")

    def fill(self, module: nn.Module, recurse: bool = True) -> None:
        for p in list(module.parameters(recurse=recurse)):
            if p.device.type != "meta":
                continue
            owners = self.owners.pop(id(p))
            tensor = self.source.get(self._stored_key(owners))
            if tuple(tensor.shape) != tuple(p.shape):
                raise checkpoint.CheckpointError(f"{owners[0][2]}: {tuple(tensor.shape)} in the source checkpoint, "
                                                 f"{tuple(p.shape)} in the model's configuration")
            self._set(owners, nn.Parameter(tensor, requires_grad=False))

    def empty(self, module: nn.Module) -> None:
        for p in list(module.parameters()):
            if p.device.type != "meta":
                self._set(self.owners.pop(id(p)), nn.Parameter(p.to("meta"), requires_grad=False))

    def _set(self, owners, param: nn.Parameter) -> None:
        for owner, attr, _ in owners:
            owner._parameters[attr] = param
        self.owners[id(param)] = owners


def quantize_pretrained(
    source: str | os.PathLike,
    out: str | os.PathLike,
    config: QuantConfig | str = "w4a16-g128",
    *,
    calibration: Iterable | None = None,
    calibration_forward: Callable[[nn.Module, Any], Any] | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = True,
    **fields,
) -> QuantizeReport:
    """Quantize the float model of directory ``source`` into directory ``out`` block by
    block, never holding the float model (see the module doc). ``config`` and the keywords
    are those of ``lowbit.quantize``; ``calibration`` holds batches of the transformers
    model's inputs (token id tensors, or dicts of them) for the calibration methods, which
    run layer-wise. Selected layers outside the repeated blocks (a head) are rounded to
    nearest: they run after all the blocks, which a streamed model never holds at once. The
    result loads with ``load_pretrained(out)`` and equals the same model quantized in
    memory with the layers outside the blocks rounded to nearest."""
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    config = _as_config(config, fields)
    if config.propagate != "quantized":
        raise ValueError("quantize_pretrained carries the quantized blocks' outputs (propagate='quantized')")
    model = build_empty(source)
    found = find_blocks(model) if config.blocks is None else resolve_blocks(model, config.blocks)
    if found is None:
        raise ValueError(f"{source}: quantize_pretrained streams a model's repeated blocks and found none")
    blocks_name, blocks = found[0], list(found[1])
    selection = Selection(model, config, allow_meta=True)
    in_block = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    for e in [e for e in selection.entries if e.needs_act_scale and id(e.linear) not in in_block]:
        selection.skip(e, "outside the blocks: a streamed model cannot observe its activation scale")
    by_block: dict[int | None, list[Entry]] = {}
    for e in selection.entries:
        by_block.setdefault(in_block.get(id(e.linear)), []).append(e)
    calibrated = [e for e in selection.entries if in_block.get(id(e.linear)) is not None]
    reason = pipeline.needs_calibration(config.method, calibrated) if calibrated else None
    if reason is not None and calibration is None:
        raise ValueError(f"{reason}: needs calibration data (calibration=batches)")

    materializer = _Materializer(model, _Source(source))
    layers = {e.name: selection.spec(e) for e in selection.entries}
    tied = {key: owners[0][2] for owners in materializer.owners.values() for _, _, key in owners[1:]}
    aliases = {k: v for k, v in tied.items() if k.rpartition(".")[0] not in layers}
    linear_of = {e.name: e.linear for e in selection.entries}
    if calibration_forward is None:
        calibration_forward = _forward(_model_class(model.config) is _transformers().AutoModelForCausalLM)

    def round_to_nearest(entries: Sequence[Entry]) -> None:
        for e in entries:
            selection.replace(e, quantize_weight(e.linear.weight.detach(), e.scheme, e.name, act_scale=e.act_scale,
                                                 scale_dtype=config.scale_dtype))

    with checkpoint.CheckpointWriter(out, layers, aliases, max_shard_size=max_shard_size) as writer:

        def enter(i: int, block: nn.Module) -> None:
            materializer.fill(block)

        def leave(i: int, block: nn.Module) -> None:
            """The block's state (canonical quantized layers) into the output; then its
            quantized layers give way to their float skeletons again, and its parameters
            go back to meta."""
            prefix = f"{blocks_name}.{i}."
            plan = checkpoint._plan(block)
            for key, produce in plan.producers:
                writer.add(prefix + key, produce())
            for name in plan.layers:
                parent, attr = checkpoint._owner(block, name)
                setattr(parent, attr, linear_of[prefix + name])
            selection.release(by_block.get(i, []))
            materializer.empty(block)

        for m in model.modules():  # everything outside the blocks: embeddings, norms, a head
            if id(m) not in in_block:
                materializer.fill(m, recurse=False)
        round_to_nearest(by_block.get(None, []))
        if reason is None:
            for i, block in enumerate(blocks):
                enter(i, block)
                round_to_nearest(by_block.get(i, []))
                leave(i, block)
        else:
            selection.report.calibration = pipeline.run(
                model, calibrated, config.method, calibration, replace=selection.replace,
                calibration_forward=calibration_forward, observer=config.observer, sequential=True,
                blocks=blocks, shared_weights=selection.shared_weights, stats_device=config.calibration_device,
                scale_dtype=config.scale_dtype, block_hooks=(enter, leave), progress=progress)
        rest = checkpoint._plan(model)  # what lies outside the blocks (their parameters are meta again)
        for key, produce in rest.producers:
            if not key.startswith(f"{blocks_name}."):
                writer.add(key, produce())
        writer.close()
    finish_directory(out, source, None, lowbit_config(layers))
    return selection.report
