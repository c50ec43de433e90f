"""Model directories: save / load without float copies, and the streaming quantizer.

A random-initialised transformers Llama (small, bf16) stands in for a real LM: the
streaming quantizer must give bit for bit the model that ``lowbit.quantize`` gives in
memory (RTN and GPTQ), through shards, and loading must never allocate a float copy of a
quantized weight.
"""

from __future__ import annotations

import shutil

import lowbit
import pytest
import torch
from lowbit import checkpoint, demo
from lowbit.nn import QuantLinear
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN = 320, 128, 384


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A float Llama directory (bf16 safetensors, untied head, no tokenizer)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def in_memory(path, scheme, **kw):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    lowbit.quantize(model, scheme, exclude=["lm_head"], progress=False,
                    calibration_forward=lambda m, b: m(input_ids=b, use_cache=False), **kw)
    return model


def ids(seed=0, batch=2, length=16):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("scheme, method", [("w4a16-g64", "rtn"), ("w8a8", "rtn"), ("w4a16-g32-sym", "gptq"),
                                            ("w8a16", "gptq")])
def test_streaming_quantize_equals_in_memory_quantize(llama_dir, tmp_path, scheme, method):
    kw = {"method": method} | ({"calibration": [ids(s, 2, 24) for s in range(3)]} if method == "gptq" else {})
    expected = in_memory(llama_dir, scheme, **kw)
    report = lowbit.quantize_pretrained(llama_dir, tmp_path / "q", scheme, exclude=["lm_head"], progress=False,
                                        max_shard_size="40KB", **kw)
    assert len(report.quantized) == 21 and (tmp_path / "q" / checkpoint.INDEX_FILE).exists()
    model = lowbit.load_pretrained(tmp_path / "q")
    assert torch.equal(logits(model, ids(9)), logits(expected, ids(9)))
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and str(layer.scheme) == scheme
    for name, q in model.named_modules():  # the very same codes and scales
        if isinstance(q, QuantLinear):
            a, b = q.canonical(), expected.get_submodule(name).canonical()
            assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors()), name


def test_streaming_keeps_the_checkpoint_dtype_and_copies_the_support_files(llama_dir, tmp_path):
    lowbit.quantize_pretrained(llama_dir, tmp_path / "q", "w4a16-g64", progress=False)
    model = lowbit.load_pretrained(tmp_path / "q")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # not upcast
    assert isinstance(model.lm_head, QuantLinear)  # outside the blocks: rounded to nearest
    assert (tmp_path / "q" / "generation_config.json").exists()
    config = (tmp_path / "q" / "config.json").read_text()
    assert '"quant_method": "lowbit"' in config
    out = model.generate(ids(1, 1, 4), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    with pytest.raises(FileExistsError):
        lowbit.quantize_pretrained(llama_dir, tmp_path / "q", "w8a8", progress=False)


class AllocationSpy(TorchDispatchMode):
    """Records (dtype, shape) of every tensor with storage (not on meta) an op creates."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.created.append((t.dtype, tuple(t.shape)))
        return out


def test_loading_never_allocates_a_float_copy_of_a_quantized_weight(llama_dir, tmp_path):
    lowbit.quantize_pretrained(llama_dir, tmp_path / "q", "w4a16-g64", exclude=["lm_head"], progress=False)
    with AllocationSpy() as spy:
        model = lowbit.load_pretrained(tmp_path / "q")
    quantized = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    floats = {shape for dtype, shape in spy.created if dtype.is_floating_point}
    assert spy.created and not floats & quantized, floats & quantized
    assert not checkpoint.meta_tensors(model)
    # the spy sees float allocations: it would catch a float skeleton being filled
    with AllocationSpy() as spy:
        transformers.LlamaForCausalLM(model.config)
    assert {shape for dtype, shape in spy.created if dtype.is_floating_point} & quantized


def test_an_interrupted_streaming_run_leaves_nothing_that_loads(llama_dir, tmp_path, monkeypatch):
    real = checkpoint.save_file
    calls = []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize_pretrained(llama_dir, tmp_path / "q", "w4a16-g64", progress=False, max_shard_size="40KB")
    with pytest.raises((FileNotFoundError, checkpoint.CheckpointError)):
        lowbit.load_pretrained(tmp_path / "q")
    with pytest.raises(FileNotFoundError):
        checkpoint.checkpoint_files(tmp_path / "q")
    assert not list((tmp_path / "q").glob("*.safetensors"))


def test_sentence_transformers_directories_round_trip(tmp_path):
    st = demo.load_sentence_model()
    source = demo.default_model_dir()
    lowbit.quantize(st, "w4a16-g128", progress=False)
    lowbit.save_pretrained(st, tmp_path / "st", source=source, max_shard_size="8MB")
    loaded = lowbit.load_pretrained(tmp_path / "st")
    assert type(loaded).__name__ == "SentenceTransformer" and (tmp_path / "st" / "modules.json").exists()
    sentences = demo.sentences(3)
    assert torch.equal(loaded.encode(sentences, convert_to_tensor=True), st.encode(sentences, convert_to_tensor=True))


def test_load_pretrained_refuses_a_float_directory(llama_dir, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a quantized model directory lowbit reads"):
        lowbit.load_pretrained(llama_dir)
    shutil.copytree(llama_dir, tmp_path / "copy")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        lowbit.quantize_pretrained(tmp_path / "missing", tmp_path / "out", "w8a8")
