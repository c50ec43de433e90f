"""An LLM on CPU, end to end: lowbit against llama.cpp on the same model and threads.

Builds (once, under ``--work``) a randomly initialised transformers Llama of 491.8M
parameters (hidden 2048, intermediate 5632, 8 layers, 16 heads, 4 KV heads, vocabulary
32000, untied; ``lowbit.bench.generate.LLAMA_491M``) or takes ``--model DIR``, and times
prefill (32 and 512 tokens) and decode (64 tokens after a 32-token prompt, batch 1 and
4) for bf16 and lowbit's W8A8, W8A16, W4A16 g128 and g32, eager, compiled (static
cache + torch.compile) and through lowbit's own decoder (``lowbit.decode.Decoder``: one
compiled step, decode rows only), round-robin medians (``lowbit.bench.generate``). Then
``bench/llamacpp.py`` builds llama.cpp from its published source package, converts the
same directory with its own converter, quantizes Q8_0 / Q4_0 / Q4_K_M and runs
llama-bench with the same threads; both tables print side by side. ``--profile SCHEME``
prints where one decode step's time goes instead, with the projections apart and fused;
``--apart`` adds unfused rows to the table, ``--lm-head-float`` rows with lm_head left float.

    python bench/llm.py [--threads 2] [--modes eager,compiled,decoder] [--no-llamacpp]
    python bench/llm.py --profile w4a16-g128 [--modes decoder]
    python bench/llm.py --split w4a16-g128,w8a8          # the same step, timed without a profiler
    python bench/llm.py --schemes w4a16-g128 --cache-lengths 97,512,2048   # the decoder's step by cache size
    python bench/llm.py --vllm-python .venv-vllm/bin/python   # vLLM's CPU build too (make vllm-check first)
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python bench/llm.py --isa avx2      # the AVX2 class on a newer CPU: lowbit, torch and llama.cpp
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llamacpp  # noqa: E402
from lowbit.bench import generate  # noqa: E402

SCHEMES = ["w8a8", "w8a16", "w4a16-g128", "w4a16-g32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers causal-LM directory (default: the 491.8M Llama)")
    parser.add_argument("--work", type=Path, default=llamacpp.default_work().parent / "llm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--modes", default=",".join(generate.MODES))
    parser.add_argument("--batches", default="1,4", help="decode batch sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llamacpp-types", default="bf16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--isa", choices=sorted(llamacpp.ISA_FLAGS), default="native",
                        help="avx2: lowbit's AVX2 kernels and llama.cpp built without AVX-512 (torch's own kernels "
                             "follow ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS: set them)")
    parser.add_argument("--apart", action="store_true", help="also time each scheme with its projections unfused")
    parser.add_argument("--lm-head-float", action="store_true",
                        help="also time each scheme with lm_head left in the model's float dtype")
    parser.add_argument("--vllm-python", help="also time vLLM's CPU build (this venv's python; `make vllm-check` "
                        "sets up .venv-vllm) on the bf16 model and lowbit's W8A8 / W4A16 g128 exports")
    parser.add_argument("--profile", metavar="SCHEME", help="profile one decode step of this scheme ('bf16': float)")
    parser.add_argument("--split", metavar="SCHEMES", help="time a compiled decode step of these schemes ('bfloat16': "
                        "float) without a profiler: the step, its compiled forward, the guards, the lowbit layers alone; the "
                        "decoder's step and the matmuls in it")
    parser.add_argument("--cache-lengths", metavar="L,L", help="time the decoder's step of each of --schemes with a "
                        "static cache of each of these lengths (64 steps after a 32-token prompt)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.isa != "native":
        import lowbit

        lowbit.set_cpu_isa(args.isa)
        print(f"lowbit's CPU path: {lowbit.cpu_isa()}; torch's kernels: {torch.backends.cpu.get_cpu_capability()}")
    model_dir = args.model or generate.build_llama(args.work / "llama-491m")
    model = generate.load(model_dir)
    modes = args.modes.split(",")

    if args.split:
        names = args.split.split(",")  # schemes, or "bfloat16" for the float model
        splits = {name: generate.split_decode(m) for name, m in
                  generate.variants(model, [n for n in names if n != "bfloat16"]).items() if name in names}
        print("\nms per compiled decode step (tg64 b1, medians; no profiler but the matmul ops' row)\n")
        print("| part | " + " | ".join(splits) + " |")
        print("|---|" + "---:|" * len(splits))
        for part in next(iter(splits.values())):
            print(f"| {part} | " + " | ".join(f"{s[part]:.2f}" for s in splits.values()) + " |")
        return

    if args.cache_lengths:
        lengths = [int(n) for n in args.cache_lengths.split(",")]
        schemes = [s for s in args.schemes.split(",") if s]
        print("\nms per decoder step by static cache length (tg64 b1, medians)\n")
        print("| scheme | " + " | ".join(str(n) for n in lengths) + " |")
        print("|---|" + "---:|" * len(lengths))
        for name, m in generate.variants(model, schemes).items():
            if name in schemes:
                ms = generate.decoder_step_ms(m, lengths)
                print(f"| {name} | " + " | ".join(f"{ms[n]:.2f}" for n in lengths) + " |")
        return

    if args.profile:
        # Before and after fusion: the scheme with its projections apart, then fused.
        columns = {"float": model} if args.profile == "bf16" else {
            "apart": list(generate.variants(model, [args.profile], fuse=False).values())[-1],
            "fused": list(generate.variants(model, [args.profile]).values())[-1]}
        for mode in modes:
            splits = {name: generate.profile_decode(m, mode=mode) for name, m in columns.items()}
            print(f"\n{args.profile}, {mode}: ms per decode step (torch.profiler; its own overhead inflates "
                  f"Python / dispatch)\n")
            print("| part | " + " | ".join(splits) + " |")
            print("|---|" + "---:|" * len(splits))
            for part in next(iter(splits.values())):
                print(f"| {part} | " + " | ".join(f"{s[part]:.2f}" for s in splits.values()) + " |")
        return

    schemes = [s for s in args.schemes.split(",") if s]
    models = generate.variants(model, schemes)
    if args.apart:
        apart = generate.variants(model, schemes, fuse=False)
        models.update({f"{k} apart": apart[k] for k in schemes})
    if args.lm_head_float:
        float_head = generate.variants(model, schemes, exclude=["lm_head"])
        models.update({f"{k} lm_head float": float_head[k] for k in schemes})
    rows = generate.run(models, modes, batches=[int(b) for b in args.batches.split(",")], rounds=args.rounds)
    print(f"\nlowbit (transformers {_version('transformers')}, torch {torch.__version__}), {args.threads} threads, "
          f"tokens/s:\n")
    print(generate.table(rows))
    if args.vllm_python:
        del models
        print("\n" + vllm_table(model, model_dir, args.work, [int(b) for b in args.batches.split(",")],
                                args.vllm_python))
    if args.no_llamacpp:
        return
    del model
    cpp = llamacpp.bench(model_dir, args.llamacpp_types.split(","), args.threads, [32, 512], 64,
                         llamacpp.default_work(), isa=args.isa)
    commit = cpp[0]["commit"] if cpp else "?"
    print(f"\nllama.cpp {commit} (llama-bench, {args.threads} threads, {args.isa} build), tokens/s:\n")
    tests = list(dict.fromkeys(r["test"] for r in cpp))
    print("| type | " + " | ".join(tests) + " |")
    print("|---|" + "---:|" * len(tests))
    for kind in dict.fromkeys(r["type"] for r in cpp):
        cells = {r["test"]: f"{r['tokens_per_s']:.1f} ± {r['stddev']:.1f}" for r in cpp if r["type"] == kind}
        print(f"| {kind} | " + " | ".join(cells.get(t, "") for t in tests) + " |")


def vllm_table(model, model_dir: Path, work: Path, batches: list[int], vllm_python: str) -> str:
    """vLLM's decode tokens/s on the float model and lowbit's compressed-tensors exports
    (lm_head and embeddings bf16, as vLLM's CPU build serves them)."""
    import copy
    import warnings

    import lowbit
    import vllm_check
    from lowbit import interop

    dirs = {"bf16": str(model_dir)}
    for scheme in ("w8a8", "w4a16-g128"):
        out = work / f"ct-{scheme}"
        if not (out / "config.json").exists():
            quantized = copy.deepcopy(model)
            lowbit.quantize(quantized, scheme, exclude=["lm_head"], progress=False,
                            scale_dtype=interop.format_for("compressed-tensors").scale_dtype or torch.bfloat16)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", interop.EngineWarning)
                lowbit.export(quantized, out, "compressed-tensors", source=model_dir)
            del quantized
        dirs[scheme] = str(out)
    got = vllm_check.measure_speed(vllm_python, dirs, work, batches)
    lines = ["vLLM CPU build (eager, 2 threads bound), decode tokens/s (tg64 after 32):\n",
             "| model | " + " | ".join(f"b{b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for name, result in got.items():
        cells = [f"{result['tokens_per_s'][str(b)]:.1f}" if result["ok"] else result["error"][:80] for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
