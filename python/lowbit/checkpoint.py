"""Quantized checkpoints: ``lowbit.save``, ``lowbit.load`` and ``lowbit.load_pretrained``.

A checkpoint is the model's state dict, every quantized layer in the canonical format, in
safetensors: one file (``model.safetensors``, or any ``*.safetensors`` path), or shards
``model-0000k-of-0000n.safetensors`` with an index ``model.safetensors.index.json``
(``weight_map``: key -> shard) as transformers writes them. Each file's metadata holds:

  format          "lowbit"
  format_version  FORMAT_VERSION
  layers          JSON {layer name: {scheme, group_size, in_features, out_features, bias}}
  aliases         JSON {key: key it shares storage with} (tied or shared tensors, and the
                  layers that share one quantized weight, are stored once)
  sha256          digest of that file's tensors (name, dtype, shape, bytes), so corrupt
                  data is caught, not just a corrupt header

Saving and loading stream: a shard at a time is written, and a tensor at a time is read,
so that neither needs the whole checkpoint in memory (a quantized layer's canonical
tensors exist only while it is being written or prepacked). ``load`` first checks every
header against the model (names, shapes, dtypes), then reads the data, checking each
file's digest and each layer's tensors as it goes, and changes the model only when all
of it has passed: a bad file leaves the model as it was. Parameters still on the ``meta``
device are replaced by the loaded tensors, so a model built without weights
(``empty_weights()``) is filled with quantized layers without any float copy of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.formats import QuantizedWeight, Scheme
from lowbit.nn import CANONICAL, QuantEmbedding, QuantLinear, WeightStore, module_for

FORMAT = "lowbit"
FORMAT_VERSION = "1"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model; the model is unchanged."""


