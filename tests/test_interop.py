"""GPTQ, AWQ and compressed-tensors checkpoints (lowbit.interop), checked by clients no one
here wrote:

* lowbit -> format -> lowbit is bit-exact for every format and scheme the format holds;
* the compressed-tensors package decompresses lowbit's exports (and converts its AWQ
  export) to dense weights equal to lowbit's dequantization, and transformers' own loader
  runs them with the lowbit model's logits (a random Llama; all-MiniLM-L6-v2's real
  weights);
* GPTQModel quantizes a model to GPTQ (act-order, asymmetric, v1) and AWQ, which lowbit
  loads with exactly GPTQModel's dequantized weights; GPTQModel loads lowbit's exports
  with exactly lowbit's;
* what a format cannot hold, or lowbit cannot serve, is refused naming the layer or field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import lowbit
import pytest
import torch
from lowbit import cli, demo, interop
from lowbit.checkpoint import CheckpointError
from lowbit.nn import CANONICAL, QuantLinear
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

CLIENT = Path(__file__).parent / "clients" / "gptqmodel_client.py"
# GPTQModel's venv (`make test` builds it and sets the variable): see the Makefile.
GPTQMODEL_PYTHON = os.environ.get("LOWBIT_GPTQMODEL_PYTHON",
                                  str(Path(__file__).parents[1] / ".venv-gptqmodel" / "bin" / "python"))
VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer, which the Llama borrows


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A float bf16 Llama directory with a tokenizer (GPTQModel calibrates on text)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer = Path(demo.default_model_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(tokenizer / name, path / name)
    return path


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def quantized(path, scheme, scale_dtype, dtype=torch.bfloat16):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    calibration = [ids(1)] if lowbit.Scheme.parse(scheme).static_activations else None
    lowbit.quantize(model, scheme, exclude=["lm_head"], progress=False, scale_dtype=scale_dtype,
                    calibration=calibration, calibration_forward=lambda m, b: m(input_ids=b, use_cache=False))
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits.float()


CASES = [("compressed-tensors", "w4a16-g32", {}), ("compressed-tensors", "w4a16-g64-sym", {}),
         ("compressed-tensors", "w4a16-gK", {}), ("compressed-tensors", "w8a16", {}),
         ("compressed-tensors", "w8a8", {}), ("compressed-tensors", "w8a8-static", {}),
         ("gptq", "w4a16-g32-sym", {}), ("gptq", "w4a16-g64", {"checkpoint_format": "gptq_v2"}),
         ("gptq", "w4a16-gK-sym", {}), ("gptq", "w8a16", {}),
         ("awq", "w4a16-g32", {}), ("awq", "w4a16-g128-sym", {})]


@pytest.fixture(scope="module")
def exports(llama_dir, tmp_path_factory):
    """Each case's lowbit model and its export."""
    made = {}
    for fmt, scheme, options in CASES:
        scale_dtype = interop.format_for(fmt).scale_dtype or torch.bfloat16
        model = quantized(llama_dir, scheme, scale_dtype)
        out = tmp_path_factory.mktemp(f"{fmt}-{scheme}")
        shutil.rmtree(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", interop.EngineWarning)
            interop.export(model, out, fmt, source=llama_dir, **options)
        made[fmt, scheme] = model, out
    return made


@pytest.mark.parametrize("fmt, scheme", [(f, s) for f, s, _ in CASES])
def test_export_then_import_is_bit_exact(exports, fmt, scheme):
    model, out = exports[fmt, scheme]
    back = lowbit.load_pretrained(out)
    mine, theirs = layers(model), layers(back)
    assert mine.keys() == theirs.keys() and len(mine) == 14
    for name in mine:
        a, b = mine[name].canonical(), theirs[name].canonical()
        assert a.scheme == b.scheme, name
        for part in CANONICAL:
            x, y = getattr(a, part), getattr(b, part)
            assert (x is None) == (y is None) and (x is None or torch.equal(x.reshape(-1), y.reshape(-1))), \
                (name, part)
    assert torch.equal(logits(model), logits(back))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == fmt
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def _ct_scheme(config, name):
    group = config.config_groups["group_0"]
    assert group.targets == ["Linear"] and "lm_head" in config.ignore
    return group


@pytest.mark.parametrize("scheme", [s for f, s, _ in CASES if f == "compressed-tensors"])
def test_compressed_tensors_decompresses_lowbit_exports_to_lowbits_weights(exports, scheme):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, out = exports["compressed-tensors", scheme]
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    group = _ct_scheme(config, scheme)
    compressor = BaseCompressor.get_value_from_registry(group.format)
    tensors = load_file(out / "model.safetensors")
    for name, layer in layers(model).items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dense = compressor.decompress(own, group)["weight"]
        expected = layer.canonical().dequantize(torch.bfloat16)
        assert dense.dtype == torch.bfloat16 and torch.equal(dense, expected), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("scheme", ["w4a16-g64-sym", "w8a16", "w8a8", "w4a16-g32"])
def test_transformers_runs_compressed_tensors_exports(exports, scheme):
    model, out = exports["compressed-tensors", scheme]
    options = {}
    if scheme == "w4a16-g32":
        # transformers 5.24 with compressed-tensors 0.20 builds asymmetric pack-quantized layers
        # with an unpacked zero point, so its default path refuses every asymmetric
        # checkpoint (compressed-tensors' own too); it loads them dequantized.
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, **options).eval()
    a, b = logits(model), logits(theirs)
    # The same integer weights and scales, both in bf16; transformers multiplies the dense
    # dequantized weight (and for W8A8 rounds activations by compressed-tensors' rule).
    assert (a - b).abs().max() <= 0.03 * a.abs().max()


