"""ONNX export (lowbit.interop.onnx), run by onnxruntime: every scheme's form computes what
the lowbit layer computes (at accuracy level 0: exactly lowbit's math up to float
rounding), with dynamic batch and sequence axes; the sentence-transformers pipeline of
all-MiniLM-L6-v2 keeps lowbit's embeddings; what has no ONNX form is refused before any
file is written."""

from __future__ import annotations

import lowbit
import numpy as np
import pytest
import torch
from lowbit import cli, demo, interop
from lowbit.formats import QuantizedWeight, quantize_weight
from lowbit.interop.onnx import check_onnx
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

SCHEMES = ["w4a16-g64", "w4a16-g32-sym", "w4a16-gK", "w8a16", "w8a8", "w8a8-static"]


def session(path, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, *arrays):
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), arrays)})[0]


def small_model(scheme, k=384):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, 256), nn.GELU(), nn.Linear(256, 96, bias=False)).eval()
    calibration = [torch.randn(4, 7, k)] if lowbit.Scheme.parse(scheme).static_activations else None
    lowbit.quantize(model, scheme, progress=False, calibration=calibration)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_runs_in_onnxruntime_as_lowbit_computes_it(scheme, tmp_path):
    model = small_model(scheme)
    report = lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(3, 5, 384),),
                           accuracy_level=0)
    assert report.layers == 2
    expected_op = {"w8a8": "MatMulIntegerToFloat", "w8a8-static": "QuantizeLinear"}.get(scheme, "MatMulNBits")
    assert report.ops.get(expected_op, 0) >= 1
    sess = session(tmp_path / "m.onnx")
    for shape in [(2, 9, 384), (1, 1, 384), (4, 3, 384)]:  # other batch and sequence sizes than traced
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ours = model(x).numpy()
        theirs = run(sess, x.numpy())
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() <= 2e-6 * np.abs(ours).max(), shape


class SharedInput(nn.Module):
    """Three layers reading one input, as attention's q, k and v: a static scheme gives them
    one calibrated activation scale, so their activation nodes are the same."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(128, 64) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8a8"])
def test_layers_sharing_an_input_export_and_run(scheme, tmp_path):
    torch.manual_seed(3)
    model = SharedInput().eval()
    lowbit.quantize(model, scheme, progress=False, calibration=[torch.randn(4, 6, 128)])
    report = lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(2, 5, 128),))
    assert report.layers == 3  # and onnx.checker's full check passed
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node]
    assert fused.count("MatMulIntegerToFloat") == 3 and "MatMul" not in fused  # onnxruntime's integer path
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        ours = model(x).numpy()
    assert np.abs(run(session(tmp_path / "m.onnx"), x.numpy()) - ours).max() <= 1e-5 * np.abs(ours).max()


def test_a_graph_failing_the_checker_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier export")

    def refuse(*args, **kwargs):
        raise onnx.checker.ValidationError("made to fail")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(interop.ExportError, match="fails onnx.checker, nothing written"):
        lowbit.export(small_model("w8a8"), path, "onnx", example_inputs=(torch.randn(2, 384),))
    assert path.read_bytes() == b"an earlier export" and sorted(tmp_path.iterdir()) == [path]


def test_accuracy_level_4_is_onnxruntimes_int8_compute(tmp_path):
    model = small_model("w4a16-g64")
    lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(2, 3, 384),))
    graph = onnx.load(tmp_path / "m.onnx").graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    x = torch.randn(2, 4, 384)
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = run(session(tmp_path / "m.onnx"), x.numpy())
    assert np.abs(theirs - ours).max() <= 0.05 * np.abs(ours).max()  # activations rounded to int8 inside


def test_input_permutation_and_input_scale_become_nodes(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    perm = torch.randperm(128)
    scale = torch.rand(128) + 0.5
    qw = quantize_weight(w, lowbit.Scheme.parse("w4a16-g32"), input_scale=scale)
    qw = QuantizedWeight(**{**qw.__dict__, "input_perm": perm})
    model = nn.Sequential(lowbit.W4A16Linear(qw, torch.randn(64)))
    lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(2, 128),), accuracy_level=0)
    x = torch.randn(5, 128)
    with torch.no_grad():
        ours = model(x).numpy()
    assert np.abs(run(session(tmp_path / "m.onnx"), x.numpy()) - ours).max() <= 2e-6 * np.abs(ours).max()


def test_minilm_pipeline_keeps_lowbits_embeddings(tmp_path):
    from sentence_transformers import SentenceTransformer

    source = demo.default_model_dir()
    fp32 = SentenceTransformer(source, device="cpu").eval()
    sentences = demo.sentences(12)
    reference = fp32.encode(sentences, convert_to_numpy=True)
    tok = fp32.tokenizer(sentences, return_tensors="np", padding=True)
    tokenize = getattr(fp32, "preprocess", None) or fp32.tokenize
    calibration = [tokenize([t]) for t in demo.sentences(8, offset=400)]
    for scheme in ("w4a16-g128", "w8a16", "w8a8", "w8a8-static"):  # q, k and v share their input
        model = SentenceTransformer(source, device="cpu").eval()
        lowbit.quantize(model, scheme, progress=False, calibration=calibration,
                        calibration_forward=lambda m, features: m(dict(features)))
        lowbit.export(model, tmp_path / f"{scheme}.onnx", "onnx", accuracy_level=0)
        sess = session(tmp_path / f"{scheme}.onnx")
        theirs = sess.run(None, {i.name: tok[i.name].astype(np.int64) for i in sess.get_inputs()})[0]
        ours = model.encode(sentences, convert_to_numpy=True)
        cosine = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
        assert abs(cosine(theirs, reference).mean() - cosine(ours, reference).mean()) <= 1e-3, scheme
        if lowbit.Scheme.parse(scheme).weight_only:  # at level 0: lowbit's math exactly
            assert np.abs(theirs - ours).max() <= 1e-5


def test_what_has_no_onnx_form_is_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 64), nn.Linear(64, 8))
    lowbit.quantize(model, "w8a16", progress=False)  # one scale per row of 100: no power-of-two block
    with pytest.raises(interop.ExportError, match=r"no ONNX form for 1 layer\(s\): 0: group of 100"):
        lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(2, 100),))
    assert not (tmp_path / "m.onnx").exists()
    half = small_model("w4a16-g64").to(torch.bfloat16)
    with pytest.raises(interop.ExportError, match="float32 model"):
        lowbit.export(half, tmp_path / "h.onnx", "onnx", example_inputs=(torch.randn(2, 384),))
    with pytest.raises(ValueError, match="example_inputs"):
        lowbit.export(small_model("w8a8"), tmp_path / "p.onnx", "onnx")


def test_command_line_exports_onnx(tmp_path, capsys):
    out = tmp_path / "minilm.onnx"
    assert cli.main(["export", demo.default_model_dir(), "--scheme", "w8a16", "--format", "onnx",
                     "--out", str(out)]) == 0
    assert "MatMulNBits x36" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert cli.main(["export", demo.default_model_dir(), "--scheme", "w8a16", "--format", "onnx",
                     "--out", str(out)]) == 2  # exists


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_benchmark_lm_runs_in_onnxruntime_per_scheme(scheme, tmp_path):
    """The byte-level LM of bench/tinylm.py (untrained here: its architecture is what the
    export must express), every scheme, at accuracy level 0."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import tinylm

    torch.manual_seed(0)
    model = tinylm.TinyLM(tinylm.Config(layers=2)).eval()
    ids = torch.randint(0, 256, (2, 32))
    calibration = [ids] if lowbit.Scheme.parse(scheme).static_activations else None
    lowbit.quantize(model, scheme.replace("-gK", "-g128"), progress=False, calibration=calibration)
    lowbit.export(model, tmp_path / "lm.onnx", "onnx", example_inputs=(ids,), accuracy_level=0)
    x = torch.randint(0, 256, (3, 50))
    with torch.no_grad():
        ours = model(x).numpy()
    theirs = run(session(tmp_path / "lm.onnx"), x.numpy())
    # Weight-only: lowbit's math exactly; W8A8: a near-tie in an activation may round the
    # other way after a few layers of float32 differences.
    tolerance = 2e-5 if lowbit.Scheme.parse(scheme).weight_only else 2e-2
    assert np.abs(theirs - ours).max() <= tolerance * np.abs(ours).max()


