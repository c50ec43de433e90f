"""The replacement pass on arbitrary module trees: selection, overrides, ties, report."""

from __future__ import annotations

import lowbit
import pytest
import torch
from conftest import net
from lowbit.nn import QuantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from torch import nn


def test_quantizes_every_eligible_layer_and_reports_the_rest():
    model, x = net(), torch.randn(2, 5, 128)
    y = model(x)
    report = lowbit.quantize(model, "w4a16-g64")
    by_name = {r.name: r for r in report}
    assert isinstance(model.blocks[1].mlp[2], W4A16Linear) and isinstance(model.blocks[0].attn["k"], W4A16Linear)
    assert "multiple of the group size" in by_name["odd"].reason and isinstance(model.odd, nn.Linear)
    assert "tiny" in by_name["head"].reason
    assert "MultiheadAttention" in by_name["mha.out_proj"].reason
    assert by_name["blocks.0.mlp.0"].backend == "cpu"
    assert report.bytes_after() < report.bytes_before()
    text = str(report)
    assert "blocks.0.attn.q" in text and "Linear layers quantized" in text
    out = model(x)
    assert ((out - y).norm() / y.norm()).item() < 0.1


def test_shared_modules_and_tied_weights_are_quantized_once():
    model = net()
    report = lowbit.quantize(model, "w8a16")
    assert model.shared is model.alias and isinstance(model.shared, W8A16Linear)
    assert [r.name for r in report].count("shared") == 1 and "also at alias" in {r.name: r for r in report}["shared"].reason
    assert model.tied_a.store is model.tied_b.store
    assert model.tied_b.bias is not None and model.tied_a.bias is None
    assert {r.name: r for r in report}["tied_b"].bytes_after == 0


def test_include_exclude_filter_and_overrides():
    model = net()
    report = lowbit.quantize(
        model, "w8a8",
        include=["blocks.*", "shared"],
        exclude=["*.attn.k"],
        filter_fn=lambda m, name: name != "blocks.1.mlp.2",
        overrides={"blocks.0.mlp.*": "w4a16-g32", "blocks.1.attn.q": None},
    )
    assert isinstance(model.blocks[0].mlp[0], W4A16Linear) and model.blocks[0].mlp[0].group_size == 32
    assert isinstance(model.blocks[0].attn["q"], W8A8Linear)
    assert type(model.blocks[0].attn["k"]) is nn.Linear
    assert type(model.blocks[1].attn["q"]) is nn.Linear
    assert type(model.blocks[1].mlp[2]) is nn.Linear
    assert type(model.tied_a) is nn.Linear and isinstance(model.shared, W8A8Linear)
    reasons = {r.name: r.reason for r in report}
    assert reasons["blocks.1.attn.q"].startswith("override") and reasons["tied_a"] == "not matched by include"
    assert reasons["blocks.1.mlp.2"] == "filter_fn returned False" and reasons["blocks.1.attn.k"] == "matched by exclude"


def test_config_dataclass_and_keywords_agree():
    a, b = net(), net()
    lowbit.quantize(a, lowbit.QuantConfig("w4a16-g128", exclude=["shared"]))
    lowbit.quantize(b, "w4a16-g128", exclude=["shared"])
    x = torch.randn(3, 128)
    assert torch.equal(a(x), b(x))


def test_static_w8a8_needs_activation_scales():
    with pytest.raises(ValueError, match="activation scale"):
        lowbit.quantize(net(), "w8a8-static")
    model = net()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    lowbit.quantize(model, "w8a8-static", act_scales={n: torch.tensor([0.1]) for n in names})
    assert model.blocks[0].mlp[0].act_scale.item() == pytest.approx(0.1)


def test_nan_weights_fail_with_the_layer_name():
    model = net()
    with torch.no_grad():
        model.blocks[1].mlp[0].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.0"):
        lowbit.quantize(model, "w8a8")


def test_dequantize_restores_float_linears_with_ties():
    model, x = net(), torch.randn(2, 128)
    lowbit.quantize(model, "w4a16-g64")
    y = model(x)
    lowbit.dequantize(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.shared is model.alias and model.tied_a.weight is model.tied_b.weight
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4)


def test_quantized_model_compiles_fullgraph_and_matches_eager():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    lowbit.quantize(model, "w8a8", overrides={"2": "w4a16-g32", "4": "w8a16"})
    x = torch.randn(7, 128)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