def test_transformers_runs_a_real_models_export(tmp_path):
    """all-MiniLM-L6-v2's trained weights, W4A16 symmetric, through transformers' loader."""
    from sentence_transformers import SentenceTransformer

    source = demo.default_model_dir()
    st = SentenceTransformer(source, device="cpu").eval()
    lowbit.quantize(st, "w4a16-g128-sym", progress=False, scale_dtype=torch.float32)
    interop.export(st, tmp_path / "ct", "compressed-tensors", source=source)
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "ct").eval()
    tok = transformers.AutoTokenizer.from_pretrained(source)
    batch = tok(demo.sentences(4), return_tensors="pt", padding=True)
    with torch.no_grad():
        a = st[0].auto_model(**batch).last_hidden_state
        b = theirs(**batch).last_hidden_state
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    back = lowbit.load_pretrained(tmp_path / "ct")  # a sentence-transformers directory again
    sentences = demo.sentences(4)
    assert torch.equal(back.encode(sentences, convert_to_tensor=True), st.encode(sentences, convert_to_tensor=True))


@pytest.mark.parametrize("scheme", ["w4a16-g32", "w4a16-g128-sym"])
def test_compressed_tensors_awq_converter_reads_lowbits_awq(exports, scheme):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    model, out = exports["awq", scheme]
    converter = AutoAWQConverter.from_pretrained(str(out))
    converted = converter.process(load_file(out / "model.safetensors"))
    group = converter._build_quant_config().config_groups["config_group_0"]
    for name, layer in layers(model).items():
        own = {k[len(name) + 1:]: v for k, v in converted.items() if k.startswith(name + ".")}
        dense = PackedQuantizationCompressor.decompress(own, group)["weight"]
        assert torch.equal(dense, layer.canonical().dequantize(torch.float16)), name


# --- GPTQModel, the GPTQ / AWQ toolkit, as writer and reader ------------------------------------------


