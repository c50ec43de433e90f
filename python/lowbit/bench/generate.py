"""Whole-model generation timing: prefill and decode of a transformers causal LM, float
against lowbit's schemes, eager and compiled (``lowbit bench --model DIR --generate``,
``bench/llm.py``).

Prefill: one forward of a prompt of N random token ids into an empty cache, logits of
the last position only (as ``generate`` asks for them); tokens per second = N / time.
Decode: greedy ``model.generate`` of 1 and of 1 + D new tokens after a 32-token prompt
(no early stop); tokens per second = D / (difference), so prefill and the first token
cancel out and what is left is D decode steps with everything ``generate`` does around
them. Modes: "eager" is ``generate`` as it comes; "compiled" adds a static cache and
``torch.compile`` of the forward through transformers' own ``compile_config`` (inductor
with its C++ wrapper, fixed shapes); "decoder" is lowbit's own loop over a static cache and
one compiled step per attention window, without guards (``lowbit.decode.Decoder``, the same
greedy tokens; prefill is the model's forward, so it has decode rows only). Every variant
is timed round-robin, ``rounds`` times, and the median kept.

``profile_decode`` splits one decode step (torch.profiler) of any mode into lowbit's ops, float
matmuls, attention, norms, rotary, the rest of torch's ops, what ``generate`` does
outside the model (sampling, stopping, cache bookkeeping), and the Python / dispatch
time no op accounts for. ``split_decode`` times a compiled step without a profiler: the
step, the compiled forward in it, dynamo's guard evaluation in that, and lowbit's layers
alone; and the decoder's step beside the matmuls in it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

# The benchmark Llama of issue-sized dimensions: 491.8M parameters, untied.
LLAMA_491M = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)

PROMPT = 32
MODES = ("eager", "compiled", "decoder")


def build_llama(out: Path, dims: dict | None = None, seed: int = 0) -> Path:
    """A randomly initialised transformers Llama (bf16 safetensors) in ``out``, once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**(dims or LLAMA_491M), torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    return out


def load(model_dir: Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or 0
    return model.eval()


def variants(model: nn.Module, schemes: Sequence[str], **quantize_fields) -> dict[str, nn.Module]:
    """The float model under its dtype's name and a quantized copy per scheme."""
    import lowbit

    name = str(next(model.parameters()).dtype).removeprefix("torch.")
    out = {name: model}
    for scheme in schemes:
        quantized = copy.deepcopy(model)
        lowbit.quantize(quantized, scheme, progress=False, **quantize_fields)
        out[scheme] = quantized
    return out


def _generate(model: nn.Module, ids: torch.Tensor, new: int, mode: str, length: int | None = None) -> torch.Tensor:
    """``ids`` and ``new`` greedy tokens. ``length``: the decoder's static cache length (the
    same for calls that are compared; default prompt + new)."""
    if mode not in MODES:
        raise ValueError(f"unknown generation mode {mode!r}; expected one of {MODES}")
    if mode == "decoder":
        return _decoder(model, ids.shape[0], length or ids.shape[1] + new).generate(ids, new)
    # Exactly ``new`` tokens: with no end-of-sequence token nothing stops generation early.
    # (``min_new_tokens`` would do it through two logits processors that cost about 0.4 ms
    # a step here, more than anything else in generate's loop; llama-bench's decode test
    # samples nothing.) generate fills what its config leaves unset from the model's, so the
    # model's own config goes without one for the call.
    kwargs = dict(max_new_tokens=new, do_sample=False)
    if mode == "compiled":
        from transformers import CompileConfig

        # Inductor's C++ wrapper calls the graph's kernels and ops from C++ instead of
        # generated Python: 0.4-0.5 ms less per decode step of the 491.8M Llama on 2 cores
        # (bench/RESULTS.md). torch.compile takes a mode or options, not both.
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"cpp_wrapper": True})
        config._compile_all_devices = True  # transformers compiles only on GPUs unless told
        kwargs.update(cache_implementation="static", compile_config=config)
    own = model.generation_config
    model.generation_config = copy.deepcopy(own)
    model.generation_config.eos_token_id = None
    try:
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.generation_config = own


def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - t0


