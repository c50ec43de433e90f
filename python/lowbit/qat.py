"""Quantization-aware training: train through fake quantization, then convert to the real
lowbit layers.

``prepare(model, scheme, **selection)`` swaps the Linear layers that ``lowbit.quantize``
would select (same ``include`` / ``exclude`` / ``overrides`` keywords) for
``FakeQuantLinear``: the float weight stays the trainable parameter, and every forward
computes with its quantized value. The quantization parameters are re-derived from the
current weight at every step (round to nearest on the canonical format's rule: scale and
zero point from each group's or row's range), so there is nothing extra to learn or to keep
in step. Gradients pass straight through the rounding, to the weight and to the input (W8A8:
through the activations' per-token rounding too).

``convert(model)`` replaces each ``FakeQuantLinear`` by the quantized module of its scheme,
quantized from the trained weight with the same rule: the same codes and scales the last
fake forward used, and on the reference backend the very same output, bit for bit (the fake
forward computes what the reference computes); lowbit's kernels give it within their
documented error.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit import reference
from lowbit.formats import Scheme, fake_quantize, quantize_weight
from lowbit.nn import QuantLinear, module_for
from lowbit.quantize import QuantConfig, Selection, _as_config


class FakeQuantLinear(nn.Module):
    """``nn.Linear`` computing with its weight quantized to ``scheme`` (straight-through)."""

    def __init__(self, linear: nn.Linear, scheme: Scheme, name: str = ""):
        super().__init__()
        if scheme.static_activations:
            raise ValueError("QAT trains dynamic schemes; calibrate a static activation scale after converting")
        self.scheme, self.name = scheme, name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (float32), straight-through to ``weight``."""
        w = self.weight.float()
        return w + (fake_quantize(w.detach(), self.scheme) - w).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if self.scheme.weight_only:  # the reference's arithmetic: fp32 product, bias, one cast
            y = x.float() @ w.t()
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        # W8A8: the value is the reference's (exact int32 product of the rounded codes); the
        # gradient that of x @ w^T, straight through both roundings.
        q = quantize_weight(self.weight.detach(), self.scheme, self.name or "qat")
        exact = reference.w8a8_linear(x.detach(), q.qweight, q.scales, None)
        through = (x.float() @ w.t()).to(x.dtype)
        y = exact + (through - through.detach())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def prepare(model: nn.Module, config: QuantConfig | Scheme | str = "w4a16-g128", **fields) -> list[str]:
    """Swap the selected Linear layers of ``model`` for ``FakeQuantLinear`` in place; returns
    their names."""
    config = _as_config(config, fields)
    selection = Selection(model, config)
    for entry in selection.entries:
        fake = FakeQuantLinear(entry.linear, entry.scheme, entry.name)
        for _, parent, attr, _ in selection._sites[id(entry.linear)]:
            setattr(parent, attr, fake)
    return [e.name for e in selection.entries]


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Replace every ``FakeQuantLinear`` by its quantized module (``backend`` as
    ``lowbit.quantize`` takes it); returns model."""
    done: dict[int, QuantLinear] = {}
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, FakeQuantLinear):
                if id(child) not in done:
                    weight = quantize_weight(child.weight.detach(), child.scheme, child.name or attr)
                    bias = None if child.bias is None else child.bias.detach().clone()
                    done[id(child)] = module_for(child.scheme)(weight, bias, backend, child.name)
                setattr(parent, attr, done[id(child)])
    return model