@pytest.fixture(scope="module")
def gptqmodel(llama_dir, exports, tmp_path_factory):
    """One GPTQModel process: it quantizes the Llama to GPTQ (act-order, asymmetric, v1)
    and AWQ, and dequantizes those and lowbit's GPTQ and AWQ exports (an act-order one
    among them: GPTQModel's act-order checkpoint, re-exported by lowbit)."""
    if not Path(GPTQMODEL_PYTHON).is_file():
        pytest.skip(f"no GPTQModel venv at {GPTQMODEL_PYTHON} (make test builds it)")
    work = tmp_path_factory.mktemp("gptqmodel")
    torch.save(ids(), work / "ids.pt")
    ours = {"gptq-sym": exports["gptq", "w4a16-g32-sym"][1], "gptq-v2": exports["gptq", "w4a16-g64"][1],
            "awq": exports["awq", "w4a16-g32"][1]}
    jobs = [{"quantize": str(llama_dir), "out": str(work / "their-gptq"), "method": "gptq", "group": 32, "sym": False,
             "desc_act": True},
            {"quantize": str(llama_dir), "out": str(work / "their-awq"), "method": "awq", "group": 32, "sym": False}]
    spec = work / "jobs.json"
    spec.write_text(json.dumps({"ids": str(work / "ids.pt"), "jobs": jobs}))
    _run_client(spec)
    # lowbit re-exports GPTQModel's act-order checkpoint: the permutation goes back into g_idx.
    interop.export(lowbit.load_pretrained(work / "their-gptq"), work / "our-act-order", "gptq",
                   source=work / "their-gptq")
    ours["act-order"] = work / "our-act-order"
    dirs = {"their-gptq": work / "their-gptq", "their-awq": work / "their-awq", **ours}
    jobs = [{"dequantize": str(path), "out": str(work / f"{key}.pt"), "method": "awq" if "awq" in key else "gptq"}
            for key, path in dirs.items()]
    spec.write_text(json.dumps({"ids": str(work / "ids.pt"), "jobs": jobs}))
    _run_client(spec)
    return {key: (path, torch.load(work / f"{key}.pt")) for key, path in dirs.items()}


