"""The command line's model tools and bench/tune entry points, through ``lowbit.cli.main``."""

from __future__ import annotations

import lowbit
import pytest
import torch
from lowbit import demo, plan, tools
from lowbit.cli import main


@pytest.fixture(scope="module")
def model_dir():
    return demo.default_model_dir()


def test_quantize_saves_a_checkpoint_that_loads(model_dir, tmp_path, capsys):
    cal = tmp_path / "cal.txt"
    cal.write_text("\n".join(demo.sentences(8, offset=400)))
    out = tmp_path / "q"
    assert main(["quantize", model_dir, "--scheme", "w8a8-static", "--calibration", str(cal), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "36 of 37 Linear layers quantized" in text and "activation observer minmax" in text
    assert "cannot observe its activation scale" in text  # the pooler, after the blocks
    model = lowbit.load_pretrained(out)  # a SentenceTransformer, as the source directory was
    q = model[0].auto_model.encoder.layer[0].intermediate.dense
    assert q.scheme.static_activations and q.act_scale.item() > 0
    assert model.encode(demo.sentences(2)).shape == (2, 384)


def test_inspect_flags_layers_and_plots(model_dir, tmp_path, capsys):
    png = tmp_path / "i.png"
    assert main(["inspect", model_dir, "--scheme", "w4a16-gK", "--sqnr-threshold", "60", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "SQNR dB" in text and "37 layers; 37 below 60 dB" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = tools.inspect_model(model_dir, "w8a8", texts=demo.sentences(4))
    by = {r.name: r for r in rows}
    assert all(r.sqnr_db > 25 for r in rows)  # int8 is far better than int4 per channel
    assert max(r.outlier_channels for r in by.values()) > 0  # BERT has outlier channels


def test_report_memory_and_cost(model_dir, capsys):
    assert main(["report", model_dir, "--schemes", "w8a8,w4a16-g128", "--tokens", "32"]) == 0
    text = capsys.readouterr().out
    assert "w4a16-g128" in text and "H200" in text and "cost/Mtok" in text
    rows = tools.report_memory(shapes="4096x4096", blocks=2, schemes=["w4a16-g128"], measure=False)
    by = {r.scheme: r for r in rows}
    assert by["fp32"].weight_bytes == 2 * 4096 * 4096 * 4
    assert by["w4a16-g128"].weight_bytes == 2 * (4096 * 2048 + 4096 * 32 * 5)  # nibbles, scales, zeros
    assert by["w4a16-g128"].runtime_bytes > 0


def test_bench_and_tune_commands(tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.json"
    assert main(["tune", "--schemes", "w8a8", "--shapes", "128x64", "--out", str(out)]) == 0
    assert "w8a8|cpu|64|128" in capsys.readouterr().out
    monkeypatch.setenv("LOWBIT_PLAN", str(out))
    with plan.use_plan(plan.Plan.load(out)):
        js = tmp_path / "b.json"
        assert main(["bench", "--schemes", "w8a8", "--shapes", "128x64", "--m", "1,4", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "lowbit:cpu[plan]" in text and js.exists()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "/nonexistent", "--out", "x"], "no model directory"),
    (["quantize", "{model}", "--scheme", "w5", "--out", "x"], "cannot parse scheme"),
    (["quantize", "{model}", "--method", "gptq", "--out", "x"], "needs --calibration"),
    (["inspect", "{model}", "--texts", "/nonexistent.txt"], "no text file"),
    (["report"], "give a model directory"),
    (["bench", "--shapes", "gpt-9"], "not a set"),
    (["tune", "--schemes", "w9"], "cannot parse scheme"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, message, model_dir, capsys):
    argv = [a.replace("{model}", model_dir) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    torch.manual_seed(0)