def _parse_size(size: int | str) -> int:
    """Bytes from an int or "500MB" / "2GB" / "1GiB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, unit in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                         ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * unit)
    return int(text)


class _Digest:
    """sha256 over (name, dtype, shape, bytes) of tensors fed in sorted name order."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, key: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        self._h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        self._h.update(t.reshape(-1).view(torch.uint8).numpy().data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    d = _Digest()
    for key in sorted(tensors):
        d.update(key, tensors[key])
    return d.hexdigest()


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# --- save ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """What a save writes, decided before any tensor is computed: the quantized layers'
    specs, the keys in order with how to produce each, and the aliases."""

    layers: dict[str, dict]
    producers: list[tuple[str, Callable[[], torch.Tensor]]]
    aliases: dict[str, str]


class _CanonicalParts:
    """A quantized layer's canonical tensors, unpacked when the first is asked for and
    released after the last, so that one layer's canonical copy exists at a time."""

    def __init__(self, module: QuantLinear, names: list[str]):
        self.module, self.names, self.weight = module, names, None

    def get(self, name: str) -> torch.Tensor:
        if self.weight is None:
            self.weight = self.module.canonical()
        t = getattr(self.weight, name)
        if name == self.names[-1]:
            self.weight = None
        return t


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(prefix, module) under every name, as the state dict visits them, not descending
    into quantized layers."""
    inside: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(q) for q in inside):
            continue
        if isinstance(module, QuantLinear):
            inside.append(prefix)
        yield prefix, module


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of everything but the quantized layers (which would unpack)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in _modules(model):
        if not isinstance(module, (QuantLinear, QuantEmbedding)):
            module._save_to_state_dict(state, prefix, keep_vars=True)
    return state


def _plan(model: nn.Module) -> _Plan:
    layers, producers, aliases = {}, [], {}
    first_name: dict[int, str] = {}  # module id -> the first name it was seen at
    first_store: dict[int, str] = {}  # store id -> the first layer name holding it
    first_key: dict[tuple, str] = {}  # storage -> the first key holding it
    for prefix, module in _modules(model):
        if isinstance(module, QuantEmbedding):
            name = prefix[:-1]
            layers[name] = embedding_spec(module)
            if id(module) in first_name:
                aliases.update({prefix + n: f"{first_name[id(module)]}.{n}" for n in _embedding_names(module)})
                continue
            first_name[id(module)] = name
            producers += [(prefix + n, lambda t=getattr(module, n): t) for n in _embedding_names(module)]
            continue
        if isinstance(module, QuantLinear):
            name = prefix[:-1]
            layers[name] = {"scheme": str(module.scheme), "group_size": module.group_size,
                            "in_features": module.in_features, "out_features": module.out_features,
                            "bias": module.bias is not None}
            names = module._state_names()
            if id(module) in first_name:  # the same module under a second name
                aliases.update({prefix + n: f"{first_name[id(module)]}.{n}" for n in names})
                continue
            first_name[id(module)] = name
            canonical_names = [n for n in names if n != "bias"]
            if id(module.store) in first_store:  # a layer sharing another's quantized weight
                aliases.update({prefix + n: f"{first_store[id(module.store)]}.{n}" for n in canonical_names})
            else:
                first_store[id(module.store)] = name
                parts = _CanonicalParts(module, canonical_names)
                producers += [(prefix + n, lambda parts=parts, n=n: parts.get(n)) for n in canonical_names]
            if module.bias is not None:
                producers.append((prefix + "bias", lambda b=module.bias: b))
            continue
        own: dict[str, torch.Tensor] = {}
        module._save_to_state_dict(own, prefix, keep_vars=True)
        for key, t in own.items():
            if not isinstance(t, torch.Tensor):
                continue
            sk = _storage_key(t)
            if sk in first_key:
                aliases[key] = first_key[sk]
            else:
                first_key[sk] = key
                producers.append((key, lambda t=t: t))
    return _Plan(layers, producers, aliases)


def embedding_spec(module: QuantEmbedding) -> dict:
    """A quantized embedding table's entry in the checkpoint's layers (a table [V, D] is
    stored as a weight with out_features V and in_features D)."""
    return {"module": "embedding", "scheme": str(module.scheme), "group_size": module.group_size,
            "in_features": module.embedding_dim, "out_features": module.num_embeddings, "bias": False,
            "padding_idx": module.padding_idx, "dtype": str(module.dtype).removeprefix("torch.")}


def _embedding_names(module: QuantEmbedding) -> list[str]:
    return ["qweight", "scales"] + (["zeros"] if module.zeros is not None else [])


def _metadata(layers: dict, aliases: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(layers, sort_keys=True),
            "aliases": json.dumps(aliases, sort_keys=True), "sha256": _digest(tensors)}


class CheckpointWriter:
    """A checkpoint directory written as tensors arrive: ``add(key, tensor)`` fills a shard
    of at most ``max_shard_size`` bytes (default 2 GiB; "500MB" works too), which is
    written to a staging directory when full; ``close`` moves the files into place —
    ``model.safetensors`` alone, or shards ``model-0000k-of-0000n.safetensors`` and the
    index last — so an interrupted write never leaves a checkpoint that loads as if
    complete. Used as a context manager, an exception removes what was staged."""

    def __init__(self, path: str | os.PathLike, layers: dict, aliases: dict, *,
                 max_shard_size: int | str | None = None,
                 metadata: Callable[[dict[str, torch.Tensor]], dict[str, str]] | None = None):
        self.path = Path(path)
        self.layers, self.aliases = layers, aliases
        # Each shard's safetensors metadata (lowbit's by default; an export writes other formats').
        self.metadata = metadata or (lambda shard: _metadata(self.layers, self.aliases, shard))
        self.limit = _parse_size(max_shard_size if max_shard_size is not None else DEFAULT_SHARD_BYTES)
        if self.limit <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".lowbit-write-", dir=self.path))
        self.written: list[tuple[str, list[str]]] = []
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            self.abort()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > self.limit:
            self._flush()
        self.shard[key] = t
        self.size += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.written):05d}"
        save_file(self.shard, os.fspath(self.staging / name), metadata=self.metadata(self.shard))
        self.written.append((name, list(self.shard)))
        self.total += self.size
        self.shard, self.size = {}, 0

    def close(self) -> Path:
        if self.shard or not self.written:
            self._flush()
        path, written = self.path, self.written
        for stale in [INDEX_FILE, SINGLE_FILE, *(p.name for p in path.glob("model-*-of-*.safetensors"))]:
            (path / stale).unlink(missing_ok=True)  # the old index first: it must not describe new files
        if len(written) == 1:
            (self.staging / written[0][0]).replace(path / SINGLE_FILE)
        else:
            weight_map = {}
            for i, (name, keys) in enumerate(written):
                final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
                (self.staging / name).replace(path / final)
                weight_map.update({k: final for k in keys})
            weight_map.update({k: weight_map[t] for k, t in self.aliases.items() if t in weight_map})
            identity = {k: v for k, v in self.metadata({}).items() if k in ("format", "format_version")}
            index = {"metadata": {**identity, "total_size": self.total},
                     "weight_map": dict(sorted(weight_map.items()))}
            tmp_index = self.staging / INDEX_FILE
            tmp_index.write_text(json.dumps(index, indent=2))
            tmp_index.replace(path / INDEX_FILE)
        self.abort()
        return path

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def write(path: str | os.PathLike, layers: dict, aliases: dict, items: Iterable[tuple[str, torch.Tensor]], *,
          max_shard_size: int | str | None = None) -> Path:
    """Write a checkpoint of ``items`` ((key, tensor), consumed lazily) with the quantized
    layers' specs ``layers`` and the ``aliases`` (see the module doc): one file for a
    ``path`` ending in ``.safetensors``, else a directory (``CheckpointWriter``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        with CheckpointWriter(path, layers, aliases, max_shard_size=max_shard_size) as writer:
            for key, t in items:
                writer.add(key, t)
            return writer.close()
    if max_shard_size is not None:
        raise ValueError("max_shard_size applies to a directory, not to one .safetensors file")
    tensors = {key: t.detach().cpu().contiguous() for key, t in items}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, os.fspath(tmp), metadata=_metadata(layers, aliases, tensors))
    tmp.replace(path)
    return path


