"""compressed-tensors checkpoints (llm-compressor; read by vLLM, SGLang and transformers;
docs/interop.md, "compressed-tensors").

* ``pack-quantized`` (W4A16, W8A16): ``weight_packed`` int32 [N, ceil(K·bits/32)] holding
  the signed code plus ``2**(bits-1)`` — for 4 bits exactly lowbit's unsigned code —,
  ``weight_scale`` [N, groups] in the model's dtype, ``weight_zero_point`` (asymmetric
  only) int32 [ceil(N·bits/32), groups] packed along N with the same offset (so lowbit's
  zero point), ``weight_shape`` [N, K].
* ``int-quantized`` (W8A8): ``weight`` int8 [N, K], ``weight_scale`` [N, 1], and for static
  per-tensor activations ``input_scale`` [1]; dynamic per-token activations store nothing.

The ``quantization_config`` names config groups (a scheme and the layers it targets: a
class name such as ``Linear``, a layer name, or ``re:`` a regex) and the ``ignore`` list.
lowbit's int8 range is symmetric [-127, 127]: a stored -128 is refused. compressed-tensors
quantizes activations per token with the range [-128, 127]; lowbit's W8A8 uses [-127, 127]
(docs/interop.md): the weights are exact, the activation rounding is lowbit's.
"""

from __future__ import annotations

import re

import torch

from lowbit import reference
from lowbit.formats import QuantizedWeight, Scheme
from lowbit.interop import packing
from lowbit.interop.base import Format, Layer, Reader, stored_scales
from lowbit.interop.gptq import _scheme_for

PACKED, INT = "pack-quantized", "int-quantized"
_WEIGHT_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
                "observer", "observer_kwargs", "scale_dtype", "zp_dtype"}


def _format_of(scheme: Scheme) -> str:
    return INT if not scheme.weight_only else PACKED


def _group_config(scheme: Scheme, targets: list[str]) -> dict:
    bits = 4 if scheme.is_int4 else 8
    per_row = not scheme.is_int4 or scheme.group_size is None
    weights = {"num_bits": bits, "type": "int", "symmetric": scheme.symmetric or not scheme.is_int4,
               "strategy": "channel" if per_row else "group", "group_size": None if per_row else scheme.group_size,
               "dynamic": False, "actorder": None}
    activations = None
    if scheme.kind == "w8a8":
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    elif scheme.static_activations:
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    return {"targets": targets, "weights": weights, "input_activations": activations, "output_activations": None,
            "format": _format_of(scheme)}


class CompressedTensors(Format):
    name = "compressed-tensors"
    scale_dtype = None  # the model's dtype, as llm-compressor writes them

    def refusal(self, layer: Layer) -> str | None:
        if layer.has_input_perm:
            return ("compressed-tensors keeps no act-order g_idx for packed weights: a layer whose groups are not "
                    "consecutive in k goes to gptq")
        if layer.has_input_scale:
            return "its input scale (not folded into a previous layer) has no place in compressed-tensors"
        return None

    def encode(self, weight: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k = weight.out_features, weight.in_features
        scheme = weight.scheme
        scales = stored_scales(weight.scales.reshape(n, -1).contiguous(), scale_dtype)
        if not scheme.weight_only:
            out = {"weight": weight.qweight, "weight_scale": scales}
            if weight.act_scale is not None:  # float32, as vLLM holds per-tensor activation scales
                out["input_scale"] = weight.act_scale.reshape(1).float()
            return out
        if scheme.is_int4:
            out = {"weight_packed": packing.pack_rows(reference.unpack_int4(weight.qweight), 4)}
            if weight.zeros is not None:
                out["weight_zero_point"] = packing.pack_cols(weight.zeros, 4)
        else:
            out = {"weight_packed": packing.pack_rows((weight.qweight.to(torch.int16) + 128).to(torch.uint8), 8)}
        out["weight_scale"] = scales
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        return out

    def quantization_config(self, layers: list[Layer], ignored: list[str], scale_dtype: torch.dtype) -> dict:
        by_scheme: dict[str, list[Layer]] = {}
        for layer in layers:
            by_scheme.setdefault(str(layer.scheme), []).append(layer)
        groups = {}
        for i, (_, members) in enumerate(sorted(by_scheme.items())):
            # One scheme: every Linear but the ignored ones; several: each group names its layers.
            targets = ["Linear"] if len(by_scheme) == 1 else [m.name for m in members]
            groups[f"group_{i}"] = _group_config(members[0].scheme, targets)
        formats = {g["format"] for g in groups.values()}
        return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else
                "mixed-precision", "quantization_status": "compressed", "config_groups": groups,
                "ignore": ignored, "kv_cache_scheme": None}


