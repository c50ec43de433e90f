"""ONNX export, for onnxruntime and the runtimes downstream of it (docs/onnx.md).

``export_onnx(model, path, example_inputs)`` swaps each quantized layer for its ONNX form
for the length of the export, runs torch's dynamo exporter (dynamic batch and sequence
axes), checks the file with ``onnx.checker`` (full check) and puts the layers back:

=============  ==========================================================================
scheme         ONNX form
=============  ==========================================================================
w4a16          ``com.microsoft::MatMulNBits`` bits 4: lowbit's int4 bytes are its B
               ([N, K/block, block/2]), scales [N, K/block], zero points packed two per
               byte along the blocks of a row (each row padded to whole bytes); none for
               symmetric layers (its default zero point is 8).
w8a16          ``MatMulNBits`` bits 8: codes q + 128 (its default zero point is 128).
w8a8           per-token int8 as lowbit computes it: ``s = max|x|/127``, ``u = round(x/s)
               + 128`` as uint8 (standard ops), ``com.microsoft::MatMulIntegerToFloat(u,
               q + 128, s, s_w, 128, 128)`` (exact int32 products, scaled per output
               channel, then by the row scale ``s`` [..., M, 1], which the op applies to its
               output), ``+ b``.
w8a8-static    QDQ: ``Clip`` to +-127 scales (lowbit's range; QuantizeLinear's reaches
               -128), ``QuantizeLinear`` (uint8, zero point 128, the calibrated scale) ->
               ``DequantizeLinear`` on the activations, ``DequantizeLinear`` per output
               channel on the weight ``q + 128`` (uint8, zero point 128), ``MatMul``: what
               onnxruntime fuses into an integer matmul and what QDQ consumers (NPU
               toolchains) read.

Both int8 forms hold uint8 weights with zero point 128 (the same integers as lowbit's int8
codes) because onnxruntime multiplies uint8 activations by int8 weights in saturating int16
sums on AVX2 CPUs (and AVX-512 without VNNI): files with int8 weights, as lowbit wrote them
before, compute wrong answers there; ``check_onnx`` finds them (docs/onnx.md).
=============  ==========================================================================

A group that is not a power of two (one group per row, K = 384) is written as blocks of
the largest power of two dividing it, each repeating the group's scale and zero point:
the same weight exactly. ``accuracy_level`` (MatMulNBits' attribute): 0 computes in fp32,
exactly lowbit's weight-only math, and is slow; 4 (the default) quantizes activations to
int8 inside onnxruntime, its fast path. An input permutation or input scale becomes a
``Gather`` / ``Mul`` before the layer. Quantized embedding tables (``QuantEmbedding``):
int8 rows as ``Gather`` + ``Mul``, int4 rows as ``com.microsoft::GatherBlockQuantized``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lowbit import reference
from lowbit.formats import QuantizedWeight
from lowbit.interop.base import ExportError
from lowbit.nn import QuantEmbedding, QuantLinear

OPSET = 21
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _block_for(group: int) -> int | None:
    """The largest power of two >= 16 dividing ``group`` (MatMulNBits' block), or None."""
    block = group & -group
    while block > 256:
        block //= 2
    return block if block >= 16 else None


class _Form(nn.Module):
    """A quantized layer as ONNX nodes; runs only inside ``torch.onnx.export``."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("input_perm", weight.input_perm)
        self.register_buffer("input_scale", weight.input_scale)
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def _prologue(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.input_scale is not None:
            x = x * self.input_scale
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            raise RuntimeError("an ONNX form of a lowbit layer runs only inside torch.onnx.export")
        return self.emit(self._prologue(x))

    def _symbolic(self, op: str, inputs, attrs, x: torch.Tensor) -> torch.Tensor:
        return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=x.dtype, shape=(*x.shape[:-1], self.out_features),
                                       version=1)


class MatMulNBits(_Form):
    def __init__(self, weight: QuantizedWeight, bias, accuracy_level: int, block: int):
        super().__init__(weight, bias)
        n, k, g = weight.out_features, weight.in_features, weight.group_size
        repeat = g // block  # blocks per lowbit group, each repeating its scale and zero point
        blocks = k // block
        if weight.scheme.is_int4:
            self.bits = 4
            codes = weight.qweight.reshape(n, blocks, block // 2)
            scales = weight.scales.repeat_interleave(repeat, dim=1)
            zeros = None
            if weight.zeros is not None:
                z = weight.zeros.repeat_interleave(repeat, dim=1)
                if blocks % 2:
                    z = torch.cat([z, z.new_zeros(n, 1)], dim=1)
                zeros = reference.pack_int4(z.contiguous())
        else:
            self.bits = 8
            codes = (weight.qweight.to(torch.int16) + 128).to(torch.uint8).reshape(n, blocks, block)
            scales = weight.scales.reshape(n, 1).expand(n, blocks)
            zeros = None  # MatMulNBits' default 8-bit zero point, 128
        self.register_buffer("packed", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros)
        self.attrs = {"K": k, "N": n, "bits": self.bits, "block_size": block, "accuracy_level": accuracy_level}

    def emit(self, x):
        inputs = [x, self.packed, self.scales, self.zeros, None, self.bias]
        return self._symbolic("com.microsoft::MatMulNBits", inputs, self.attrs, x)


def _u8_weight(weight: QuantizedWeight) -> torch.Tensor:
    """lowbit's int8 codes, transposed to [K, N], as uint8 with zero point 128 (q + 128):
    the same integers, in the encoding whose integer matmul onnxruntime computes exactly on
    every x86 CPU (docs/onnx.md, "W8A8 on every CPU")."""
    return (weight.qweight.t().to(torch.int16) + 128).to(torch.uint8).contiguous()


class DynamicInt8(_Form):
    """W8A8 with lowbit's per-token activation rounding, exact up to the float epilogue.

    ``round(x / s)`` stays within +-127 when ``s = max|x| / 127`` (the largest |x| divides
    to 127 within a rounding error), so no Clip is needed; a zero row gets the smallest
    normal scale instead of lowbit's 1, which gives the same zero codes and output. Both
    operands are uint8 with zero point 128: u8 x s8 is faster on VNNI CPUs, but on AVX2
    (and AVX-512 without VNNI) onnxruntime sums its products in saturating int16 and
    computes wrong answers."""

    def __init__(self, weight: QuantizedWeight, bias):
        super().__init__(weight, bias)
        self.register_buffer("weight_t", _u8_weight(weight))  # uint8 [K, N], zero point 128
        self.register_buffer("weight_scale", weight.scales.float().contiguous())
        self.register_buffer("zero", torch.tensor(128, dtype=torch.uint8))

    def emit(self, x):
        xf = x.float()
        scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / reference.INT8_MAX,
                            min=torch.finfo(torch.float32).tiny)
        # One scale per row: QuantizeLinear blocked along the last axis, one block per row
        # (round half to even of x / s, + 128).
        zero = torch.full_like(scale, 128, dtype=torch.uint8)  # blocked: a zero point per block too
        codes = torch.onnx.ops.symbolic("::QuantizeLinear", [xf, scale, zero],
                                        {"axis": -1, "block_size": self.in_features}, dtype=torch.uint8,
                                        shape=tuple(x.shape), version=OPSET)
        # onnxruntime's integer matmul, the per-channel weight scale folded into its output
        # and the per-row activation scale ([..., M, 1]) applied by the op to its output.
        # The bias stays outside: the op would add it before that row scale.
        y = torch.onnx.ops.symbolic("com.microsoft::MatMulIntegerToFloat",
                                    [codes, self.weight_t, scale, self.weight_scale, self.zero, self.zero], {},
                                    dtype=torch.float32, shape=(*x.shape[:-1], self.out_features), version=1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class StaticInt8(_Form):
    """W8A8 with a calibrated per-tensor activation scale, as QDQ; activations and weights
    uint8 with zero point 128, for the reason ``DynamicInt8`` gives."""

    def __init__(self, weight: QuantizedWeight, bias):
        super().__init__(weight, bias)
        self.register_buffer("weight_t", _u8_weight(weight))  # uint8 [K, N], zero point 128
        self.register_buffer("weight_scale", weight.scales.float().contiguous())
        self.register_buffer("weight_zero", torch.full((weight.out_features,), 128, dtype=torch.uint8))
        self.register_buffer("act_scale", weight.act_scale.float().reshape(()))
        self.register_buffer("zero", torch.tensor(128, dtype=torch.uint8))
        # lowbit's codes stop at -127; QuantizeLinear's at -128 (0 here): Clip first, as lowbit
        # does. The bound is a Python number, written into the Clip node: a bound computed in
        # the graph from the scale buffer ended up, for layers sharing an input and a scale
        # (q, k, v), as a Clip reading an initializer the exporter's optimizer had merged away.
        self.bound = float(weight.act_scale.float() * reference.INT8_MAX)

    def emit(self, x):
        shape = tuple(x.shape)
        x = torch.clamp(x.float(), -self.bound, self.bound)
        q = torch.onnx.ops.symbolic("::QuantizeLinear", [x, self.act_scale, self.zero], {},
                                    dtype=torch.uint8, shape=shape, version=OPSET)
        xd = torch.onnx.ops.symbolic("::DequantizeLinear", [q, self.act_scale, self.zero], {},
                                     dtype=torch.float32, shape=shape, version=OPSET)
        wd = torch.onnx.ops.symbolic("::DequantizeLinear", [self.weight_t, self.weight_scale, self.weight_zero],
                                     {"axis": 1}, dtype=torch.float32, shape=tuple(self.weight_t.shape), version=OPSET)
        y = xd @ wd
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class EmbeddingForm(nn.Module):
    """A quantized embedding table as ONNX nodes: int8 rows as Gather of the codes and of
    the row scales, then Cast and Mul (standard ops); int4 rows as onnxruntime's
    ``com.microsoft::GatherBlockQuantized`` on lowbit's packed table (zero points packed two
    per byte along each row, padded; none for symmetric tables, its default being 8)."""

    def __init__(self, module: QuantEmbedding):
        super().__init__()
        weight = module.canonical().to("cpu")
        self.int4, self.dim = weight.scheme.is_int4, module.embedding_dim
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales.float())
        zeros = weight.zeros
        if zeros is not None and zeros.shape[1] % 2:
            zeros = torch.cat([zeros, zeros.new_zeros(zeros.shape[0], 1)], dim=1)
        self.register_buffer("zeros", None if zeros is None else reference.pack_int4(zeros.contiguous()))
        self.attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": weight.group_size, "bits": 4}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            raise RuntimeError("an ONNX form of a lowbit layer runs only inside torch.onnx.export")
        if self.int4:
            return torch.onnx.ops.symbolic("com.microsoft::GatherBlockQuantized",
                                           [self.qweight, ids, self.scales, self.zeros], self.attrs,
                                           dtype=torch.float32, shape=(*ids.shape, self.dim), version=1)
        return self.qweight[ids].float() * self.scales[ids].unsqueeze(-1)


def form_for(layer: QuantLinear, accuracy_level: int) -> _Form:
    """A quantized layer's ONNX form; ``ValueError`` when it has none."""
    weight = layer.canonical().to("cpu")
    bias = None if layer.bias is None else layer.bias.cpu()
    if weight.scheme.weight_only:
        block = _block_for(weight.group_size)
        if block is None:
            raise ValueError(f"group of {weight.group_size} channels: MatMulNBits needs blocks of a power of two "
                             ">= 16 that divide it")
        return MatMulNBits(weight, bias, accuracy_level, block)
    return StaticInt8(weight, bias) if weight.scheme.static_activations else DynamicInt8(weight, bias)


