"""Drop-in quantized replacements for ``nn.Linear``, one class per scheme.

A quantized layer holds its weight once, in the runtime layout of the backend that runs
it (a ``WeightStore``: the backend and its ``Packed`` weight). The canonical tensors
(``lowbit.formats``) are derived from it on demand, through the backend's exact inverse
of its prepack: for the state dict (which is the checkpoint format), ``canonical()``,
``to_linear`` and moves to another device. The backend is chosen when the layer is built,
loaded or moved; ``forward`` only checks its input and calls ``backend.apply`` (no
branches, so torch.compile traces one path). Layers that share one weight (tied weights)
share one store.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit import checks, reference
from lowbit.backends import Backend, Packed, choose
from lowbit.formats import QuantizedWeight, Scheme, quantize_weight

# The canonical tensors in a layer's state dict, in order; absent ones are left out.
CANONICAL = ("qweight", "scales", "zeros", "act_scale", "input_scale", "input_perm")


class WeightStore:
    """A quantized weight in one backend's runtime layout: the only copy a layer holds."""

    def __init__(self, packed: Packed, backend: Backend, preferred: str | None = None,
                 refusals: list[str] | None = None):
        self.packed = packed
        self.backend = backend
        self.device = packed.device  # kept beside the packed weight: forward compares it on every call
        self.preferred = preferred  # the backend asked for by name, kept across moves
        self.refusals = refusals or []  # why backends of higher priority did not take the weight

    @classmethod
    def build(cls, weight: QuantizedWeight, preferred: str | None = None) -> WeightStore:
        """Choose the backend for the weight's device and shape, and prepack for it."""
        choice = choose(weight.scheme, weight.qweight.device, preferred, (weight.out_features, weight.in_features))
        return cls(choice.backend.prepack(weight), choice.backend, preferred, choice.refusals)

    def canonical(self) -> QuantizedWeight:
        return self.backend.unpack(self.packed)

    def move(self, device: torch.device) -> None:
        """Re-prepack for ``device``'s backend (a no-op when already there, so that a store
        shared by several layers moves once)."""
        if device != self.device:
            moved = WeightStore.build(self.canonical().to(device), self.preferred)
            self.packed, self.backend, self.device, self.refusals = moved.packed, moved.backend, moved.device, \
                moved.refusals


class QuantLinear(nn.Module):
    """Base of the quantized Linear layers; ``KIND`` names the scheme kind of a subclass.

    Built from a canonical weight (prepacked for the backend chosen now) or from another
    layer's ``WeightStore`` (shared)."""

    KIND = ""

    def __init__(self, weight: QuantizedWeight | WeightStore, bias: torch.Tensor | None, backend: str | None = None,
                 name: str = ""):
        super().__init__()
        store = weight if isinstance(weight, WeightStore) else WeightStore.build(weight, backend)
        packed = store.packed
        if packed.scheme.kind != self.KIND:
            raise ValueError(f"{type(self).__name__} holds {self.KIND} weights, got {packed.scheme}")
        self.name = name  # the layer's name in its model, for error messages (set by lowbit.quantize)
        self.scheme = packed.scheme
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.store = store
        self.register_buffer("bias", bias)

    @property
    def backend(self) -> Backend:
        return self.store.backend

    @property
    def packed(self) -> Packed:
        return self.store.packed

    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def qweight(self) -> torch.Tensor:
        """The canonical integer weight, unpacked from the runtime form at each access (tools
        such as peft read it for its device and dtype)."""
        return self.canonical().qweight

    @property
    def act_scale(self) -> torch.Tensor | None:
        """The calibrated per-tensor activation scale (w8a8-static), else None."""
        return self.store.packed.act_scale

    @property
    def input_scale(self) -> torch.Tensor | None:
        """A per-channel factor applied to the input first (unfolded SmoothQuant / AWQ), else None."""
        return self.store.packed.input_scale

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
        input scale is folded into the weight's columns, an input permutation undone)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.canonical().effective())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def canonical(self) -> QuantizedWeight:
        """The canonical weight, derived from the runtime form (exact)."""
        return self.store.canonical()

    # --- device moves and the state dict -----------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Device moves re-prepack the weight for the new device's backend; dtype casts apply
        # to the bias only: quantized weights keep their formats by definition.
        target = fn(torch.empty(0, device=self.device))
        self.store.move(target.device)
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        canonical = self.canonical()
        for name in CANONICAL:
            t = getattr(canonical, name)
            if t is not None:
                destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _state_names(self) -> list[str]:
        """The names this layer's state dict holds."""
        scheme, packed = self.scheme, self.packed
        names = ["qweight", "scales"] + (["zeros"] if scheme.is_int4 and not scheme.symmetric else [])
        names += ["act_scale"] if scheme.static_activations else []
        names += ["input_scale"] if packed.input_scale is not None else []
        names += ["input_perm"] if packed.input_perm is not None else []
        return names + (["bias"] if self.bias is not None else [])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = set(CANONICAL) | {"bias"}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in expected)
        parts = {name: state_dict.get(prefix + name) for name in CANONICAL}
        if strict:
            missing_keys.extend(prefix + name for name in self._state_names() if prefix + name not in state_dict)
        if parts["qweight"] is None:
            return
        device = self.device
        weight = QuantizedWeight(scheme=self.scheme, group_size=self.group_size, out_features=self.out_features,
                                 in_features=self.in_features,
                                 **{n: None if t is None else t.detach().to(device) for n, t in parts.items()})
        try:
            weight.validate()
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{prefix or type(self).__name__}: {e}")
            return
        self.store = WeightStore.build(weight, self.store.preferred)
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None:
            if bias.shape != self.bias.shape:
                error_msgs.append(f"{prefix}bias: shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}")
                return
            with torch.no_grad():
                self.bias.copy_(bias)

    # --- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.store
        # Checked here, before any op, as nn.Linear checks its input: a kernel sees only the
        # padded or prepacked weight, which may not tell a short input from a right one.
        if x.dim() == 0 or x.shape[-1] != self.in_features or x.dtype not in checks.FLOAT_DTYPES \
                or x.device != store.device:
            self._reject(x)
        # input_perm and input_scale are set or not for the layer's lifetime: no run-time branch.
        packed = store.packed
        if packed.input_perm is not None:
            x = x.index_select(-1, packed.input_perm)
        input_scale = packed.input_scale
        if input_scale is not None:
            x = x * input_scale.to(x.dtype)
        return store.backend.apply(x, store.packed, self.bias)

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
                + (", input_scale" if self.input_scale is not None else "")
                + (", input_perm" if self.packed.input_perm is not None else ""))


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