# --- import ------------------------------------------------------------------------------------------


def _matches(name: str, module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def _parse_group(key: str, group: dict, default_format: str | None) -> dict:
    where = f"quantization_config.config_groups.{key}"
    weights = group.get("weights")
    if not weights:
        raise ValueError(f"{where}.weights is missing: lowbit reads weight quantization")
    unknown = set(weights) - _WEIGHT_ARGS
    if unknown:
        raise ValueError(f"{where}.weights has fields lowbit does not know: {sorted(unknown)}")
    if weights.get("type", "int") != "int":
        raise ValueError(f"{where}.weights.type = {weights.get('type')!r}: lowbit reads integer weights")
    bits = weights.get("num_bits", 8)
    if bits not in (4, 8):
        raise ValueError(f"{where}.weights.num_bits = {bits}: lowbit reads 4- and 8-bit weights")
    strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")
    if strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"{where}.weights.strategy = {strategy!r}: lowbit reads group, channel and tensor")
    if weights.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic = true: lowbit reads stored weight scales")
    if weights.get("actorder") == "group":
        raise ValueError(f"{where}.weights.actorder = 'group' (a weight_g_idx per layer): lowbit reads it from "
                         "gptq checkpoints, not from compressed-tensors")
    symmetric = bool(weights.get("symmetric", True))
    if bits == 8 and not symmetric:
        raise ValueError(f"{where}.weights: asymmetric 8-bit weights; lowbit's int8 weights are symmetric")
    if group.get("output_activations"):
        raise ValueError(f"{where}.output_activations: lowbit does not quantize outputs")
    acts = group.get("input_activations")
    activations = None
    if acts:
        kind = (acts.get("type", "int"), acts.get("num_bits", 8), bool(acts.get("symmetric", True)),
                acts.get("strategy"), bool(acts.get("dynamic")))
        if kind == ("int", 8, True, "token", True):
            activations = "token"
        elif kind[:3] == ("int", 8, True) and kind[3] == "tensor" and not kind[4]:
            activations = "tensor"
        else:
            raise ValueError(f"{where}.input_activations = {acts}: lowbit reads int8 symmetric activations, per "
                             "token and dynamic or per tensor and static")
        if bits != 8:
            raise ValueError(f"{where}: {bits}-bit weights with int8 activations: lowbit's W8A8 has 8-bit weights")
    fmt = group.get("format") or default_format
    if fmt not in (PACKED, INT):
        raise ValueError(f"{where}.format = {fmt!r}: lowbit reads {PACKED} and {INT}")
    if activations and fmt != INT:
        raise ValueError(f"{where}: int8 activations with format {fmt!r}; expected {INT}")
    return {"targets": list(group.get("targets") or []), "bits": bits, "strategy": strategy, "symmetric": symmetric,
            "group_size": weights.get("group_size"), "activations": activations, "format": fmt}


def parse_config(config: dict) -> dict:
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"quantization_config.quantization_status = {status!r}: lowbit reads compressed checkpoints")
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme", "moe_sparsity_config"):
        if config.get(field):
            raise ValueError(f"quantization_config.{field} is set: lowbit reads weight (and activation) "
                             "quantization only")
    fmt = config.get("format")
    default = None if fmt in (None, "mixed-precision") else fmt
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config.config_groups is empty")
    parsed = {key: _parse_group(key, group, default) for key, group in groups.items()}
    return {"groups": parsed, "ignore": list(config.get("ignore") or [])}