@dataclasses.dataclass
class OnnxReport:
    path: Path
    layers: int
    bytes: int
    ops: dict[str, int]

    def __str__(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.ops.items()) if op in _QUANTIZED_OPS)
        return (f"exported {self.layers} quantized layer(s) to {self.path} ({self.bytes / 2**20:.1f} MB, opset "
                f"{OPSET}): {ops or 'no quantized ops'}")


_QUANTIZED_OPS = ("MatMulNBits", "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear",
                  "GatherBlockQuantized")


def _dynamic_shapes(example_inputs):
    """Every input's first two dimensions (batch, sequence) left to the exporter to make
    dynamic."""
    auto = torch.export.Dim.AUTO

    def dims(t):
        return {i: auto for i in range(min(t.dim(), 2))} if isinstance(t, torch.Tensor) else None

    if isinstance(example_inputs, dict):
        return {k: dims(v) for k, v in example_inputs.items()}
    return tuple(dims(t) for t in example_inputs)


class SentenceEmbedding(nn.Module):
    """A SentenceTransformer's whole pipeline (transformer, pooling, normalization) as a
    module of tensors: token ids and attention mask in, sentence embeddings out."""

    def __init__(self, st: nn.Module):
        super().__init__()
        self.st = st

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        return self.st(features)["sentence_embedding"]


