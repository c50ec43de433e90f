"""Quantized checkpoints: ``lowbit.save(model, path)`` and ``lowbit.load(model, path)``.

A checkpoint is one safetensors file holding the model's whole state_dict with every
quantized layer in the canonical format, plus metadata:

  format          "lowbit"
  format_version  FORMAT_VERSION
  layers          JSON {layer name: {scheme, group_size, in_features, out_features, bias}}
  aliases         JSON {state_dict key: key it shares storage with} (tied or shared
                  tensors are stored once; safetensors refuses shared storage)
  sha256          digest of every stored tensor (name, dtype, shape, bytes), so corrupt
                  data is caught, not just a corrupt header

``load`` reads and checks the whole file first (header, version, digest, every layer's
shape against the model, every other key against the model's state) and only then
changes the model, so a bad file leaves the model as it was. Each quantized layer picks
its backend for the target device at load time, so a checkpoint loads anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit import checks
from lowbit.formats import QuantizedWeight, Scheme, check_input_scale
from lowbit.nn import CANONICAL, QuantLinear, module_for

FORMAT = "lowbit"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the model is unchanged."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (quantized layers canonical, everything else as is) to ``path``."""
    layers = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantLinear):
            layers[name] = {
                "scheme": str(module.scheme),
                "group_size": module.group_size,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
    tensors, aliases, first_key = {}, {}, {}
    for key, t in model.state_dict().items():
        sk = _storage_key(t)
        if sk in first_key:
            aliases[key] = first_key[sk]
        else:
            first_key[sk] = key
            tensors[key] = t.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": json.dumps(layers, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
        "sha256": _digest(tensors),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for every malformation
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lowbit checkpoint (metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this lowbit reads version {FORMAT_VERSION}")
    if metadata.get("sha256") != _digest(tensors):
        raise CheckpointError(f"{path}: tensor data does not match its sha256 digest (corrupt file)")
    return metadata, tensors


def _canonical(name: str, spec: dict, tensors: dict[str, torch.Tensor], path) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """The layer's canonical weight from the file, checked like a kernel argument."""
    try:
        scheme = Scheme.parse(spec["scheme"])
        parts = {part: tensors.get(f"{name}.{part}") for part in CANONICAL}
        n, k, g = int(spec["out_features"]), int(spec["in_features"]), int(spec["group_size"])
        qw = QuantizedWeight(scheme=scheme, group_size=g, out_features=n, in_features=k, **parts)
        if qw.qweight is None or qw.scales is None:
            raise ValueError("qweight or scales missing")
        if scheme.is_int4:
            checks.int4_weight(qw.qweight, qw.scales, qw.zeros, g)
            if (qw.zeros is None) != scheme.symmetric:
                raise ValueError(f"zero points {'present' if qw.zeros is not None else 'missing'} for {scheme}")
            if qw.zeros is not None and int(qw.zeros.max()) > 15:
                raise ValueError("zero points above 15")
        else:
            checks.int8_weight(qw.qweight, qw.scales)
            if (qw.act_scale is None) == scheme.static_activations:
                raise ValueError(f"activation scale does not fit {scheme}")
        rows, cols = qw.qweight.shape
        stored = (rows, cols * 2) if scheme.is_int4 else (rows, cols)
        if stored != (n, k):
            raise ValueError(f"weight is {stored[0]}x{stored[1]}, metadata says {n}x{k}")
        if not (torch.isfinite(qw.scales).all() and (qw.scales > 0).all()):
            raise ValueError("scales must be finite and positive")
        if qw.input_scale is not None:
            check_input_scale(qw.input_scale, k, "input_scale")
        bias = tensors.get(f"{name}.bias")
        if spec["bias"] != (bias is not None) or (bias is not None and tuple(bias.shape) != (n,)):
            raise ValueError("bias missing or of the wrong shape")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: layer {name!r}: {e}") from e
    return qw, bias


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Load a lowbit checkpoint into ``model`` (a float skeleton, or an already quantized
    model of the same structure) on ``device`` (default: where the model's tensors are).

    Raises ``CheckpointError`` naming the problem, with the model untouched, when the
    file is truncated, corrupt, of another format version, or does not fit the model.
    """
    metadata, tensors = _read(path)
    try:
        layers = json.loads(metadata["layers"])
        aliases = json.loads(metadata["aliases"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt metadata: {e}") from e
    for key, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {key!r} points at missing tensor {target!r}")
        tensors[key] = tensors[target]
    if device is None:
        first = next(iter(model.state_dict().values()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    # Plan every change before making any: new modules per layer, then the other keys.
    new_modules: dict[str, QuantLinear] = {}
    built: dict[int, QuantLinear] = {}  # by id of the old module (shared modules stay shared)
    moved: dict[int, torch.Tensor] = {}  # one device copy per stored tensor (ties stay tied)

    def to_device(t):
        if t is None:
            return None
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{path}: layer {name!r} does not exist in the model") from e
        if not isinstance(old, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"{path}: {name!r} is a {type(old).__name__} in the model, not a Linear layer")
        shape = (old.out_features, old.in_features)
        if shape != (spec.get("out_features"), spec.get("in_features")):
            raise CheckpointError(f"{path}: layer {name!r} is {shape[0]}x{shape[1]} in the model but "
                                  f"{spec.get('out_features')}x{spec.get('in_features')} in the checkpoint")
        qw, bias = _canonical(name, spec, tensors, path)
        if id(old) not in built:
            moved_qw = dataclasses.replace(qw, **{part: to_device(t) for part, t in qw.tensors().items()})
            built[id(old)] = module_for(qw.scheme)(moved_qw, to_device(bias), backend, name)
        new_modules[name] = built[id(old)]

    layer_keys = {f"{name}.{part}" for name in layers for part in (*CANONICAL, "bias", "weight")}
    expected = {k: v for k, v in model.state_dict().items() if k not in layer_keys}
    stored = {k: v for k, v in tensors.items() if k not in layer_keys}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in expected.items():
        if tuple(value.shape) != tuple(stored[key].shape):
            raise CheckpointError(f"{path}: {key!r} is {tuple(value.shape)} in the model but "
                                  f"{tuple(stored[key].shape)} in the checkpoint")

    # Apply: nothing below can fail on a checked plan.
    for name, module in new_modules.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module)
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for key in expected:
            state[key].copy_(stored[key])
    return model
