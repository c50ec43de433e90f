"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers / vLLM): 4- and 8-bit, with and
without act-order, both zero-point conventions (docs/interop.md, "GPTQ").

Per layer: ``qweight`` int32 [K·bits/32, N] (codes packed down K, first k in the lowest
bits), ``qzeros`` int32 [groups, N·bits/32] (packed along N), ``scales`` float16
[groups, N], ``g_idx`` int32 [K] (the group of each input channel). ``W = (u - z) · s``.
Checkpoint format "gptq" (v1) stores ``z - 1`` and readers add the 1 back, so a zero point
of 0 cannot be stored; "gptq_v2" stores ``z``.

Act-order (``desc_act``) checkpoints keep ``qweight`` in the original channel order and
give each channel the group of its position in the permuted order: ``g_idx`` is not
monotonic. lowbit holds such a layer with consecutive groups by permuting its channels once
at load (stable sort by group) and reading the input's channels in that order at run time
(``QuantizedWeight.input_perm``); exported, the permutation becomes ``g_idx`` again.

lowbit's int8 weights are GPTQ 8-bit per channel with zero point 128 and no code 0.
"""

from __future__ import annotations

import re

import torch

from lowbit import checks, reference
from lowbit.formats import QuantizedWeight, Scheme
from lowbit.interop import packing
from lowbit.interop.base import Format, Layer, Reader, stored_scales, uniform

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _bits(scheme: Scheme) -> int:
    return 4 if scheme.is_int4 else 8


def _scheme_for(bits: int, group: int, k: int, symmetric: bool, per_row: bool = False) -> Scheme:
    """The lowbit scheme of stored groups of ``group`` channels; ``per_row``: the format says
    one group per row (GPTQ's group_size -1, compressed-tensors' channel strategy)."""
    if bits == 8:
        return Scheme("w8a16")
    if per_row or (group == k and group not in checks.GROUP_SIZES):
        return Scheme("w4a16", None, symmetric)
    if group not in checks.GROUP_SIZES:
        raise ValueError(f"group_size {group}: lowbit's int4 kernels take groups of {checks.GROUP_SIZES} or one "
                         "group per row")
    return Scheme("w4a16", group, symmetric)


class GPTQ(Format):
    name = "gptq"
    scale_dtype = torch.float16

    def __init__(self, checkpoint_format: str = "gptq"):
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
        self.v1 = checkpoint_format == "gptq"
        self.checkpoint_format = checkpoint_format

    def refusal(self, layer: Layer) -> str | None:
        if not layer.scheme.weight_only:
            return f"gptq holds weight-only schemes, not {layer.scheme} (export W8A8 as compressed-tensors)"
        if layer.has_input_scale:
            return "its input scale (SmoothQuant / AWQ, not folded into a previous layer) has no place in gptq"
        per = 32 // _bits(layer.scheme)
        if layer.in_features % per or layer.out_features % per:
            return (f"gptq packs {per} codes per int32 along both dimensions: {layer.out_features}x"
                    f"{layer.in_features} is not a multiple of {per}")
        return None

    def encode(self, weight: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        n, k, g = weight.out_features, weight.in_features, weight.group_size
        bits = _bits(weight.scheme)
        if weight.scheme.is_int4:
            codes = reference.unpack_int4(weight.qweight)
            zeros = weight.zeros if weight.zeros is not None else torch.full_like(weight.scales, 8, dtype=torch.uint8)
        else:
            codes = (weight.qweight.to(torch.int16) + 128).to(torch.uint8)
            zeros = torch.full((n, 1), 128, dtype=torch.uint8, device=codes.device)
        groups = torch.arange(k, device=codes.device, dtype=torch.int32) // g
        if weight.input_perm is not None:  # back to the input's channel order; g_idx says the groups
            original = torch.empty_like(codes)
            original[:, weight.input_perm] = codes
            g_idx = torch.empty_like(groups)
            g_idx[weight.input_perm] = groups
            codes, groups = original, g_idx
        if self.v1:
            if bool((zeros == 0).any()):
                raise ValueError(f"{int((zeros == 0).sum())} group(s) have zero point 0, which checkpoint_format "
                                 "'gptq' (v1, stores zero - 1) cannot hold; use checkpoint_format='gptq_v2' or a "
                                 "symmetric scheme")
            zeros = zeros - 1
        return {"qweight": packing.pack_cols(codes.t(), bits),
                "qzeros": packing.pack_rows(zeros.t(), bits),
                "scales": stored_scales(weight.scales.reshape(n, -1).t().contiguous(), scale_dtype),
                "g_idx": groups}

    def quantization_config(self, layers: list[Layer], ignored: list[str], scale_dtype: torch.dtype) -> dict:
        scheme = uniform(layers, "gptq")
        group = -1 if scheme.group_size is None or not scheme.is_int4 else scheme.group_size
        config = {"quant_method": "gptq", "bits": _bits(scheme), "group_size": group,
                  "desc_act": any(layer.has_input_perm for layer in layers),
                  "sym": scheme.symmetric or not scheme.is_int4, "checkpoint_format": self.checkpoint_format,
                  "pack_dtype": "int32", "static_groups": False, "true_sequential": True, "lm_head": False}
        # Linear layers kept float: GPTQModel's / vLLM's per-module overrides, "-:" = not quantized.
        skipped = [name for name in ignored if name != "lm_head"]
        if skipped:
            config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
        return config

    def engine_notes(self, layers: list[Layer]) -> list[str]:
        notes = super().engine_notes(layers)
        if any(layer.scheme.is_int4 and not layer.scheme.symmetric for layer in layers):
            notes.append("vLLM's Marlin GPTQ kernel takes symmetric weights only: asymmetric GPTQ falls back to a "
                         "slower kernel on GPUs and is refused by vLLM's CPU build; export asymmetric W4A16 as "
                         "compressed-tensors or awq")
        odd = [layer.name for layer in layers if layer.out_features % 64 or layer.in_features % 128]
        if odd:
            notes.append(f"vLLM's Marlin kernel wants N % 64 == 0 and K % 128 == 0 per tensor-parallel shard; "
                         f"{len(odd)} layer(s) miss it, e.g. {odd[0]}")
        return notes


def parse_config(config: dict) -> dict:
    """The settings of a GPTQ ``quantization_config`` lowbit can serve; ``ValueError`` naming
    the field otherwise."""
    bits = config.get("bits")
    if bits not in (4, 8):
        raise ValueError(f"quantization_config.bits = {bits!r}: lowbit reads 4- and 8-bit GPTQ")
    fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"quantization_config.checkpoint_format = {fmt!r}: lowbit reads {CHECKPOINT_FORMATS}")
    if config.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"quantization_config.pack_dtype = {config['pack_dtype']!r}: lowbit reads int32 packing")
    dynamic = config.get("dynamic") or {}
    overrides = [pattern for pattern, value in dynamic.items() if not pattern.startswith("-:") or value]
    if overrides:
        raise ValueError(f"quantization_config.dynamic overrides settings per module ({overrides[:2]}); lowbit "
                         "reads one setting for every quantized layer")
    group = config.get("group_size", -1)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise ValueError(f"quantization_config.group_size = {group!r}")
    return {"bits": bits, "group_size": group, "sym": bool(config.get("sym", True)), "v1": fmt == "gptq"}


class GPTQReader(Reader):
    name = "gptq"
    marker = "qweight"

    def __init__(self, config, directory, model=None):
        super().__init__(config, directory, model)
        self.settings = parse_config(config)

    def spec(self, name, shape, dtype, shapes):
        if dtype != "I32" or len(shape) != 2:
            raise ValueError(f"qweight must be int32 [K*bits/32, N], got {dtype}{list(shape)}")
        bits = self.settings["bits"]
        return {**self.settings, "in_features": shape[0] * 32 // bits, "out_features": shape[1]}

    def parts(self, name, spec, header):
        return self.take(name, header, ["qweight", "qzeros", "scales"], ["g_idx", "bias"])

    def weight(self, name, spec, tensors):
        bits, n, k = spec["bits"], spec["out_features"], spec["in_features"]
        scales = tensors["scales"]
        if scales.dim() != 2 or scales.shape[1] != n or not scales.is_floating_point():
            raise ValueError(f"scales must be float [groups, {n}], got {scales.dtype}{list(scales.shape)}")
        groups = scales.shape[0]
        if k % groups:
            raise ValueError(f"scales has {groups} groups, which do not divide K = {k}")
        g = k // groups
        if spec["group_size"] not in (-1, g) or (spec["group_size"] == -1 and groups != 1):
            raise ValueError(f"quantization_config.group_size = {spec['group_size']} but scales holds groups of {g}")
        codes = packing.unpack_cols(tensors["qweight"], bits, k).t()
        zeros = packing.unpack_rows(tensors["qzeros"], bits, n).t().to(torch.int16)
        if tuple(zeros.shape) != (n, groups):
            raise ValueError(f"qzeros holds {list(zeros.shape)} zero points, expected [{n}, {groups}]")
        zeros = zeros + 1 if spec["v1"] else zeros
        perm = self._perm(tensors.get("g_idx"), k, g, groups)
        if perm is not None:
            codes = codes[:, perm]
        scales = scales.float().t().contiguous()
        if bits == 8:
            return self._int8(codes, scales, zeros, groups, perm, n, k)
        scheme = _scheme_for(4, g, k, spec["sym"], per_row=spec["group_size"] == -1)
        if scheme.symmetric and bool((zeros != 8).any()):
            raise ValueError("qzeros: the config says sym = true but zero points other than 8 are stored")
        if bool((zeros > 15).any()):
            raise ValueError(f"qzeros: {int((zeros > 15).sum())} zero point(s) read as 16 (a zero point of 0 written "
                             "in checkpoint_format 'gptq', which stores zero - 1): 4-bit codes cannot hold it")
        return QuantizedWeight(scheme=scheme, qweight=reference.pack_int4(codes.contiguous()), scales=scales,
                               zeros=None if scheme.symmetric else zeros.to(torch.uint8).contiguous(), group_size=g,
                               out_features=n, in_features=k, input_perm=perm)

    @staticmethod
    def _perm(g_idx, k, g, groups):
        """None when ``g_idx`` is absent or the plain ``k // g``; else the channel order that
        makes every group consecutive (``ValueError`` unless each group has g channels)."""
        if g_idx is None:
            return None
        if g_idx.shape != (k,) or g_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"g_idx must be int32 [{k}], got {g_idx.dtype}{list(g_idx.shape)}")
        g_idx = g_idx.long()
        if torch.equal(g_idx, torch.arange(k) // g):
            return None
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups or \
                not bool((torch.bincount(g_idx, minlength=groups) == g).all()):
            raise ValueError(f"g_idx does not give each of the {groups} groups {g} channels")
        return torch.argsort(g_idx, stable=True)

    @staticmethod
    def _int8(codes, scales, zeros, groups, perm, n, k):
        if groups != 1:
            raise ValueError(f"8-bit GPTQ with groups of {k // groups}: lowbit's int8 weights hold one scale per "
                             "output channel (group_size = -1)")
        if bool((zeros != 128).any()):
            raise ValueError("qzeros: 8-bit zero points other than 128 (asymmetric int8): lowbit's int8 weights are "
                             "symmetric")
        if bool((codes == 0).any()):
            raise ValueError("qweight: code 0 (int8 value -128), outside lowbit's symmetric range [-127, 127]")
        q = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return QuantizedWeight(scheme=Scheme("w8a16"), qweight=q, scales=scales.reshape(n).contiguous(), group_size=k,
                               out_features=n, in_features=k)