class TransformersOutput(nn.Module):
    """A transformers model as a module of tensors: logits (a causal LM, no cache) or the
    last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.causal = hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")

    def forward(self, input_ids, attention_mask):
        if self.causal:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def traceable(model: nn.Module, example_inputs=None) -> tuple[nn.Module, object]:
    """The module to export and its example inputs: a SentenceTransformer's pipeline with
    its tokenizer's output, a transformers model with token ids, or ``model`` itself with
    the ``example_inputs`` given."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, SentenceTransformer):
        if example_inputs is None:
            tok = model.tokenizer(["a sentence to trace the model with", "and a second, longer one, so that padding "
                                   "shows"], return_tensors="pt", padding=True)
            example_inputs = dict(tok)
        return SentenceEmbedding(model), example_inputs
    if hasattr(model, "config") and hasattr(model.config, "vocab_size") and example_inputs is None:
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        return TransformersOutput(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if example_inputs is None:
        raise ValueError("ONNX export of a plain module needs example_inputs (a tuple of tensors, or a dict)")
    return model, example_inputs


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs=None, *, accuracy_level: int = 4,
                dynamic_shapes=None) -> OnnxReport:
    """Write ``model`` (float32 outside its quantized layers) as an ONNX file at ``path``:
    a SentenceTransformer's pipeline up to the sentence embedding, a transformers model's
    logits or last hidden state, or any module (``example_inputs``: a tuple of positional
    inputs or a dict of keyword inputs). Raises ``ExportError`` naming every layer without
    an ONNX form before anything is written."""
    import onnx

    model, example_inputs = traceable(model, example_inputs)

    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    floats = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    floats |= {m.dtype for m in model.modules() if isinstance(m, QuantEmbedding)}
    if floats - {torch.float32}:
        raise ExportError(f"ONNX export wants a float32 model (onnxruntime's CPU kernels take float32 "
                          f"activations); this one holds {sorted(map(str, floats))}: call model.float() first")
    forms, refused = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            forms[name] = EmbeddingForm(module)
        elif isinstance(module, QuantLinear):
            try:
                forms[name] = form_for(module, accuracy_level)
            except ValueError as e:
                refused[name] = str(e)
    if refused:
        raise ExportError(f"no ONNX form for {len(refused)} layer(s): "
                          + "; ".join(f"{n}: {why}" for n, why in refused.items()))
    path = Path(path)
    originals = {}
    training = model.training
    model.eval()
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # torchvision's ops, absent here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name, form in forms.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            originals[name] = (parent, attr, getattr(parent, attr))
            setattr(parent, attr, form)
        args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), None)
        # The exporter's optimizer merges equal initializers and then equal nodes: layers that
        # read one input with one calibrated scale (q, k, v) end up sharing one activation
        # QuantizeLinear, and onnxruntime 1.32 fuses a QDQ MatMul into its integer matmul
        # only when the QuantizeLinear is the layer's own (unfused, MiniLM ran 12-13 ms a
        # sentence against about 7).
        # Graphs with QDQ layers are therefore written unoptimized (onnxruntime folds the
        # rest at load; the file is 1-2% larger).
        qdq = any(isinstance(form, StaticInt8) for form in forms.values())
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic_shapes or _dynamic_shapes(example_inputs),
                                    optimize=not qdq, verbose=False)
    finally:
        for parent, attr, module in originals.values():
            setattr(parent, attr, module)
        model.train(training)
        quiet.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the destination and checked there; only a file that passes replaces it.
    partial = path.with_name(path.name + ".partial")
    try:
        program.save(os.fspath(partial))
        proto = onnx.load(os.fspath(partial))
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        partial.unlink(missing_ok=True)
        raise ExportError(f"the exported graph fails onnx.checker, nothing written to {path}: {e}") from e
    os.replace(partial, path)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return OnnxReport(path, len(forms), path.stat().st_size, ops)