class CompressedTensorsReader(Reader):
    name = "compressed-tensors"
    marker = "weight_scale"

    def __init__(self, config, directory, model=None):
        super().__init__(config, directory, model)
        self.settings = parse_config(config)

    def _group(self, name: str) -> dict:
        try:
            module = self.model.get_submodule(name)
        except AttributeError as e:
            raise ValueError("does not exist in the model") from e
        if any(_matches(name, module, t) for t in self.settings["ignore"]):
            raise ValueError("holds quantized tensors but the config's ignore list names it")
        for group in self.settings["groups"].values():
            if any(_matches(name, module, t) for t in group["targets"]):
                return group
        raise ValueError("holds quantized tensors but no config group targets it")

    def spec(self, name, shape, dtype, shapes):
        group = self._group(name)
        module = self.model.get_submodule(name)
        n, k = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if group["format"] == INT:
            weight = shapes.get(f"{name}.weight")
            if weight is None or weight[1] != "I8" or len(weight[0]) != 2:
                raise ValueError(f"int-quantized needs an int8 weight, found {weight}")
            n, k = weight[0]
        return {**group, "out_features": n, "in_features": k}

    def parts(self, name, spec, header):
        if spec["format"] == INT:
            optional = ["input_scale", "weight_zero_point", "input_zero_point", "bias"]
            parts = self.take(name, header, ["weight", "weight_scale"], optional)
            if spec["activations"] == "tensor" and "input_scale" not in parts:
                raise ValueError("input_scale missing for static per-tensor activations")
            return parts
        required = ["weight_packed", "weight_scale", "weight_shape"]
        required += [] if spec["symmetric"] else ["weight_zero_point"]
        return self.take(name, header, required, ["bias"])

    def weight(self, name, spec, tensors):
        n, k = spec["out_features"], spec["in_features"]
        scales = tensors["weight_scale"].float()
        if scales.numel() == 1:  # per-tensor: the same scale for every row
            scales = scales.reshape(1, 1).expand(n, 1)
        if scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]:
            raise ValueError(f"weight_scale must be [{n}, groups], got {list(tensors['weight_scale'].shape)}")
        groups = scales.shape[1]
        scales = scales.contiguous()
        if spec["format"] == INT:
            return self._int(tensors, spec, scales, groups, n, k)
        shape = tensors["weight_shape"]
        if [int(v) for v in shape.reshape(-1)] != [n, k]:
            raise ValueError(f"weight_shape is {shape.tolist()} but the layer is {n}x{k}")
        codes = packing.unpack_rows(tensors["weight_packed"], spec["bits"], k)
        if spec["bits"] == 8:
            return self._int8_weight_only(codes, scales, groups, n, k)
        g = k // groups
        scheme = _scheme_for(4, g, k, spec["symmetric"], per_row=spec["strategy"] != "group")
        zeros = None
        if not spec["symmetric"]:
            zeros = packing.unpack_cols(tensors["weight_zero_point"], 4, n)
            if tuple(zeros.shape) != (n, groups):
                raise ValueError(f"weight_zero_point holds {list(zeros.shape)} zero points, expected [{n}, {groups}]")
        return QuantizedWeight(scheme=scheme, qweight=reference.pack_int4(codes), scales=scales, zeros=zeros,
                               group_size=g, out_features=n, in_features=k)

    @staticmethod
    def _int8_weight_only(codes, scales, groups, n, k):
        if groups != 1:
            raise ValueError(f"8-bit weights in groups of {k // groups}: lowbit's int8 weights hold one scale per "
                             "output channel")
        if bool((codes == 0).any()):
            raise ValueError("weight_packed: value -128, outside lowbit's symmetric int8 range [-127, 127]")
        q = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return QuantizedWeight(scheme=Scheme("w8a16"), qweight=q, scales=scales.reshape(n).contiguous(),
                               group_size=k, out_features=n, in_features=k)

    @staticmethod
    def _int(tensors, spec, scales, groups, n, k):
        q = tensors["weight"]
        if groups != 1:
            raise ValueError("int-quantized weights in groups: lowbit's int8 weights hold one scale per output channel")
        if bool((q == -128).any()):
            raise ValueError("weight: value -128, outside lowbit's symmetric int8 range [-127, 127]")
        for zp in ("weight_zero_point", "input_zero_point"):
            if zp in tensors and bool((tensors[zp] != 0).any()):
                raise ValueError(f"{zp}: nonzero zero points (asymmetric int8); lowbit's int8 is symmetric")
        kind = {"token": "w8a8", "tensor": "w8a8-static", None: "w8a16"}[spec["activations"]]
        act_scale = tensors["input_scale"].float().reshape(1).contiguous() if kind == "w8a8-static" else None
        return QuantizedWeight(scheme=Scheme(kind), qweight=q.contiguous(), scales=scales.reshape(n).contiguous(),
                               group_size=k, out_features=n, in_features=k, act_scale=act_scale)
