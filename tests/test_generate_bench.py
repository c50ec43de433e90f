"""The whole-model generation benchmark (lowbit.bench.generate, `lowbit bench --generate`)
on a tiny random Llama: rows for every variant and test, a profile whose parts add up,
and the CLI end to end. Timing targets live in bench/llm.py, not here."""

import pytest
import torch

pytest.importorskip("transformers")

from lowbit.bench import generate  # noqa: E402


def test_run_rows_and_table(tiny_llama_dir):
    models = generate.variants(generate.load(tiny_llama_dir), ["w8a8", "w4a16-g32"])
    assert set(models) == {"bfloat16", "w8a8", "w4a16-g32"}
    # The copies are quantized; the float model is left alone.
    assert type(models["w8a8"].model.layers[0].mlp.up_proj).__name__ != "Linear"
    assert type(models["bfloat16"].model.layers[0].mlp.up_proj) is torch.nn.Linear
    rows = generate.run(models, ["eager"], prompts=[8], decode=32, batches=[1, 2], rounds=1, progress=False)
    keys = {(r.variant, r.test, r.batch) for r in rows}
    assert keys == {(v, t, b) for v in models for t, b in [("pp8", 1), ("tg32", 1), ("tg32", 2)]}
    assert all(r.tokens_per_s > 0 and r.spread >= 0 for r in rows)
    lines = generate.table(rows).splitlines()
    assert lines[0] == "| variant | mode | pp8 | tg32 b1 | tg32 b2 |"
    assert len(lines) == 2 + len(models)


def test_decode_greedy_is_deterministic(tiny_llama_dir):
    # decode_seconds subtracts two generate calls; both must run the full length (no early stop).
    model = generate.load(tiny_llama_dir)
    ids = torch.randint(256, (1, generate.PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        model.generation_config.eos_token_id = int(first[0, -1])  # the first token generated ends a sequence
        out = generate._generate(model, ids, 5, "eager")
    assert out.shape == (1, generate.PROMPT + 5)
    assert torch.equal(out[:, :first.shape[1]], first)
    assert model.generation_config.eos_token_id == int(first[0, -1])  # the model's config untouched


@pytest.mark.parametrize("scheme", [None, "w4a16-g32"])
def test_profile_parts_add_up(tiny_llama_dir, scheme):
    model = list(generate.variants(generate.load(tiny_llama_dir), [scheme] if scheme else []).values())[-1]
    for split in (generate.profile_decode(model, steps=16), generate.profile_generate(model, new=4)):
        parts = [split[k] for k in generate.CATEGORIES]
        assert split["total"] > 0
        assert sum(parts) == pytest.approx(split["total"], rel=0.05, abs=0.05)
    # One whole call, no difference of two timings: every category that ran is there.
    if scheme:
        assert split["lowbit ops"] > 0 and split["float matmuls"] == 0
    else:
        assert split["lowbit ops"] == 0 and split["float matmuls"] > 0
    assert split["attention"] > 0 and split["norms"] > 0


def test_split_decode_times_the_compiled_step_and_the_layers(tiny_llama_dir):
    model = generate.variants(generate.load(tiny_llama_dir), ["w8a8"])["w8a8"]
    split = generate.split_decode(model, steps=16, rounds=3)  # medians: one difference of two calls is noise at this size
    assert split["decode step"] > split["compiled forward"] > 0 and split["lowbit layers alone"] > 0
    assert split["generate's own loop"] == pytest.approx(split["decode step"] - split["compiled forward"])
    assert "get_compiled_call" not in vars(model)  # the timing wrapper is gone again
    # lowbit's decoder: its step, and the matmuls in it (a difference of two profiles, too
    # noisy at 16 tiny steps to order against the step: the 491.8M rows are in RESULTS.md).
    assert split["decoder step"] > 0 and split["decoder: matmul ops (profiled)"] != 0
    assert split["decoder: the rest"] == pytest.approx(split["decoder step"] - split["decoder: matmul ops (profiled)"])


def test_cli_generate(tiny_llama_dir, capsys):
    from lowbit import cli

    cli.main(["bench", "--generate", "--model", str(tiny_llama_dir), "--schemes", "w8a16", "--prompts", "8",
              "--decode", "3", "--rounds", "1", "--modes", "eager,decoder"])
    out = capsys.readouterr().out
    assert "| w8a16 | eager |" in out and "| bfloat16 | eager |" in out
    # The decoder times decode only: its prefill cell is empty.
    assert "| w8a16 | decoder |  | " in out


def test_unknown_mode_is_named(tiny_llama_dir):
    model = generate.load(tiny_llama_dir)
    with pytest.raises(ValueError, match="unknown generation mode 'fast'"):
        generate.decode_seconds(model, torch.zeros(1, 4, dtype=torch.long), 2, "fast")


def test_cli_generate_needs_model(capsys):
    from lowbit import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "--generate"])
    assert "--model" in capsys.readouterr().err


def test_compiled_decode_is_one_graph_with_lowbit_ops_inside(tiny_llama_dir):
    # Static cache + torch.compile(fullgraph=True): any graph break would raise; every
    # decode step's quantized (fused) layers run inside the compiled region.
    import lowbit
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    model = generate.load(tiny_llama_dir)
    lowbit.quantize(model, "w4a16-g32", progress=False)
    groups = {id(m.store.group) if hasattr(m.store, "group") else id(m)
              for m in model.modules() if isinstance(m, lowbit.nn.QuantLinear)}
    torch._dynamo.reset()
    ids = torch.randint(256, (1, generate.PROMPT), generator=torch.Generator().manual_seed(0))
    new = 5
    with torch.inference_mode():
        generate._generate(model, ids, new, "compiled")  # compiles
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate._generate(model, ids, new, "compiled")

    def compiled_region(event):
        while event is not None:
            if event.name.startswith("Torch-Compiled"):
                return True
            event = event.cpu_parent
        return False

    outer = [e for e in prof.events() if e.name.startswith("lowbit::")
             and not (e.cpu_parent and e.cpu_parent.name.startswith("lowbit::"))]
    inside = [e for e in outer if compiled_region(e)]
    # The prefill runs eager; each of the new - 1 decode steps runs every quantized GEMM
    # (one per fused group) compiled.
    assert len(inside) == (new - 1) * len(groups)
    assert len(outer) - len(inside) == len(groups)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_decoder_step_by_cache_length(tiny_llama_dir):
    model = generate.variants(generate.load(tiny_llama_dir), ["w4a16-g32"])["w4a16-g32"]
    ms = generate.decoder_step_ms(model, [40, 200], steps=4, rounds=1)
    assert list(ms) == [40, 200] and all(v == v for v in ms.values())  # a number for each length
    # One decoder per cache length, each with the cache it was asked for.
    assert {k: d.max_length for k, d in model._lowbit_decoders.items()} == {(1, 40): 40, (1, 200): 200}