def runtime_bytes(model: nn.Module) -> int:
    """Bytes the quantized layers of ``model`` hold at run time (each shared store once)."""
    stores = {id(m.store): m.store for m in model.modules() if isinstance(m, QuantLinear)}
    return sum(s.packed.nbytes() for s in stores.values())


class QuantEmbedding(nn.Module):
    """A drop-in ``nn.Embedding`` whose table is quantized like a Linear weight [V, D]: int8
    per row (scheme w8a16) or int4 per group of D (w4a16-gG). A lookup dequantizes only
    the rows it reads (``torch.ops.lowbit.embedding_int8`` / ``embedding_int4`` on CPU; the
    reference elsewhere) and returns them in ``dtype``, the float table's dtype. The table
    is frozen; its canonical tensors are the module's buffers (one copy)."""

    def __init__(self, weight: QuantizedWeight, padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
                 name: str = ""):
        super().__init__()
        if not weight.scheme.weight_only:
            raise ValueError(f"an embedding table is int8 per row (w8a16) or int4 per group (w4a16), not "
                             f"{weight.scheme}")
        weight.validate()
        self.scheme, self.group_size, self.padding_idx, self.dtype, self.name = \
            weight.scheme, weight.group_size, padding_idx, dtype, name
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: Scheme | str, name: str = "",
                       scale_dtype: torch.dtype | None = None) -> QuantEmbedding:
        scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        if embedding.max_norm is not None:
            raise ValueError(f"{name or 'embedding'}: max_norm renormalizes the table's rows in place on lookup; "
                             "a quantized table cannot follow")
        weight = quantize_weight(embedding.weight.detach(), scheme, name or "embedding", scale_dtype=scale_dtype)
        return cls(weight, embedding.padding_idx, embedding.weight.dtype, name)

    def canonical(self) -> QuantizedWeight:
        return QuantizedWeight(scheme=self.scheme, qweight=self.qweight, scales=self.scales, zeros=self.zeros,
                               group_size=self.group_size, out_features=self.num_embeddings,
                               in_features=self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device != self.qweight.device:
            raise ValueError(f"{type(self).__name__} {self.name!r}: the ids are on {ids.device} but the table on "
                             f"{self.qweight.device}")
        ops = torch.ops.lowbit if ids.device.type == "cpu" else reference
        if self.scheme.is_int4:
            return ops.embedding_int4(ids, self.qweight, self.scales, self.zeros, self.group_size, self.dtype)
        return ops.embedding_int8(ids, self.qweight, self.scales, self.dtype)

    def _apply(self, fn, recurse=True):
        # Device moves apply to the table; dtype casts change the output dtype only: the
        # codes keep their formats by definition.
        target = fn(torch.empty(0, device=self.qweight.device, dtype=self.dtype))
        for name in ("qweight", "scales", "zeros"):
            t = self._buffers[name]
            if t is not None:
                self._buffers[name] = t.to(target.device)
        self.dtype = target.dtype if target.is_floating_point() else self.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}, dtype={self.dtype}"
