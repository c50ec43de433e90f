"""LoRA on a quantized base: trainable low-rank adapters over frozen lowbit layers.

``LoRALinear(base, r, alpha, dropout)`` wraps a quantized layer (or a float ``nn.Linear``):
``y = base(x) + dropout(x) @ A^T @ B^T * alpha / r``, with ``A`` initialised as a Linear
layer's weight would be and ``B`` zero (so training starts from the base model). Only ``A``
and ``B`` train; the base's gradient with respect to its input flows through lowbit's
registered backward (``lowbit.ops``), so layers before a LoRA-wrapped one train too.

* ``add_lora(model, r=8, alpha=16, dropout=0.0, target=["*"])`` wraps every quantized layer
  whose name matches a glob pattern of ``target``. Given ``reference`` (the float model the
  quantized one came from), each adapter instead starts at the best rank-``r`` approximation
  of its layer's quantization error ``W - Q`` (truncated SVD; the first step of LoftQ,
  without re-quantizing the base, so a GPTQ or AWQ base stays as calibrated): training then
  starts from a model nearer the float one, and the adapters spend their rank on what
  quantization lost before what the data adds. ``adapter_state_dict(model)`` is the
  adapters alone (what to save apart from the base checkpoint); ``merge_lora(model)``
  replaces each wrapper by a float ``nn.Linear`` holding dequantized base + ``B A`` scaled.
* For peft users, ``peft_config(LoraConfig(...))`` registers lowbit's layers with peft's
  custom-module mapping, so that ``peft.get_peft_model(model, config)`` puts peft's own LoRA
  machinery (adapter names, dropout, scaling, saving) over lowbit's quantized layers
  (``PeftQuantLinear``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.formats import quantize_weight
from lowbit.nn import QuantLinear, WeightStore


class LoRALinear(nn.Module):
    def __init__(self, base: QuantLinear | nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.device if isinstance(base, QuantLinear) else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return y + (delta * self.scaling).to(y.dtype)

    @torch.no_grad()
    def init_from_residual(self, weight: torch.Tensor, name: str = "") -> float:
        """Set ``B A * alpha / r`` to the rank-``r`` truncated SVD of ``weight - base``
        (``weight`` [N, K]: the float weight this layer was quantized from). Returns the share
        of the residual's squared norm the adapter captures."""
        u, s, vh = torch.linalg.svd(_residual(self.base, weight, name).double(), full_matrices=False)
        r = min(self.r, s.numel())
        root = (s[:r] / self.scaling).sqrt()
        self.lora_B.zero_()
        self.lora_A.zero_()
        self.lora_B[:, :r] = (u[:, :r] * root).to(self.lora_B.dtype)
        self.lora_A[:r] = (root[:, None] * vh[:r]).to(self.lora_A.dtype)
        total = float((s * s).sum())
        return float((s[:r] * s[:r]).sum()) / total if total > 0 else 1.0

    def delta_weight(self) -> torch.Tensor:
        """``B A * alpha / r`` [N, K]: what the adapter adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A float ``nn.Linear`` computing base + adapter (the base dequantized)."""
        base = self.base.to_linear(torch.float32) if isinstance(self.base, QuantLinear) else self.base
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=dtype or base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(base.weight.float() + self.delta_weight().float())
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


