"""The canonical quantization schemes and weight formats (docs/design.md, "Canonical formats").

``quantize_weight(w, scheme)`` turns a float weight ``w[N, K]`` into the canonical
tensors that checkpoints hold and that every backend prepacks from:

===========  ============================================================================
scheme       canonical tensors
===========  ============================================================================
w8a8         int8[N, K] per-output-channel symmetric, scales float32[N]; activations
             quantized per token at run time
w8a8-static  as w8a8, plus a calibrated per-tensor activation scale (static W8A8)
w8a16        as w8a8; activations stay float
w4a16        uint8[N, K/2] (even k low nibble), scales float32[N, K/G], zero points
             uint8[N, K/G] (asymmetric) or none (symmetric, zero point 8)
===========  ============================================================================

All arithmetic is fp32 whatever the weight's dtype; ``round`` is round-half-to-even; a
zero scale becomes 1; NaN or Inf in a weight raises an error naming the layer.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from lowbit import checks, reference

KINDS = ("w8a8", "w8a8-static", "w8a16", "w4a16")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a layer is quantized to.

    ``group_size`` applies to w4a16 only: 32, 64, 128, or None for one group per row
    (G = K). ``symmetric`` selects the zero-point-free int4 variant.
    """

    kind: str
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown scheme kind {self.kind!r}; expected one of {KINDS}")
        if self.is_int4:
            if self.group_size is not None and self.group_size not in checks.GROUP_SIZES:
                raise ValueError(
                    f"w4a16 group_size must be one of {checks.GROUP_SIZES} or None (= K), "
                    f"got {self.group_size}"
                )
        elif self.group_size is not None or self.symmetric:
            raise ValueError(f"{self.kind} is per-channel symmetric: no group_size or symmetric flag")

    @property
    def is_int4(self) -> bool:
        """Group-wise int4 weights (w4a16); the others hold int8 per output channel."""
        return self.kind == "w4a16"

    @property
    def weight_only(self) -> bool:
        """Float activations (w8a16, w4a16); the w8a8 kinds quantize them to int8."""
        return self.kind in ("w8a16", "w4a16")

    @property
    def static_activations(self) -> bool:
        """A calibrated per-tensor activation scale (w8a8-static)."""
        return self.kind == "w8a8-static"

    @property
    def kernel_family(self) -> str:
        """Which CPU kernel paths run it (``lowbit.plan.KERNEL_PATHS``): "int8" or "weight_only"."""
        return "weight_only" if self.weight_only else "int8"

    @property
    def op(self) -> str:
        """The ``torch.ops.lowbit`` op of its linear layer (canonical weights)."""
        return {"w8a8": "w8a8_linear", "w8a8-static": "w8a8_linear", "w8a16": "w8a16_linear",
                "w4a16": "w4a16_linear"}[self.kind]

    def group_for(self, k: int) -> int:
        """The quantization group size along K of a layer with ``k`` inputs (K for per-row
        groups and for the per-channel int8 kinds)."""
        return k if self.group_size is None or not self.is_int4 else self.group_size

    @classmethod
    def default(cls, kind: str) -> Scheme:
        """A kind with its default options (w4a16: asymmetric, G = 128)."""
        return cls(kind, 128) if kind == "w4a16" else cls(kind)

    @classmethod
    def parse(cls, text: str) -> Scheme:
        """``"w8a8"``, ``"w8a8-static"``, ``"w8a16"``, ``"w4a16"`` (G = 128), ``"w4a16-g32"``,
        ``"w4a16-gK"`` (one group per row), with ``"-sym"`` for symmetric int4."""
        m = re.fullmatch(r"(w8a8-static|w8a8|w8a16|w4a16)(?:-g(\d+|k))?(-sym)?", text.strip().lower())
        if m is None:
            raise ValueError(
                f"cannot parse scheme {text!r}; examples: w8a8, w8a8-static, w8a16, w4a16-g128, "
                "w4a16-g64-sym, w4a16-gK"
            )
        kind, group, sym = m.groups()
        if kind != "w4a16":
            if group or sym:
                raise ValueError(f"{kind} takes no group size or -sym suffix: {text!r}")
            return cls(kind)
        group_size = 128 if group is None else (None if group == "k" else int(group))
        return cls(kind, group_size, sym is not None)

    def __str__(self) -> str:
        if not self.is_int4:
            return self.kind
        g = "K" if self.group_size is None else str(self.group_size)
        return f"w4a16-g{g}" + ("-sym" if self.symmetric else "")