def save(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str | None = None) -> Path:
    """Write ``model`` (quantized layers canonical, everything else as is) and return where:
    one ``.safetensors`` file, or a directory (sharded past ``max_shard_size``); see
    ``write``."""
    plan = _plan(model)
    items = ((key, produce()) for key, produce in plan.producers)
    return write(path, plan.layers, plan.aliases, items, max_shard_size=max_shard_size)


# --- load ----------------------------------------------------------------------------------------


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file. safetensors maps the file and hands out views of
    the mapping, whose touched pages stay resident while the open file lives; opening the
    file for each tensor gives each a mapping of its own, released with the tensor, so
    that reading a checkpoint tensor by tensor keeps only the tensors in use resident."""
    with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, or a directory's
    ``model.safetensors`` or the shards its index names."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / INDEX_FILE).exists():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a readable checkpoint index: {e}") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: the index names shards that are missing: {missing[:3]}")
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


@dataclasses.dataclass
class Header:
    """What a checkpoint's files say, before any data is read."""

    layers: dict[str, dict]  # quantized layer name -> its spec (what the reader needs to build it)
    aliases: dict[str, str]
    shapes: dict[str, tuple[tuple[int, ...], str]]  # stored key -> (shape, dtype name)
    file_of: dict[str, Path]

    def resolve(self, key: str) -> str | None:
        """The stored key behind ``key`` (itself, or what it aliases), or None if absent."""
        if key in self.shapes:
            return key
        return self.aliases.get(key)


def read_shapes(files: list[Path]) -> tuple[dict, dict, list[dict[str, str]]]:
    """Every file's keys with (shape, dtype), the file of each key, and each file's metadata;
    ``CheckpointError`` for a file safetensors cannot read."""
    shapes, file_of, metadata = {}, {}, []
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
                metadata.append(f.metadata() or {})
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key] = (tuple(sl.get_shape()), sl.get_dtype())
                    file_of[key] = file
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error type for every malformation
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return shapes, file_of, metadata


