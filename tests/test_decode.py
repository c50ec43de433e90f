"""lowbit.decode.Decoder: the same greedy tokens as transformers' generate, eager and
compiled, float and quantized, on a tiny random Llama (fp32, so that one rounding more or
less inside a compiled graph cannot flip an argmax); bad arguments named."""

import pytest
import torch

pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.bench import generate  # noqa: E402
from lowbit.decode import Decoder  # noqa: E402


def _hf_greedy(model, ids, new):
    with torch.inference_mode():
        return generate._generate(model, ids, new, "eager")


@pytest.mark.parametrize("scheme", [None, "w8a8", "w4a16-g32"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tokens_are_generates(tiny_llama_dir, scheme, compiled):
    model = generate.load(tiny_llama_dir, dtype=torch.float32)
    if scheme:
        lowbit.quantize(model, scheme, progress=False)
    ids = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _hf_greedy(model, ids, 12)
    decoder = Decoder(model, max_length=32, batch_size=2, compile=compiled)
    assert torch.equal(decoder.generate(ids, 12), want)
    # A second call starts from an empty cache: another prompt, its own tokens.
    other = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(decoder.generate(other, 7), _hf_greedy(model, other, 7))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_tokens_across_attention_windows(tiny_llama_dir, monkeypatch, compiled):
    # Windows of 4, 8, 16 and 20 positions: prefill in one, decode through the rest; each
    # compiled window is a graph of its own, and the tokens stay generate's.
    from lowbit import decode

    monkeypatch.setattr(decode, "MIN_WINDOW", 4)
    monkeypatch.setattr(decode, "WINDOW_GROWTH", 2)
    model = generate.load(tiny_llama_dir, dtype=torch.float32)
    lowbit.quantize(model, "w4a16-g32", progress=False)
    decoder = Decoder(model, max_length=20, compile=compiled)
    assert decoder.windows() == [4, 8, 16, 20]
    ids = torch.randint(256, (1, 6), generator=torch.Generator().manual_seed(4))
    torch._dynamo.utils.counters.clear()
    assert torch.equal(decoder.generate(ids, 14), _hf_greedy(model, ids, 14))
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3  # windows 8, 16 and 20
    assert torch.equal(decoder.generate(ids[:, :2], 9), _hf_greedy(model, ids[:, :2], 9))


def test_the_compiled_step_compiles_once(tiny_llama_dir):
    model = generate.load(tiny_llama_dir, dtype=torch.float32)
    decoder = Decoder(model, max_length=24)
    ids = torch.randint(256, (1, 4), generator=torch.Generator().manual_seed(3))
    torch._dynamo.utils.counters.clear()
    decoder.generate(ids, 10)
    decoder.generate(ids[:, :3], 12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_bad_arguments_are_named(tiny_llama_dir):
    model = generate.load(tiny_llama_dir, dtype=torch.float32)
    decoder = Decoder(model, max_length=16, compile=False)
    with pytest.raises(ValueError, match="do not fit max_length 16"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match=r"int64 \[1, n\]"):
        decoder.generate(torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"int64 \[1, n\]"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="ids are on meta, the model on cpu"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long, device="meta"), 3)
    with pytest.raises(TypeError, match="transformers causal LM"):
        Decoder(torch.nn.Linear(4, 4), max_length=8)