@dataclasses.dataclass(kw_only=True)
class QuantizedWeight:
    """A weight in canonical form, built by keyword. ``group_size`` is resolved (K for
    per-row groups and for int8 weights)."""

    scheme: Scheme
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int
    out_features: int
    in_features: int
    act_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    # int64[K]: the layer reads its input's channels in this order (x[..., input_perm]), so
    # that a checkpoint whose groups are not consecutive in k (GPTQ act-order) is held with
    # consecutive groups.
    input_perm: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme.is_int4:
            return reference.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)
        return reference.dequantize_int8(self.qweight, self.scales, dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The canonical tensors by name (what a checkpoint stores)."""
        named = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros, "act_scale": self.act_scale,
                 "input_scale": self.input_scale, "input_perm": self.input_perm}
        return {k: v for k, v in named.items() if v is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def validate(self) -> None:
        """Check tensors that come from outside (a checkpoint, a state dict) as a kernel
        would check its arguments: ValueError / TypeError naming the problem."""
        scheme, n, k, g = self.scheme, self.out_features, self.in_features, self.group_size
        if self.qweight is None or self.scales is None:
            raise ValueError("qweight or scales missing")
        if scheme.is_int4:
            checks.int4_weight(self.qweight, self.scales, self.zeros, g)
            if (self.zeros is None) != scheme.symmetric:
                raise ValueError(f"zero points {'present' if self.zeros is not None else 'missing'} for {scheme}")
            if self.zeros is not None and self.zeros.numel() and int(self.zeros.max()) > 15:
                raise ValueError("zero points above 15")
        else:
            checks.int8_weight(self.qweight, self.scales)
        if (self.act_scale is None) == scheme.static_activations:
            raise ValueError(f"an activation scale is {'missing' if self.act_scale is None else 'given'} for {scheme}")
        rows, cols = self.qweight.shape
        stored = (rows, cols * 2) if scheme.is_int4 else (rows, cols)
        if stored != (n, k):
            raise ValueError(f"weight is {stored[0]}x{stored[1]}, expected {n}x{k}")
        if not (torch.isfinite(self.scales).all() and (self.scales > 0).all()):
            raise ValueError("scales must be finite and positive")
        if self.act_scale is not None:
            check_act_scale(scheme, self.act_scale, "act_scale")
        if self.input_scale is not None:
            check_input_scale(self.input_scale, k, "input_scale")
        if self.input_perm is not None:
            check_input_perm(self.input_perm, k, "input_perm")

    def effective(self) -> torch.Tensor:
        """The float32 weight [N, K] the layer computes with, on its input's own channels:
        dequantized, the input scale folded in, the input permutation undone."""
        w = self.dequantize(torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale
        if self.input_perm is not None:
            w = w[:, torch.argsort(self.input_perm)]
        return w

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# Rows of a weight quantized at a time: the float temporaries of a chunk stay near 1 MB, so
# quantizing a layer holds its float weight and its quantized copy, and little else.
CHUNK_ELEMENTS = 2**18


def _row_chunks(w: torch.Tensor):
    rows = max(1, CHUNK_ELEMENTS // max(w.shape[1], 1))
    for r0 in range(0, w.shape[0], rows):
        yield r0, min(w.shape[0], r0 + rows)


def check_finite(w: torch.Tensor, name: str) -> None:
    bad = sum(int((~torch.isfinite(w[r0:r1])).sum()) for r0, r1 in _row_chunks(w))
    if bad:
        raise ValueError(f"{name}: weight holds {bad} NaN or Inf value(s); cannot quantize it")


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D [out_features, in_features], got {tuple(w.shape)}")
    checks.float_dtype(w.dtype, f"{name}: weight")
    check_finite(w, name)


def _stored(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """A scale as it will be stored: rounded to ``scale_dtype`` (a format whose scales are
    fp16 or bf16 then holds the weight exactly), kept in float32."""
    if scale_dtype is None or scale_dtype == torch.float32:
        return scale
    rounded = scale.to(scale_dtype)
    if not torch.isfinite(rounded).all():
        raise ValueError(f"a scale of {scale.abs().max().item():g} does not fit {scale_dtype}")
    return _safe_scale(rounded.float())


def int8_scale(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-output-channel symmetric int8 scale of a float32 ``w[N, K]``: ``max|w[n]|/127``
    (rounded to ``scale_dtype`` when given)."""
    return _stored(_safe_scale(w.abs().amax(dim=1) / 127), scale_dtype)


def int4_params(wg: torch.Tensor, symmetric: bool,
                scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float-valued) integer zero point of each group ``wg[..., G]`` (float32);
    the scale rounded to ``scale_dtype`` when given (the zero point follows from it)."""
    if symmetric:
        scale = _stored(_safe_scale(wg.abs().amax(dim=-1) / 7), scale_dtype)
        return scale, torch.full_like(scale, reference.INT4_SYMMETRIC_ZERO)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    scale = _stored(_safe_scale((hi - lo) / 15), scale_dtype)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 15)


def _int8_codes(wf: torch.Tensor, scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``w[N, K]`` -> (integer-valued float codes, scales float32[N])."""
    scale = int8_scale(wf, scale_dtype)
    return torch.clamp(torch.round(wf / scale.unsqueeze(1)), -127, 127), scale


def _int4_codes(wg: torch.Tensor, symmetric: bool,
                scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 groups ``wg[N, K/G, G]`` -> (integer-valued float codes 0..15, scales, zero points)."""
    scale, zero = int4_params(wg, symmetric, scale_dtype)
    return torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15), scale, zero


def quantize_int8_per_channel(w: torch.Tensor, name: str = "weight",
                              scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s[n] = max|w[n]|/127``, ``q = clamp(round(w/s), -127, 127)`` -> (int8[N, K], float32[N]);
    ``scale_dtype``: the scales rounded to that dtype first (the codes follow them)."""
    _check_weight(w, name)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r0, r1 in _row_chunks(w):
        codes, scale[r0:r1] = _int8_codes(w[r0:r1].float(), scale_dtype)
        q[r0:r1] = codes
    return q, scale


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int | None, symmetric: bool, name: str = "weight",
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise int4 -> (packed uint8[N, K/2], scales float32[N, K/G], zeros uint8 or None).

    Asymmetric: the group's range widened to include zero, ``s = (hi-lo)/15``,
    ``z = clamp(round(-lo/s), 0, 15)``, ``q = clamp(round(w/s)+z, 0, 15)``.
    Symmetric: ``s = max|w|/7``, ``q = clamp(round(w/s)+8, 0, 15)``.
    """
    _check_weight(w, name)
    n, k = w.shape
    g = k if group_size is None else group_size  # None: one group per row
    if k % 2:
        raise ValueError(f"{name}: int4 needs an even in_features, got {k}")
    checks.group_size(g, k)
    packed = torch.empty((n, k // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n, k // g), dtype=torch.float32, device=w.device)
    zeros = torch.empty((n, k // g), dtype=torch.uint8, device=w.device)
    for r0, r1 in _row_chunks(w):
        q, scales[r0:r1], zero = _int4_codes(w[r0:r1].float().reshape(r1 - r0, k // g, g), symmetric, scale_dtype)
        packed[r0:r1] = reference.pack_int4(q.reshape(r1 - r0, k).to(torch.uint8))
        zeros[r0:r1] = zero
    return packed, scales, None if symmetric else zeros


def check_input_scale(input_scale: torch.Tensor, in_features: int, name: str) -> None:
    """An input scale multiplies the activations' channels before the layer: float32[K],
    finite and positive."""
    if input_scale.dtype != torch.float32 or tuple(input_scale.shape) != (in_features,):
        raise ValueError(f"{name}: input_scale must be float32[{in_features}], got "
                         f"{input_scale.dtype}{list(input_scale.shape)}")
    if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
        raise ValueError(f"{name}: input_scale must be finite and positive")


def check_input_perm(input_perm: torch.Tensor, in_features: int, name: str) -> None:
    """An input permutation: int64[K] holding each of 0..K-1 once."""
    if input_perm.dtype != torch.int64 or tuple(input_perm.shape) != (in_features,):
        raise ValueError(f"{name}: input_perm must be int64[{in_features}], got {input_perm.dtype}"
                         f"{list(input_perm.shape)}")
    if not torch.equal(torch.sort(input_perm).values, torch.arange(in_features, device=input_perm.device)):
        raise ValueError(f"{name}: input_perm is not a permutation of 0..{in_features - 1}")


def check_act_scale(scheme: Scheme, act_scale: torch.Tensor | None, name: str) -> None:
    """w8a8-static needs a finite positive per-tensor activation scale; the others take none."""
    static = scheme.static_activations
    if static and act_scale is None:
        raise ValueError(f"{name}: w8a8-static needs a calibrated activation scale (act_scale)")
    if not static and act_scale is not None:
        raise ValueError(f"{name}: an activation scale is only used by w8a8-static, not {scheme}")
    if act_scale is not None:
        checks.per_tensor_scale(act_scale, f"{name}: act_scale")
        if not (torch.isfinite(act_scale).all() and act_scale.item() > 0):
            raise ValueError(f"{name}: the activation scale must be finite and positive, got {act_scale.item()}")


def quantize_weight(
    w: torch.Tensor,
    scheme: Scheme,
    name: str = "weight",
    act_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantize a float ``w[N, K]`` to ``scheme``'s canonical form.

    ``scale_dtype`` (float16, bfloat16): the scales are rounded to it before the codes are
    chosen, so that a format storing scales in that dtype (GPTQ, AWQ: float16) holds the
    weight exactly.
    ``act_scale`` (a calibrated per-tensor activation scale) is required by w8a8-static and
    refused by the other schemes. ``input_scale`` (float32[K], from SmoothQuant or AWQ when
    the scale could not be folded into the layer before) multiplies the activations'
    channels before the layer; ``w`` must already be the correspondingly scaled weight.
    """
    n, k = w.shape if w.dim() == 2 else (0, 0)
    check_act_scale(scheme, act_scale, name)
    if input_scale is not None:
        check_input_scale(input_scale, k, name)
    if scheme.is_int4:
        qweight, scales, zeros = quantize_int4_groupwise(w, scheme.group_size, scheme.symmetric, name, scale_dtype)
    else:
        (qweight, scales), zeros = quantize_int8_per_channel(w, name, scale_dtype), None
    return QuantizedWeight(scheme=scheme, qweight=qweight, scales=scales, zeros=zeros, group_size=scheme.group_for(k),
                           out_features=n, in_features=k, act_scale=act_scale, input_scale=input_scale)


def fake_quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w`` quantized to ``scheme`` and dequantized again, in float32 — what
    ``quantize_weight(w, scheme, scale_dtype=...).dequantize()`` returns, without packing."""
    wf = w.float()
    if not scheme.is_int4:
        q, scale = _int8_codes(wf, scale_dtype)
        return q * scale.unsqueeze(1)
    n, k = wf.shape
    g = scheme.group_for(k)
    q, scale, zero = _int4_codes(wf.reshape(n, k // g, g), scheme.symmetric, scale_dtype)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)


def from_codes(
    scheme: Scheme,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    act_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """A canonical weight from integer codes chosen elsewhere (GPTQ): ``codes[N, K]`` holds
    int8 values in [-127, 127], or int4 values in [0, 15] (unpacked); ``scales`` and
    ``zeros`` are those the codes were rounded with."""
    n, k = codes.shape
    check_act_scale(scheme, act_scale, "weight")
    if input_scale is not None:
        check_input_scale(input_scale, k, "weight")
    if scheme.is_int4:
        qweight = reference.pack_int4(codes.to(torch.uint8))
        zeros = None if scheme.symmetric else zeros.to(torch.uint8)
    else:
        qweight, zeros = codes.to(torch.int8), None
    return QuantizedWeight(scheme=scheme, qweight=qweight, scales=scales.float(), zeros=zeros,
                           group_size=scheme.group_for(k), out_features=n, in_features=k, act_scale=act_scale,
                           input_scale=input_scale)