def _run_client(spec):
    done = subprocess.run([GPTQMODEL_PYTHON, str(CLIENT), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("key", ["their-gptq", "their-awq", "gptq-sym", "gptq-v2", "awq", "act-order"])
def test_gptqmodel_and_lowbit_agree_on_every_weight(gptqmodel, key):
    path, theirs = gptqmodel[key]
    model = lowbit.load_pretrained(path)
    ours = layers(model)
    assert ours.keys() == theirs["weights"].keys() and len(ours) == 14
    for name, layer in ours.items():
        # GPTQModel dequantizes in float16: lowbit's exact weight rounded once to float16.
        assert torch.equal(theirs["weights"][name], layer.canonical().effective().half()), name
    if key == "their-gptq":
        assert all(layer.packed.input_perm is not None for layer in ours.values())  # act-order kept
    if key == "act-order":
        config = json.loads((path / "config.json").read_text())["quantization_config"]
        assert config["desc_act"] is True
    # Logits: lowbit's CPU kernels against GPTQModel's torch kernels, both float16.
    a, b = logits(model.half()), theirs["logits"].float()
    assert (a - b).abs().max() <= 0.01 * b.abs().max()


def test_act_order_layers_go_to_gptq_only(gptqmodel, tmp_path):
    model = lowbit.load_pretrained(gptqmodel["their-gptq"][0])
    for fmt in ("compressed-tensors", "awq"):
        with pytest.raises(interop.ExportError, match="model.layers.0.self_attn.q_proj.*: .*(g_idx|consecutive)"):
            interop.export(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists() or not any((tmp_path / fmt).iterdir())


# --- refusals --------------------------------------------------------------------------------------


def test_export_refuses_what_a_format_cannot_hold(exports, llama_dir, tmp_path):
    w8a8 = exports["compressed-tensors", "w8a8"][0]
    with pytest.raises(interop.ExportError, match="gptq cannot hold 14 layer.*w8a8.*compressed-tensors"):
        interop.export(w8a8, tmp_path / "a", "gptq")
    with pytest.raises(interop.ExportError, match="awq holds 4-bit weights only"):
        interop.export(exports["compressed-tensors", "w8a16"][0], tmp_path / "b", "awq")
    # Scales that are not float16 values (float32 here): refused, not rounded.
    fp32_scales = quantized(llama_dir, "w4a16-g32", None)
    with pytest.raises(interop.ExportError, match=r"q_proj.*: scales are not torch.float16 values"):
        interop.export(fp32_scales, tmp_path / "c", "gptq", checkpoint_format="gptq_v2")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing written
    # Mixed schemes: one config group each in compressed-tensors, refused by GPTQ.
    mixed = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    lowbit.quantize(mixed, "w4a16-g32-sym", include=["*self_attn*"], progress=False, scale_dtype=torch.float16)
    lowbit.quantize(mixed, "w8a16", include=["*mlp*"], progress=False, scale_dtype=torch.float16)
    with pytest.raises(interop.ExportError, match="one scheme for every quantized layer"):
        interop.export(mixed, tmp_path / "d", "gptq")
    interop.export(mixed, tmp_path / "e", "compressed-tensors", source=llama_dir, scale_dtype=torch.float16)
    assert torch.equal(logits(lowbit.load_pretrained(tmp_path / "e")), logits(mixed))


def test_gptq_v1_cannot_hold_a_zero_point_of_zero(llama_dir, tmp_path):
    model = quantized(llama_dir, "w4a16-g32", torch.float16)
    layer = model.model.layers[1].mlp.down_proj
    w = layer.canonical()
    w.zeros[3, 0] = 0
    layer.store = lowbit.nn.WeightStore.build(w)
    with pytest.raises(interop.ExportError, match=r"model.layers.1.mlp.down_proj: 1 group\(s\) have zero point 0"):
        interop.export(model, tmp_path / "v1", "gptq")
    interop.export(model, tmp_path / "v2", "gptq", checkpoint_format="gptq_v2")
    assert torch.equal(logits(lowbit.load_pretrained(tmp_path / "v2")), logits(model))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensor(path, key, change):
    tensors = load_file(path / "model.safetensors")
    tensors[key] = change(tensors[key])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("fmt, scheme, edit, match", [
    ("gptq", "w4a16-g32-sym", lambda p: _edit_config(p, bits=3), "bits = 3"),
    ("gptq", "w4a16-g32-sym", lambda p: _edit_config(p, checkpoint_format="marlin"), "checkpoint_format = 'marlin'"),
    ("gptq", "w4a16-g32-sym", lambda p: _edit_config(p, dynamic={r"+:.*down_proj": {"bits": 8}}), "dynamic"),
    ("gptq", "w4a16-g32-sym", lambda p: _edit_config(p, group_size=64), "group_size = 64 but scales"),
    # A stored 15 read as v1 (zero - 1) is a zero point of 16.
    ("gptq", "w4a16-g64", lambda p: (_edit_tensor(p, "model.layers.0.self_attn.q_proj.qzeros", lambda t: t | 0xF),
                                     _edit_config(p, checkpoint_format="gptq")), "q_proj.*qzeros: .* read as 16"),
    ("awq", "w4a16-g32", lambda p: _edit_config(p, version="gemv"), "version = 'gemv'"),
    ("compressed-tensors", "w4a16-g32", lambda p: _edit_config(p, sparsity_config={"format": "sparse-24"}),
     "sparsity_config"),
    ("compressed-tensors", "w4a16-g32", lambda p: _edit_config(p, quantization_status="frozen"), "frozen"),
    ("compressed-tensors", "w8a8", lambda p: _edit_tensor(p, "model.layers.0.mlp.up_proj.weight",
                                                          lambda t: t.index_fill(1, torch.tensor([5]), -128)),
     "model.layers.0.mlp.up_proj.*-128"),
    ("compressed-tensors", "w8a8", lambda p: _edit_config(p, ignore=["lm_head", "re:.*up_proj"]),
     "up_proj.*ignore list"),
])
def test_import_refuses_what_lowbit_cannot_serve(exports, tmp_path, fmt, scheme, edit, match):
    path = tmp_path / "copy"
    shutil.copytree(exports[fmt, scheme][1], path)
    edit(path)
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_pretrained(path)


# --- command line ----------------------------------------------------------------------------------


def test_command_line_export(llama_dir, tmp_path, capsys):
    assert cli.main(["export", str(llama_dir), "--scheme", "w4a16-g32", "--format", "gptq",
                     "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert "exported 14 quantized layer(s) as gptq" in printed and "warning: vLLM's Marlin" in printed
    model = lowbit.load_pretrained(tmp_path / "g")
    assert torch.equal(logits(model), logits(quantized(llama_dir, "w4a16-g32", torch.float16)))
    # A quantized directory converts without --scheme.
    assert cli.main(["export", str(tmp_path / "g"), "--format", "awq", "--out", str(tmp_path / "a")]) == 0
    assert torch.equal(logits(lowbit.load_pretrained(tmp_path / "a")), logits(model))
    assert cli.main(["export", str(llama_dir), "--format", "awq", "--out", str(tmp_path / "x")]) == 2
    assert "give --scheme" in capsys.readouterr().err