def _decoder(model: nn.Module, batch: int, length: int):
    """The model's Decoder for this batch and cache length, made (and compiled) once."""
    from lowbit.decode import Decoder

    decoders = model.__dict__.setdefault("_lowbit_decoders", {})
    if (batch, length) not in decoders:
        decoders[(batch, length)] = Decoder(model, max_length=length, batch_size=batch)
    return decoders[(batch, length)]


def decode_seconds(model: nn.Module, ids: torch.Tensor, steps: int, mode: str) -> float:
    """Seconds for ``steps`` decode steps: generate(1 + steps) - generate(1)."""
    length = ids.shape[1] + 1 + steps
    t0 = time.perf_counter()
    _generate(model, ids, 1, mode, length)
    t1 = time.perf_counter()
    _generate(model, ids, 1 + steps, mode, length)
    t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0)


@dataclasses.dataclass
class GenerateRow:
    variant: str
    mode: str  # one of MODES
    batch: int
    test: str  # "pp32", "pp512", "tg64"
    tokens_per_s: float
    spread: float  # (max - min) / median of the rounds


def run(models: dict[str, nn.Module], modes: Sequence[str] = ("eager",), prompts: Sequence[int] = (32, 512),
        decode: int = 64, batches: Sequence[int] = (1,), rounds: int = 3, seed: int = 0,
        progress: bool = True) -> list[GenerateRow]:
    """Time every model in every mode, round-robin; rows of tokens per second (per sequence
    summed over the batch: batch 4 decoding 10 steps per second is 40 tokens/s)."""
    from tqdm import tqdm

    vocab = next(iter(models.values())).config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    tests = [(f"pp{n}", n, 1) for n in prompts] + [(f"tg{decode}", PROMPT, b) for b in batches]
    inputs = {(n, b): torch.randint(vocab, (b, n), generator=gen) for _, n, b in tests}
    times: dict[tuple, list[float]] = {}
    jobs = [(name, mode, test, n, b) for mode in modes for test, n, b in tests for name in models
            if mode != "decoder" or test.startswith("tg")]
    # Every variant, batch and prompt length compiles the same forward code once more:
    # dynamo's default limit of 8 per code object would stop compiling part-way through.
    with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=max(64, 4 * len(jobs))):
        for name, mode, test, n, b in tqdm(jobs, desc="warm-up", disable=not progress or None):
            _time_one(models[name], mode, test, inputs[(n, b)], decode)  # compiles, fills caches
        for _ in tqdm(range(rounds), desc="rounds", disable=not progress or None):
            for name, mode, test, n, b in jobs:
                times.setdefault((name, mode, test, b), []).append(
                    _time_one(models[name], mode, test, inputs[(n, b)], decode))
    rows = []
    for (name, mode, test, b), ts in times.items():
        tokens = (decode if test.startswith("tg") else int(test[2:])) * b
        med = statistics.median(ts)
        rows.append(GenerateRow(name, mode, b, test, tokens / med, (max(ts) - min(ts)) / med))
    return rows


def _time_one(model: nn.Module, mode: str, test: str, ids: torch.Tensor, decode: int) -> float:
    if test.startswith("pp"):
        forward = model.forward
        if mode == "compiled":
            model.forward = _compiled_forward(model)
        try:
            return prefill_seconds(model, ids)
        finally:
            model.forward = forward
    return decode_seconds(model, ids, decode, mode)


def _compiled_forward(model: nn.Module):
    if not hasattr(model, "_lowbit_prefill_compiled"):
        model._lowbit_prefill_compiled = torch.compile(model.forward, dynamic=False)
    return model._lowbit_prefill_compiled


