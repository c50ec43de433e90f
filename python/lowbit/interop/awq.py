"""AWQ checkpoints, GEMM version (AutoAWQ, llm-compressor, vLLM; docs/interop.md, "AWQ").

Per layer: ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8], ``scales`` float16
[K/G, N], no g_idx. Each word holds eight 4-bit codes of consecutive output columns in
AWQ's interleaved order (``packing.AWQ_ORDER``); zero points are stored as they are, so
``W = (u - z) · s`` is lowbit's asymmetric int4 exactly. A symmetric lowbit layer is
written with zero points 8; a layer read back whose zero points are all 8 is symmetric.
"""

from __future__ import annotations

import torch

from lowbit import reference
from lowbit.formats import QuantizedWeight, Scheme
from lowbit.interop import packing
from lowbit.interop.base import Format, Layer, Reader, stored_scales, uniform
from lowbit.interop.gptq import _scheme_for


class AWQ(Format):
    name = "awq"
    scale_dtype = torch.float16

    def refusal(self, layer: Layer) -> str | None:
        if not layer.scheme.is_int4:
            return f"awq holds 4-bit weights only, not {layer.scheme}"
        if layer.has_input_perm:
            return "awq has no g_idx for a layer whose groups are not consecutive in k (export it as gptq)"
        if layer.has_input_scale:
            return "its input scale (not folded into a previous layer) has no place in awq"
        if layer.out_features % 8:
            return f"awq packs eight output columns per int32: out_features = {layer.out_features}"
        return None

    def encode(self, weight: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        codes = reference.unpack_int4(weight.qweight)
        zeros = weight.zeros if weight.zeros is not None else torch.full_like(weight.scales, 8, dtype=torch.uint8)
        return {"qweight": packing.pack_rows(packing.awq_interleave(codes.t().contiguous()), 4),
                "qzeros": packing.pack_rows(packing.awq_interleave(zeros.t().contiguous()), 4),
                "scales": stored_scales(weight.scales.t().contiguous(), scale_dtype)}

    def quantization_config(self, layers: list[Layer], ignored: list[str], scale_dtype: torch.dtype) -> dict:
        scheme = uniform(layers, "awq")
        groups = {layer.in_features if scheme.group_size is None else scheme.group_size for layer in layers}
        if len(groups) != 1:
            raise ValueError(f"awq's config holds one group size; one group per row gives {sorted(groups)} here")
        return {"quant_method": "awq", "bits": 4, "group_size": groups.pop(), "zero_point": True, "version": "gemm",
                "modules_to_not_convert": ignored}

    def engine_notes(self, layers: list[Layer]) -> list[str]:
        notes = []
        if any(layer.scheme.symmetric for layer in layers):
            notes.append("awq stores symmetric weights with zero points 8: engines run them on the asymmetric "
                         "path; gptq or compressed-tensors serve symmetric W4A16 on vLLM's Marlin kernel")
        if any(layer.scheme.group_size is None for layer in layers):
            notes.append("awq with one group per row: vLLM's AWQ Marlin path wants groups of 32, 64 or 128")
        return notes


def parse_config(config: dict) -> dict:
    bits = config.get("bits", config.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"quantization_config.bits = {bits!r}: AWQ GEMM checkpoints are 4-bit")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version = {config.get('version')!r}: lowbit reads AWQ's GEMM layout")
    if not config.get("zero_point", True):
        raise ValueError("quantization_config.zero_point = false: lowbit reads AWQ GEMM with zero points")
    group = config.get("group_size", config.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"quantization_config.group_size = {group!r}")
    return {"group_size": group}


class AWQReader(Reader):
    name = "awq"
    marker = "qweight"

    def __init__(self, config, directory, model=None):
        super().__init__(config, directory, model)
        self.settings = parse_config(config)

    def spec(self, name, shape, dtype, shapes):
        if dtype != "I32" or len(shape) != 2:
            raise ValueError(f"qweight must be int32 [K, N/8], got {dtype}{list(shape)}")
        return {**self.settings, "in_features": shape[0], "out_features": shape[1] * 8}

    def parts(self, name, spec, header):
        return self.take(name, header, ["qweight", "qzeros", "scales"], ["bias"])

    def weight(self, name, spec, tensors):
        n, k = spec["out_features"], spec["in_features"]
        scales = tensors["scales"]
        if scales.dim() != 2 or scales.shape[1] != n or not scales.is_floating_point() or k % scales.shape[0]:
            raise ValueError(f"scales must be float [K/G, {n}], got {scales.dtype}{list(scales.shape)}")
        groups = scales.shape[0]
        g = k // groups
        if g != spec["group_size"]:
            raise ValueError(f"quantization_config.group_size = {spec['group_size']} but scales holds groups of {g}")
        codes = packing.awq_deinterleave(packing.unpack_rows(tensors["qweight"], 4, n)).t()
        zeros = packing.awq_deinterleave(packing.unpack_rows(tensors["qzeros"], 4, n)).t()
        if tuple(zeros.shape) != (n, groups):
            raise ValueError(f"qzeros holds {list(zeros.shape)} zero points, expected [{n}, {groups}]")
        symmetric = bool((zeros == 8).all())
        scheme: Scheme = _scheme_for(4, g, k, symmetric)
        return QuantizedWeight(scheme=scheme, qweight=reference.pack_int4(codes.contiguous()),
                               scales=scales.float().t().contiguous(), zeros=None if symmetric else zeros.contiguous(),
                               group_size=g, out_features=n, in_features=k)