# Integer matmuls and the QDQ weight node whose int8 weights onnxruntime may multiply with
# saturating int16 pair sums (u8 x s8 on AVX2 and on AVX-512 without VNNI).
_INT8_WEIGHT_READERS = {"MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1,
                        "QLinearMatMul": 3, "DequantizeLinear": 0}
# 7-bit weights (onnxruntime's reduce_range) never saturate: 255 * 63 * 2 < 32767.
_SAFE_INT8 = 63


def check_onnx(path: str | os.PathLike) -> list[str]:
    """What in an ONNX file computes wrong answers on some CPUs, one sentence each (empty:
    nothing found). Finds integer matmuls whose weights are int8 beyond 7 bits, the encoding
    lowbit's exporter wrote for W8A8 before it switched to uint8 weights: onnxruntime sums
    uint8 x int8 products in saturating int16 on AVX2 CPUs (and AVX-512 without VNNI)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    weights = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    found = []
    for node in model.graph.node:
        slot = _INT8_WEIGHT_READERS.get(node.op_type)
        if slot is None or len(node.input) <= slot or node.input[slot] not in weights:
            continue
        values = numpy_helper.to_array(weights[node.input[slot]])
        if values.ndim < 2 or abs(int(values.min())) <= _SAFE_INT8 and int(values.max()) <= _SAFE_INT8:
            continue  # activations' scalars, or 7-bit weights
        found.append(f"{node.op_type} node {node.name or node.output[0]!r} reads int8 weights "
                     f"{node.input[slot]!r} in [{int(values.min())}, {int(values.max())}]: onnxruntime computes "
                     "uint8 x int8 matmuls with saturating int16 sums on AVX2 CPUs (and AVX-512 without VNNI), "
                     "so this file gives wrong answers there; export it again with this lowbit (uint8 weights)")
    return found
