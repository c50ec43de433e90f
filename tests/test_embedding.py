"""Quantized embedding tables (lowbit.nn.QuantEmbedding): the CPU lookup kernels against
the reference on fresh random tables, the replacement pass's selection (tied tables stay
float), checkpoints, and the ONNX forms in onnxruntime."""

from __future__ import annotations

import lowbit
import numpy as np
import pytest
import torch
from lowbit import interop, ops, reference
from lowbit.formats import Scheme, quantize_weight
from lowbit.nn import QuantEmbedding
from torch import nn

SCHEMES = ["w8a16", "w4a16-g32", "w4a16-g64-sym", "w4a16-g128", "w4a16-gK"]


def table(v, d, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids_shape", [(), (1,), (3, 7), (2, 0), (2, 3, 5)])
def test_cpu_lookup_equals_the_reference(scheme, dtype, ids_shape):
    v, d = 97, 256  # ragged V
    w = quantize_weight(table(v, d, seed=len(ids_shape)), Scheme.parse(scheme))
    gen = torch.Generator().manual_seed(sum(ids_shape) + 1)
    for id_dtype in (torch.int64, torch.int32):
        ids = torch.randint(0, v, ids_shape, generator=gen, dtype=id_dtype)
        if w.scheme.is_int4:
            got = ops.embedding_int4(ids, w.qweight, w.scales, w.zeros, w.group_size, dtype)
            want = reference.embedding_int4(ids, w.qweight, w.scales, w.zeros, w.group_size, dtype)
        else:
            got = ops.embedding_int8(ids, w.qweight, w.scales, dtype)
            want = reference.embedding_int8(ids, w.qweight, w.scales, dtype)
        assert got.shape == (*ids_shape, d) and got.dtype == dtype
        assert torch.equal(got, want)
        # and each row is the dequantized table's row
        assert torch.equal(got.reshape(-1, d), w.dequantize(dtype)[ids.reshape(-1).long()])


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16-g32"])
def test_bad_ids_are_refused_by_name(scheme):
    w = quantize_weight(table(10, 64), Scheme.parse(scheme))
    module = QuantEmbedding(w)
    for bad in (torch.tensor([10]), torch.tensor([[0, -1]])):
        with pytest.raises(IndexError, match="out of range for a table of 10 rows"):
            module(bad)
        with pytest.raises(IndexError, match="out of range"):
            (reference.embedding_int4(bad, w.qweight, w.scales, w.zeros, 32, torch.float32) if w.scheme.is_int4
             else reference.embedding_int8(bad, w.qweight, w.scales, torch.float32))
    with pytest.raises(TypeError, match="int64 or int32"):
        module(torch.tensor([1.0]))


def test_opcheck_of_the_lookup_ops():
    w8 = quantize_weight(table(40, 64), Scheme("w8a16"))
    w4 = quantize_weight(table(40, 64), Scheme.parse("w4a16-g32"))
    ids = torch.randint(0, 40, (3, 4))
    torch.library.opcheck(torch.ops.lowbit.embedding_int8.default, (ids, w8.qweight, w8.scales, torch.float32))
    torch.library.opcheck(torch.ops.lowbit.embedding_int4.default,
                          (ids, w4.qweight, w4.scales, w4.zeros, 32, torch.bfloat16))


def test_from_embedding_keeps_padding_and_dtype_and_refuses_max_norm():
    e = nn.Embedding(300, 64, padding_idx=0).to(torch.bfloat16)
    q = QuantEmbedding.from_embedding(e, "w4a16-g32")
    ids = torch.tensor([[0, 5, 299]])
    out = q(ids)
    assert out.dtype == torch.bfloat16 and q.padding_idx == 0
    assert torch.equal(out[0, 0], torch.zeros(64, dtype=torch.bfloat16))  # the zero padding row stays zero
    assert torch.equal(out, q.canonical().dequantize(torch.bfloat16)[ids])
    scale = q.scales.max()
    assert (out.float() - e(ids).float()).abs().max() <= 0.5 * scale + 0.02  # half a step, plus bf16 rounding
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_embedding(nn.Embedding(300, 64, max_norm=1.0), "w8a16")


class TinyLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.embed = nn.Embedding(512, 128)
        self.pos = nn.Embedding(64, 128)
        self.mlp = nn.Linear(128, 128)
        self.head = nn.Linear(128, 512, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.relu(self.mlp(x)))


def test_replacement_pass_quantizes_tables_and_keeps_tied_ones_float():
    torch.manual_seed(0)
    untied, tied = TinyLM(False), TinyLM(True)
    report = lowbit.quantize(untied, "w4a16-g64", embeddings="w8a16", progress=False)
    assert isinstance(untied.embed, QuantEmbedding) and isinstance(untied.pos, QuantEmbedding)
    assert "2 of 2 embedding tables quantized" in str(report)
    report = lowbit.quantize(tied, "w4a16-g64", embeddings="w8a16", progress=False)
    assert isinstance(tied.embed, nn.Embedding) and isinstance(tied.pos, QuantEmbedding)
    assert "tied to a Linear layer's weight" in str(report)
    plain = TinyLM(False)
    lowbit.quantize(plain, "w4a16-g64", progress=False)  # off by default
    assert isinstance(plain.embed, nn.Embedding)
    with pytest.raises(ValueError, match="embeddings are quantized to w8a16"):
        lowbit.quantize(TinyLM(False), "w8a8", embeddings="w8a8")


def test_checkpoints_hold_quantized_tables(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(False)
    lowbit.quantize(model, "w8a8", embeddings="w4a16-g32", progress=False)
    lowbit.save(model, tmp_path / "m.safetensors")
    fresh = TinyLM(False)
    lowbit.load(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh.embed, QuantEmbedding) and fresh.embed.scheme == Scheme.parse("w4a16-g32")
    ids = torch.randint(0, 64, (2, 10))
    assert torch.equal(fresh(ids), model(ids))
    wrong = TinyLM(False)
    wrong.embed = nn.Embedding(500, 128)
    with pytest.raises(lowbit.CheckpointError, match="embedding 'embed' is 500x128 in the model but 512x128"):
        lowbit.load(wrong, tmp_path / "m.safetensors")


def test_interop_checkpoint_formats_refuse_quantized_tables(tmp_path):
    model = TinyLM(False)
    lowbit.quantize(model, "w4a16-g64", embeddings="w8a16", progress=False)
    with pytest.raises(interop.ExportError, match="embedding tables are quantized: embed, pos"):
        interop.export(model, tmp_path / "x", "compressed-tensors")


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16-g32", "w4a16-g64-sym"])
def test_onnx_forms_of_quantized_tables(scheme, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = TinyLM(False).eval()
    lowbit.quantize(model, "w8a16", embeddings=scheme, progress=False)
    report = lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randint(0, 512, (2, 8)),),
                           accuracy_level=0)
    assert report.ops.get("GatherBlockQuantized", 0) == (2 if "w4a16" in scheme else 0)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 512, (3, 11))
    with torch.no_grad():
        ours = model(ids).numpy()
    theirs = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert np.abs(theirs - ours).max() <= 2e-6 * np.abs(ours).max()