class Reader:
    """How a checkpoint holds its quantized layers. This one reads lowbit's own format;
    ``lowbit.interop`` has readers for the GPTQ, AWQ and compressed-tensors formats. ``load``
    asks the reader for the header, then each layer's stored keys, then builds each layer's
    canonical weight from its tensors."""

    # Whether every file carries a sha256 of its tensors to check while reading.
    digests = True

    def header(self, files: list[Path]) -> Header:
        shapes, file_of, metadata = read_shapes(files)
        layers = aliases = None
        for file, meta in zip(files, metadata):
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{file}: not a lowbit checkpoint (metadata format={meta.get('format')!r})")
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointError(f"{file}: checkpoint format version {version!r}; this lowbit reads version "
                                      f"{FORMAT_VERSION}")
            try:
                these = json.loads(meta["layers"]), json.loads(meta["aliases"])
            except (KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{file}: corrupt metadata: {e}") from e
            if layers is None:
                layers, aliases = these
            elif (layers, aliases) != these:
                raise CheckpointError(f"{file}: its layer metadata differs from the other shards'")
        for key, target in aliases.items():
            if target not in shapes:
                raise CheckpointError(f"{files[0].parent}: alias {key!r} points at missing tensor {target!r}")
        return Header(layers, aliases, shapes, file_of)

    def parts(self, name: str, spec: dict, header: Header) -> dict[str, str]:
        """The layer's stored keys by part (every key that belongs to the layer, the bias
        included); ``ValueError`` naming what is missing or malformed."""
        try:
            scheme = Scheme.parse(spec["scheme"])
            int(spec["group_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(str(e)) from e
        parts = {part: header.resolve(f"{name}.{part}") for part in (*CANONICAL, "bias")}
        needed = ["qweight", "scales"] + (["zeros"] if scheme.is_int4 and not scheme.symmetric else [])
        needed += ["act_scale"] if scheme.static_activations else []
        needed += ["bias"] if spec.get("bias") else []
        missing = [p for p in needed if parts[p] is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing for {scheme}")
        return {p: k for p, k in parts.items() if k is not None}

    def weight(self, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The layer's canonical weight from its tensors by part (not yet validated)."""
        return QuantizedWeight(scheme=Scheme.parse(spec["scheme"]), group_size=int(spec["group_size"]),
                               out_features=int(spec["out_features"]), in_features=int(spec["in_features"]),
                               **{p: t for p, t in tensors.items() if p != "bias"})


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return model.get_submodule(module_name), attr


def _check_layer(name: str, spec: dict, old: nn.Module, where) -> None:
    if spec.get("module") == "embedding":
        if not isinstance(old, (nn.Embedding, QuantEmbedding)):
            raise CheckpointError(f"{where}: {name!r} is a {type(old).__name__} in the model, not an embedding")
        shape = (old.num_embeddings, old.embedding_dim)
        if shape != (spec.get("out_features"), spec.get("in_features")):
            raise CheckpointError(f"{where}: embedding {name!r} is {shape[0]}x{shape[1]} in the model but "
                                  f"{spec.get('out_features')}x{spec.get('in_features')} in the checkpoint")
        return
    if not isinstance(old, (nn.Linear, QuantLinear)):
        raise CheckpointError(f"{where}: {name!r} is a {type(old).__name__} in the model, not a Linear layer")
    shape = (old.out_features, old.in_features)
    if shape != (spec.get("out_features"), spec.get("in_features")):
        raise CheckpointError(f"{where}: layer {name!r} is {shape[0]}x{shape[1]} in the model but "
                              f"{spec.get('out_features')}x{spec.get('in_features')} in the checkpoint")


def load(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
    reader: Reader | None = None,
) -> nn.Module:
    """Load a lowbit checkpoint (a file, or a directory with one file or shards) into
    ``model`` — a float skeleton, one built without weights (``empty_weights()``), or a
    quantized model of the same structure — on ``device`` (default: where the model's
    tensors are; the CPU for a model on meta). ``reader``: how the files hold quantized
    layers (default lowbit's own format; ``lowbit.interop`` reads GPTQ, AWQ and
    compressed-tensors).

    Raises ``CheckpointError`` naming the problem, with the model untouched, when a file is
    truncated, corrupt, of another format version, or does not fit the model."""
    reader = reader or Reader()
    files = checkpoint_files(path)
    header = reader.header(files)
    state = _plain_state(model)
    if device is None:
        real = [t for t in state.values() if t.device.type != "meta"]
        device = real[0].device if real else torch.device("cpu")
    device = torch.device(device)
    where = os.fspath(path)

    # 1. Check every header against the model before reading any data.
    layer_parts: dict[str, dict[str, str]] = {}
    for name, spec in header.layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{where}: layer {name!r} does not exist in the model") from e
        _check_layer(name, spec, old, where)
        try:
            layer_parts[name] = reader.parts(name, spec, header)
        except ValueError as e:
            raise CheckpointError(f"{where}: layer {name!r}: {e}") from e
    layer_keys = {f"{name}.{part}" for name in header.layers for part in (*CANONICAL, "bias", "weight")}
    layer_keys |= {k for parts in layer_parts.values() for k in parts.values()}
    expected = {k: v for k, v in state.items() if k not in layer_keys}
    # A tensor tied under several names may be stored under one of them (transformers and the
    # interop formats write tied embeddings once): the others alias it.
    names_of: dict[int, list[str]] = {}
    for key, value in expected.items():
        names_of.setdefault(id(value), []).append(key)
    for key, value in expected.items():
        if header.resolve(key) is None:
            present = [header.resolve(k) for k in names_of[id(value)] if header.resolve(k) is not None]
            if present:
                header.aliases[key] = present[0]
    stored = {k for k in (*header.shapes, *header.aliases) if k not in layer_keys}
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: does not fit the model: missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]}")
    for key, value in expected.items():
        shape = header.shapes[header.resolve(key)][0]
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{where}: {key!r} is {tuple(value.shape)} in the model but {shape} in the "
                                  "checkpoint")

    # 2. Read the data, file by file, building each layer as soon as its tensors are in.
    wanted_by: dict[str, list[str]] = {}  # stored key -> the layers that read it
    for name, parts in layer_parts.items():
        for key in set(parts.values()):
            wanted_by.setdefault(key, []).append(name)
    plain_keys = {header.resolve(k) for k in expected}
    tensors: dict[str, torch.Tensor] = {}  # stored key -> tensor (CPU, checked there), until used
    stores: dict[tuple, WeightStore] = {}  # the stored weight keys -> store (layers sharing a weight)
    built: dict[str, QuantLinear] = {}
    module_of: dict[int, QuantLinear] = {}  # old module id -> new module (shared modules stay shared)

    def build(name: str) -> None:
        parts, spec = layer_parts[name], header.layers[name]
        old = model.get_submodule(name)
        if id(old) in module_of:
            built[name] = module_of[id(old)]
            return
        if spec.get("module") == "embedding":
            try:
                weight = reader.weight(name, spec, {p: tensors[k] for p, k in parts.items()})
                weight.validate()
                dtype = getattr(torch, str(spec.get("dtype", "float32")))
                built[name] = module_of[id(old)] = QuantEmbedding(weight.to(device), spec.get("padding_idx"), dtype,
                                                                  name)
            except (TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{where}: embedding {name!r}: {e}") from e
            return
        weight_keys = tuple(sorted(k for p, k in parts.items() if p != "bias"))
        store = stores.get(weight_keys)
        if store is None:
            try:
                weight = reader.weight(name, spec, {p: tensors[k] for p, k in parts.items()})
                weight.validate()
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{where}: layer {name!r}: {e}") from e
            store = stores[weight_keys] = WeightStore.build(weight.to(device), backend)
        bias = tensors[parts["bias"]].to(device) if "bias" in parts else None
        built[name] = module_of[id(old)] = module_for(store.packed.scheme)(store, bias, backend, name)

    for file in files:
        digest = _Digest() if reader.digests else None
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            keys, metadata = sorted(f.keys()), f.metadata()
        for key in keys:
            t = read_tensor(file, key)
            if digest is not None:
                digest.update(key, t)
            if key in wanted_by or key in plain_keys:
                tensors[key] = t
            del t
            for name in wanted_by.get(key, []):
                if name not in built and all(k in tensors for k in layer_parts[name].values()):
                    build(name)
            # A layer's stored tensors are dropped once every layer that reads them is built.
            for done in [k for k in tensors if k in wanted_by and k not in plain_keys
                         and all(n in built for n in wanted_by[k])]:
                del tensors[done]
        if digest is not None and metadata.get("sha256") != digest.hexdigest():
            raise CheckpointError(f"{file}: tensor data does not match its sha256 digest (corrupt file)")

    # 3. Apply: nothing below can fail on a checked plan.
    for name, module in built.items():
        parent, attr = _owner(model, name)
        setattr(parent, attr, module)
    replaced: dict[int, torch.Tensor] = {}  # old tensor id -> its replacement (ties stay tied)
    with torch.no_grad():
        for key, old in expected.items():
            new = tensors[header.resolve(key)]
            if old.device.type != "meta":
                old.copy_(new)
                continue
            if id(old) not in replaced:
                new = new.to(device)
                replaced[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) \
                    if isinstance(old, nn.Parameter) else new
            owner, attr = _owner(model, key)
            if attr in owner._parameters:
                owner._parameters[attr] = replaced[id(old)]
            else:
                owner._buffers[attr] = replaced[id(old)]
    return model


# --- models built without weights ------------------------------------------------------------------


# Modules whose parameters ``empty_weights`` creates on meta from the start (they take a
# ``device`` argument): the large ones, so that not even an uninitialized float weight is
# allocated for a layer that will be quantized.
_META_CONSTRUCTED = (nn.Linear, nn.Embedding)


@contextlib.contextmanager
def empty_weights():
    """Build modules with their parameters on the ``meta`` device; buffers stay real, since
    models compute some (rotary frequencies, position ids) in their constructors and do not
    store them. ``lowbit.load`` then fills the parameters, so the quantized layers never
    exist in float. ``nn.Linear`` and ``nn.Embedding`` create their weights on meta
    directly; any other parameter is moved to meta as its module registers it."""
    register = nn.Module.register_parameter
    constructors = {cls: cls.__init__ for cls in _META_CONSTRUCTED}

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def on_meta(init):
        def wrapped(self, *args, device=None, **kwargs):
            init(self, *args, device="meta" if device is None else device, **kwargs)
        return wrapped

    nn.Module.register_parameter = to_meta
    for cls, init in constructors.items():
        cls.__init__ = on_meta(init)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for cls, init in constructors.items():
            cls.__init__ = init


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
