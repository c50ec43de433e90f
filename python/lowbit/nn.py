"""Drop-in quantized replacements for ``nn.Linear``, one class per scheme.

A quantized layer keeps its weight in the canonical format (``lowbit.formats``) as
buffers, so its state_dict is the checkpoint format. The backend is chosen once, when
the layer is built or moved (``.to()``), and the backend's prepacked copy of the weight
is rebuilt then; ``forward`` only calls ``backend.apply`` (no branches, so
torch.compile traces one path).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit import checks
from lowbit.backends import Backend, choose_backend
from lowbit.formats import QuantizedWeight, Scheme, quantize_weight

# The canonical buffers, in state_dict order; absent ones are registered as None.
CANONICAL = ("qweight", "scales", "zeros", "act_scale", "input_scale")


class QuantLinear(nn.Module):
    """Base of the quantized Linear layers; ``KIND`` names the scheme kind of a subclass."""

    KIND = ""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, backend: str | None = None,
                 name: str = ""):
        super().__init__()
        if weight.scheme.kind != self.KIND:
            raise ValueError(f"{type(self).__name__} holds {self.KIND} weights, got {weight.scheme}")
        self.name = name  # the layer's name in its model, for error messages (set by lowbit.quantize)
        self.scheme = weight.scheme
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.group_size = weight.group_size
        self.preferred_backend = backend
        for name in CANONICAL:
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("bias", bias)
        self._prepare()

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: str | Scheme | None = None,
        *,
        name: str = "linear",
        act_scale: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> QuantLinear:
        """Quantize ``linear`` (round to nearest).

        ``config`` defaults to the class's scheme; on ``QuantLinear`` itself it picks the
        subclass (``QuantLinear.from_linear(linear, "w4a16-g64")`` is a W4A16Linear).
        """
        scheme = _scheme_for(cls, config)
        qw = quantize_weight(linear.weight.detach(), scheme, name, act_scale=act_scale)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return module_for(scheme)(qw, bias, backend, name)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (what this layer computes; an
        input scale is folded into the weight's columns)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=dtype)
        with torch.no_grad():
            w = self.canonical().dequantize(torch.float32)
            if self.input_scale is not None:
                w = w * self.input_scale
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def canonical(self) -> QuantizedWeight:
        return QuantizedWeight(scheme=self.scheme, group_size=self.group_size, out_features=self.out_features,
                               in_features=self.in_features, **{name: getattr(self, name) for name in CANONICAL})

    # --- backend and device ------------------------------------------------------------------

    def _prepare(self) -> None:
        """Choose the backend for the weight's device and prepack for it."""
        self.device = self.qweight.device
        self.backend: Backend = choose_backend(self.scheme, self.device, self.preferred_backend)
        self.packed = self.backend.prepack(self.canonical())

    def _apply(self, fn, recurse=True):
        # Device moves apply to every buffer; dtype casts only to the bias: the canonical
        # tensors keep their dtypes (int8/uint8 weights, float32 scales) by definition.
        target = fn(torch.empty(0, device=self.qweight.device))
        for name in CANONICAL:
            t = self._buffers[name]
            if t is not None:
                self._buffers[name] = t.to(target.device)
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        self._prepare()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._prepare()

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checked here, before any op, as nn.Linear checks its input: a kernel sees only the
        # padded or prepacked weight, which may not tell a short input from a right one.
        if x.dim() == 0 or x.shape[-1] != self.in_features or x.dtype not in checks.FLOAT_DTYPES \
                or x.device != self.device:
            self._reject(x)
        # input_scale is set or not for the layer's lifetime, so this is no run-time branch.
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        return self.backend.apply(x, self.packed, self.bias)

    def _reject(self, x: torch.Tensor) -> None:
        layer = f"{type(self).__name__} {self.name!r}" if self.name else type(self).__name__
        if x.dim() == 0:
            raise ValueError(f"{layer}: the input must have at least one dimension of in_features="
                             f"{self.in_features}, got a 0-d tensor")
        if x.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"{layer}: the input must be float32, bfloat16 or float16, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{layer}: the input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the layer "
                             f"takes in_features={self.in_features}")
        raise ValueError(f"{layer}: the input is on {x.device} but the layer's weights are on {self.device}; "
                         f"move one of them (layer.to({str(x.device)!r}))")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}, backend={self.backend.name}"
                + (", input_scale" if self.input_scale is not None else ""))


class W8A8Linear(QuantLinear):
    """int8 weights per output channel, int8 activations quantized per token at run time."""

    KIND = "w8a8"


class W8A8StaticLinear(QuantLinear):
    """int8 weights per output channel, int8 activations with a calibrated per-tensor scale."""

    KIND = "w8a8-static"


class W8A16Linear(QuantLinear):
    """int8 weights per output channel, float activations."""

    KIND = "w8a16"


class W4A16Linear(QuantLinear):
    """Group-wise int4 weights (asymmetric or symmetric), float activations."""

    KIND = "w4a16"


MODULES: dict[str, type[QuantLinear]] = {c.KIND: c for c in (W8A8Linear, W8A8StaticLinear, W8A16Linear, W4A16Linear)}


def module_for(scheme: Scheme) -> type[QuantLinear]:
    return MODULES[scheme.kind]


def _scheme_for(cls: type[QuantLinear], config: str | Scheme | None) -> Scheme:
    if config is None:
        if cls is QuantLinear:
            raise ValueError("QuantLinear.from_linear needs a scheme")
        return Scheme.default(cls.KIND)
    scheme = Scheme.parse(config) if isinstance(config, str) else config
    if cls is not QuantLinear and scheme.kind != cls.KIND:
        raise ValueError(f"{cls.__name__} cannot hold {scheme}; use {module_for(scheme).__name__}")
    return scheme
