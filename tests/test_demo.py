"""The demo and the accuracy gates on a real model nobody here trained (all-MiniLM-L6-v2)."""

from __future__ import annotations

import pytest
import torch
from lowbit import demo
from lowbit.cli import main

# Mean cosine of the sentence embeddings to fp32 over 20 pydoc sentences, all 37 Linear
# layers quantized by round to nearest. int8 gates come from the issue; the int4 gate is
# the level measured here (0.961 was measured before with 20 other sentences), less a margin.
GATES = {"w8a16": 0.995, "w8a8": 0.995, "w4a16-g128": 0.95, "w4a16-g32": 0.965}


@pytest.fixture(scope="module")
def minilm():
    model = demo.load_sentence_model()
    texts = demo.sentences(20)
    return model, texts, demo.encode(model, texts)


def test_sentences_are_real_disjoint_english():
    a, b = demo.sentences(20), demo.sentences(20, offset=20)
    assert len(set(a)) == 20 and not set(a) & set(b)
    assert all(8 <= len(s.split()) <= 40 for s in a)


@pytest.mark.parametrize("scheme", sorted(GATES))
def test_embedding_fidelity_gate(minilm, scheme):
    model, texts, reference = minilm
    qmodel, backends = demo.quantized_copy(model, scheme)
    assert backends == ["cpu"]
    cos = demo.cosine_to(reference, demo.encode(qmodel, texts))
    assert cos.mean().item() >= GATES[scheme], f"{scheme}: mean cosine {cos.mean().item():.4f}"
    assert cos.mean().item() < 1.0  # the weights really are quantized


def test_quantized_minilm_compiles_and_matches_eager(minilm):
    model, texts, _ = minilm
    qmodel, _ = demo.quantized_copy(model, "w8a16")
    bert = qmodel[0].auto_model
    features = qmodel.tokenize(texts[:4])
    ids, mask = features["input_ids"], features["attention_mask"]
    with torch.inference_mode():
        eager = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(bert, fullgraph=True)
        traced = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-4)


def test_cli_demo_prints_one_row_per_scheme(capsys):
    assert main(["demo", "--schemes", "w8a16", "--sentences", "4"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "w8a16" in out and "mean cos" in out


def test_cli_demo_reports_a_missing_model_directory(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "absent")]) == 2
    assert "no sentence-transformers model directory" in capsys.readouterr().err


def test_cli_demo_reports_a_bad_scheme(capsys):
    assert main(["demo", "--schemes", "w3a16", "--sentences", "2"]) == 2
    assert "cannot parse scheme 'w3a16'" in capsys.readouterr().err


def test_calibration_wins_back_int4_accuracy_on_minilm(minilm):
    # A small version of bench/calibration.py: 128 calibration sentences (disjoint from the
    # evaluation ones), one per batch so that no padding enters the statistics.
    import copy

    import lowbit
    from lowbit.calibrate import GPTQ, SmoothQuant

    model, texts, reference = minilm
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    calibration = [tokenize([t]) for t in demo.sentences(128, offset=400)]

    def forward(m, features):
        return m(dict(features))

    def cosine(scheme, **kw):
        q = copy.deepcopy(model)
        lowbit.quantize(q, scheme, calibration=calibration, calibration_forward=forward, progress=False, **kw)
        return demo.cosine_to(reference, demo.encode(q, texts)).mean().item()

    rtn = cosine("w4a16-g128")
    gptq = cosine("w4a16-g128", method=GPTQ(act_order=True))
    assert gptq > rtn + 0.015 and gptq > 0.975, (rtn, gptq)
    static = cosine("w8a8-static", observer="minmax")
    smooth = cosine("w8a8-static", method=SmoothQuant(alpha=0.8), observer="minmax")
    assert smooth > 0.99 and smooth > static, (static, smooth)