@torch.no_grad()
def _residual(base: QuantLinear | nn.Linear, weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight - base``'s weight in float32, after checking that ``weight`` is the float
    weight ``base`` was quantized from."""
    label = f"layer {name!r}" if name else "LoRA layer"
    if weight.shape != (base.out_features, base.in_features):
        raise ValueError(f"{label}: reference weight has shape {tuple(weight.shape)}, the layer "
                         f"is {base.out_features} x {base.in_features}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{label}: reference weight has NaN or Inf values")
    quantized = base.canonical().effective() if isinstance(base, QuantLinear) else base.weight.float()
    weight = weight.detach().to(device=quantized.device, dtype=torch.float32)
    residual = weight - quantized
    # A base quantized from this weight differs from it by its rounding (about 10% of its
    # norm at 4 bits); far more means the reference is another weight, and the adapter
    # would start by adding that difference to the model.
    relative = float(residual.norm() / weight.norm().clamp_min(1e-30))
    if relative > 0.5:
        raise ValueError(f"{label}: the reference weight is not the one this layer was quantized from "
                         f"(|W - Q| / |W| = {relative:.2f})")
    return residual


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target: Sequence[str] = ("*",), include_float: bool = False,
             reference: nn.Module | None = None) -> list[str]:
    """Wrap the quantized layers (and, with ``include_float``, the float ``nn.Linear`` ones)
    whose names match a pattern of ``target`` in ``LoRALinear``; freeze every other
    parameter of the model. With ``reference`` (the float model before quantization, same
    module names), each adapter starts at its layer's quantization error's rank-``r``
    truncated SVD (``LoRALinear.init_from_residual``) in place of zero. Returns the wrapped
    layers' names."""
    kinds = (QuantLinear, nn.Linear) if include_float else (QuantLinear,)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and any(fnmatch.fnmatchcase(n, p)
                                                                                   for p in target)]
    if not names:
        raise ValueError(f"no {'Linear or ' if include_float else ''}quantized layer matches {list(target)}")
    floats = {}
    if reference is not None:  # every layer checked before the model changes
        linears = dict(reference.named_modules())
        for name in names:
            if not isinstance(linears.get(name), nn.Linear):
                raise ValueError(f"reference model has no nn.Linear named {name!r} to start its adapter from")
            floats[name] = linears[name].weight
            _residual(model.get_submodule(name), floats[name], name)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        adapter = LoRALinear(model.get_submodule(name), r, alpha, dropout)
        if reference is not None:
            adapter.init_from_residual(floats[name], name)
        _replace(model, name, adapter)
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone, by state-dict name."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``LoRALinear`` by the float ``nn.Linear`` it computes; returns model."""
    for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _replace(model, name, model.get_submodule(name).merged(dtype))
    return model


# --- peft -------------------------------------------------------------------------------------------


def peft_config(config):
    """``config`` (a peft ``LoraConfig``) with lowbit's quantized layers in peft's custom
    module mapping: ``peft.get_peft_model(model, peft_config(LoraConfig(...)))``."""
    config._register_custom_module({QuantLinear: _peft_layer_class()})
    return config


_PEFT_LAYER = []


def _peft_layer_class():
    """``PeftQuantLinear``, defined on first use so that lowbit does not need peft."""
    if _PEFT_LAYER:
        return _PEFT_LAYER[0]
    from peft.tuners.lora.layer import LoraLayer

    class PeftQuantLinear(nn.Module, LoraLayer):
        """peft's LoRA over a lowbit quantized layer: peft manages the adapters (names,
        dropout, scaling, state dict); the frozen base runs on lowbit's kernels. Merging
        requantizes base + adapter to the base's scheme (round to nearest), as peft does for
        bitsandbytes' 4-bit layers, so a merged model is not bit-identical to the adapted one."""

        def __init__(self, base_layer: QuantLinear, adapter_name: str, config=None, r: int = 0,
                     lora_alpha: int = 1, **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                delta = b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]
                result = result + delta.to(result.dtype)
            return result

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def _requantize(self, sign: float, adapter_names) -> None:
            base: QuantLinear = self.get_base_layer()
            canonical = base.canonical()
            w = canonical.effective()
            for name in adapter_names:
                w = w + sign * self.get_delta_weight(name).float().to(w.device)
            weight = quantize_weight(w, base.scheme, base.name or "lora merge", act_scale=canonical.act_scale)
            base.store = WeightStore.build(weight, base.store.preferred)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
            if names:
                self._requantize(1.0, names)
                self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            names = [n for n in self.merged_adapters if n in self.lora_A]
            if names:
                self._requantize(-1.0, names)
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    _PEFT_LAYER.append(PeftQuantLinear)
    return PeftQuantLinear