def _old_int8_graph(path, k=64, n=8, bits=8):
    """A W8A8 layer as lowbit wrote it before uint8 weights: uint8 activations (zero point
    128) times int8 weights, in MatMulIntegerToFloat and as QDQ."""
    from onnx import TensorProto, helper, numpy_helper

    limit = 2 ** (bits - 1) - 1
    w = np.random.default_rng(0).integers(-limit, limit + 1, size=(k, n)).astype(np.int8)
    w[0, 0] = limit
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(n, np.float32), "ws"),
             numpy_helper.from_array(np.array(128, np.uint8), "az"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
    nodes = [helper.make_node("MatMulIntegerToFloat", ["A", "W", "S", "ws", "az"], ["Y"], domain="com.microsoft",
                              name="dynamic"),
             helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], axis=1, name="qdq_weight")]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k]),
                                             helper.make_tensor_value_info("S", TensorProto.FLOAT, [None, 1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n]),
                               helper.make_tensor_value_info("Wd", TensorProto.FLOAT, [k, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    return path


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_int8_exports_are_right_on_every_cpu(scheme, tmp_path, capsys):
    # uint8 x uint8 (zero points 128): onnxruntime's integer matmul is exact on AVX2 too,
    # where uint8 x int8 saturates (make test-avx2 runs these files there: the tests above).
    model = small_model(scheme)
    lowbit.export(model, tmp_path / "m.onnx", "onnx", example_inputs=(torch.randn(3, 5, 384),))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    int8_inits = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert int8_inits == [] and check_onnx(tmp_path / "m.onnx") == []
    assert cli.main(["inspect", str(tmp_path / "m.onnx")]) == 0
    assert "no integer matmul that gives wrong answers" in capsys.readouterr().out


def test_old_int8_exports_are_recognised(tmp_path, capsys):
    found = check_onnx(_old_int8_graph(tmp_path / "old.onnx"))
    assert len(found) == 2 and "'dynamic'" in found[0] and "'qdq_weight'" in found[1]
    assert all("AVX2" in line and "[-127, 127]" in line for line in found)
    assert cli.main(["inspect", str(tmp_path / "old.onnx")]) == 0
    assert capsys.readouterr().out.count("warning: ") == 2
    # 7-bit weights (onnxruntime's reduce_range) never saturate.
    assert check_onnx(_old_int8_graph(tmp_path / "seven.onnx", bits=7)) == []