def table(rows: Sequence[GenerateRow]) -> str:
    """Markdown: a row per variant and mode, a column per test and batch."""
    columns = sorted({(r.test, r.batch) for r in rows}, key=lambda c: (c[0].startswith("tg"), int(c[0][2:]), c[1]))
    keys = list(dict.fromkeys((r.variant, r.mode) for r in rows))
    head = [f"{t} b{b}" if t.startswith("tg") else t for t, b in columns]
    lines = ["| variant | mode | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(columns)]
    found = {(r.variant, r.mode, r.test, r.batch): r for r in rows}
    for v, m in keys:
        cells = []
        for t, b in columns:
            r = found.get((v, m, t, b))
            cells.append("" if r is None else f"{r.tokens_per_s:.1f}")
        lines.append(f"| {v} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- profile ---------------------------------------------------------------------------------

CATEGORIES = ("lowbit ops", "float matmuls", "attention", "norms", "rotary", "other torch ops",
              "compiled graph code", "generate outside the model", "Python / dispatch")


@contextlib.contextmanager
def _labels(model: nn.Module) -> Iterator[None]:
    """record_function ranges around norms, rotary and the model's forward (by class name,
    so any transformers decoder works; what is not found falls into 'other torch ops')."""
    from torch.profiler import record_function

    handles, ranges = [], {}

    def enter(label):
        def pre(module, args, kwargs=None):
            r = record_function(f"lowbit.profile:{label}")
            r.__enter__()
            ranges.setdefault(id(module), []).append(r)
        return pre

    def leave(module, args, output):
        ranges[id(module)].pop().__exit__(None, None, None)

    for module in model.modules():
        cls = type(module).__name__
        label = "norms" if "Norm" in cls else "rotary" if "Rotary" in cls else None
        if module is model:
            label = "model"
        if label:
            handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    # apply_rotary_pos_emb is a function in the modeling module: wrapped for the profile's length.
    patched = []
    for mod in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(mod)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is not None:
            def wrapped(*a, _fn=fn, **k):
                with record_function("lowbit.profile:rotary"):
                    return _fn(*a, **k)
            setattr(module, "apply_rotary_pos_emb", wrapped)
            patched.append((module, fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, fn in patched:
            module.apply_rotary_pos_emb = fn


def _op_category(name: str) -> str | None:
    if name.startswith("lowbit::"):
        return "lowbit ops"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name in ("aten::linear", "aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"):
        return "float matmuls"
    return None


def profile_decode(model: nn.Module, steps: int = 16, mode: str = "eager", seed: int = 0) -> dict[str, float]:
    """Milliseconds per decode step in each of ``CATEGORIES`` (and "total"), from the
    difference of two profiled ``generate`` calls (1 and 1 + steps new tokens)."""
    one, more = _profile(model, (1, 1 + steps), mode, seed)
    return {k: (more[k] - one[k]) * 1e3 / steps for k in one}


def split_decode(model: nn.Module, steps: int = 64, rounds: int = 5, seed: int = 0) -> dict[str, float]:
    """Milliseconds of one compiled decode step, medians of ``rounds``, without a profiler:
    the step (as ``decode_seconds`` times it), the compiled forward ``generate`` calls in it
    (the rest is ``generate``'s own loop), that forward with dynamo's guards skipped
    (``skip_guard_eval_unsafe``, for the guards' cost only), and the model's lowbit layers
    alone: each called in order on the input it had in one eager decode step. Then the
    decoder's step (``lowbit.decode.Decoder``, unprofiled), the matmul ops' time inside it
    (profiled: lowbit's ops and float matmuls) and the rest of it: the non-GEMV share."""
    from lowbit.nn import QuantLinear

    forward: list[float] = []
    compiled_call = model.get_compiled_call

    def timed_call(config):
        fn = compiled_call(config)

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            forward.append(time.perf_counter() - t0)
            return out

        return call

    ids = torch.randint(model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {"decode step": [], "compiled forward": [], "forward, guards skipped": [],
                                     "decoder step": []}
    model.get_compiled_call = timed_call
    try:
        with torch.inference_mode():
            _generate(model, ids, 1 + steps, "compiled")  # compiles
            _generate(model, ids, 1 + steps, "decoder", PROMPT + 1 + steps)
            for _ in range(rounds):
                for skip in (False, True):
                    forward.clear()
                    stance = (torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip
                              else contextlib.nullcontext())
                    with stance:
                        step = decode_seconds(model, ids, steps, "compiled") / steps
                    times["forward, guards skipped" if skip else "compiled forward"].append(statistics.median(forward))
                    if not skip:
                        times["decode step"].append(step)
                times["decoder step"].append(decode_seconds(model, ids, steps, "decoder") / steps)
    finally:
        del model.get_compiled_call
    calls = []
    hooks = [m.register_forward_pre_hook(lambda module, args: calls.append((module, args[0])))
             for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        with torch.inference_mode():
            model(ids[:, :1])
    finally:
        for h in hooks:
            h.remove()
    layers = []
    with torch.inference_mode():
        for _ in range(4 * rounds):
            t0 = time.perf_counter()
            for module, x in calls:
                module(x)
            layers.append(time.perf_counter() - t0)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out["generate's own loop"] = out["decode step"] - out["compiled forward"]
    out["guard evaluation"] = out["compiled forward"] - out["forward, guards skipped"]
    out["lowbit layers alone"] = statistics.median(layers[rounds:]) * 1e3
    # The matmuls' own time inside the decoder's step, from the profiler's op events (the
    # profiler's per-op cost lands in the rest, never in these).
    profiled = profile_decode(model, steps, "decoder", seed)
    out["decoder: matmul ops (profiled)"] = profiled["lowbit ops"] + profiled["float matmuls"]
    out["decoder: the rest"] = out["decoder step"] - out["decoder: matmul ops (profiled)"]
    return out


def decoder_step_ms(model: nn.Module, lengths: Sequence[int], steps: int = 64, rounds: int = 5,
                    seed: int = 0) -> dict[int, float]:
    """Milliseconds of one decoder step (``steps`` after a PROMPT-token prompt, as
    ``decode_seconds`` times them) with a static cache of each of ``lengths`` positions,
    round-robin, medians of ``rounds``: what the cache's size costs a step."""
    ids = torch.randint(model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    times: dict[int, list[float]] = {n: [] for n in lengths}

    def one(n: int) -> float:
        t0 = time.perf_counter()
        _generate(model, ids, 1, "decoder", n)
        t1 = time.perf_counter()
        _generate(model, ids, 1 + steps, "decoder", n)
        return (time.perf_counter() - t1) - (t1 - t0)

    with torch.inference_mode():
        for n in lengths:
            one(n)  # compiles
        for _ in range(rounds):
            for n in lengths:
                times[n].append(one(n) / steps)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def profile_generate(model: nn.Module, new: int, mode: str = "eager", seed: int = 0) -> dict[str, float]:
    """Seconds in each of ``CATEGORIES`` (and "total") of one whole ``generate`` call of
    ``new`` tokens after the prompt (prefill included; no difference taken, so every
    category that ran is there, however short)."""
    return _profile(model, (new,), mode, seed)[0]


def _profile(model: nn.Module, lengths: Sequence[int], mode: str, seed: int) -> list[dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
    result = []
    # Compiled code cannot hold the labels' hooks (record_function breaks the graph); there
    # the compiled region stands for the model.
    length = PROMPT + max(lengths)
    with torch.inference_mode(), _labels(model) if mode == "eager" else contextlib.nullcontext():
        _generate(model, ids, max(lengths), mode, length)  # warm-up (compiles)
        for new in lengths:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                _generate(model, ids, new, mode, length)
                wall = time.perf_counter() - t0
            result.append(_split(prof.events(), wall))
    return result


def _split(events, wall: float) -> dict[str, float]:
    """Seconds per category: each outermost op is charged whole to its own category, or
    to the innermost labelled range around it; ops outside the model's forward count as
    generate's; the wall time no op covers is Python / dispatch."""
    out = dict.fromkeys(CATEGORIES, 0.0)

    def walk(event, label: str | None) -> None:
        name = event.name
        if name.startswith("lowbit.profile:"):
            tag = name.split(":", 1)[1]
            for child in event.cpu_children:
                walk(child, tag)
            return
        if name.startswith(("Torch-Compiled", "CompiledFunction")):
            # A compiled graph: its fused kernels are not ops; what its ops leave is charged to it.
            own = event.cpu_time_total - sum(c.cpu_time_total for c in event.cpu_children)
            out["compiled graph code"] += own / 1e6
            for child in event.cpu_children:
                walk(child, label or "model")
            return
        if "::" in name:
            category = _op_category(name)
            if category is None:
                if label is None:
                    category = "generate outside the model"
                elif label == "model":
                    category = "other torch ops"
                else:
                    category = label
            out[category] += event.cpu_time_total / 1e6
            return
        for child in event.cpu_children:
            walk(child, label)

    for event in events:
        if event.cpu_parent is None:
            walk(event, None)
    covered = sum(out.values())
    out["Python / dispatch"] = max(wall - covered, 0.0)
    out["total"] = wall
    return out
