"""The ``lowbit`` command line (also ``python -m lowbit``).

    lowbit demo       quantize a sentence-embedding model with every scheme and compare
    lowbit backends   what runs here, and why the rest does not
    lowbit bench      time every backend and kernel path beside torch's own paths
    lowbit tune       measure the kernel paths per M and store the plan layers dispatch by
    lowbit quantize   quantize a local transformers / sentence-transformers model into a directory
    lowbit export     write a model as GPTQ, AWQ, compressed-tensors or ONNX (quantizing a float one first)
    lowbit inspect    per-layer numerics of a quantized model against its float original
    lowbit report     memory per scheme, which GPUs it fits, cost per million tokens

Errors in the arguments or the inputs print one line naming the problem and exit with 2.
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit inference for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize a sentence-embedding model with every scheme and compare")
    demo.add_argument("--model", help="a sentence-transformers model directory (default: all-MiniLM-L6-v2)")
    demo.add_argument("--schemes", default=",".join(["w8a8", "w8a16", "w4a16-g128", "w4a16-g32"]),
                      help="comma-separated schemes")
    demo.add_argument("--sentences", type=int, default=64)

    sub.add_parser("backends", help="list the backends and whether they are available here")

    bench = sub.add_parser("bench", help="time every backend and kernel path beside torch's own paths")
    bench.add_argument("--schemes", type=_list, default=["w8a8", "w4a16-g128", "w8a16"])
    bench.add_argument("--shapes", default="llama3-8b",
                       help="llama3-8b, mistral-7b, minilm, a CSV file of k,n rows, or KxN[,KxN]")
    bench.add_argument("--m", type=_ints, help="comma-separated M values (default 1,8,32,128,512,2048)")
    bench.add_argument("--paths", type=_list, help="fixed CPU kernel paths to time too ('all': every one but scalar)")
    bench.add_argument("--impls", type=_list, help="keep implementations whose name contains one of these")
    bench.add_argument("--rotate", action="store_true", help="rotate weight copies through more than the LLC")
    bench.add_argument("--remeasure", action="store_true", help="measure the machine's ceilings again")
    bench.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds (the fastest is kept)")
    bench.add_argument("--isa", help="run lowbit's CPU kernels on this path (scalar, avx2, avx512_vnni, amx) to "
                                     "measure another CPU class; set ATEN_CPU_CAPABILITY (e.g. avx2) for torch's own")
    bench.add_argument("--json", help="write every measurement here")
    bench.add_argument("--plot", help="write a PNG of speedup over bf16 against M here")
    bench.add_argument("--model", help="with --generate: a transformers causal-LM directory")
    bench.add_argument("--generate", action="store_true",
                       help="time the model's prefill and decode (float and each scheme) instead of kernels")
    bench.add_argument("--modes", type=_list, default=["eager"], help="with --generate: eager, compiled (transformers' static cache + torch.compile), decoder "
                       "(lowbit.decode.Decoder: lowbit's own loop and compiled step)")
    bench.add_argument("--prompts", type=_ints, default=[32, 512], help="with --generate: prefill lengths")
    bench.add_argument("--batches", type=_ints, default=[1], help="with --generate: decode batch sizes")
    bench.add_argument("--decode", type=int, default=64, help="with --generate: decode steps")

    tune = sub.add_parser("tune", help="measure the kernel paths per M bucket and store the plan")
    tune.add_argument("--schemes", type=_list, default=["w8a8", "w4a16-g128", "w8a16"])
    tune.add_argument("--shapes", default="llama3-8b")
    tune.add_argument("--out", help="plan file (default: the cache directory's plan for this machine)")

    quantize = sub.add_parser("quantize", help="quantize a local transformers / sentence-transformers model, block "
                              "by block, into a model directory")
    quantize.add_argument("model", help="model directory")
    quantize.add_argument("--scheme", default="w4a16-g128")
    quantize.add_argument("--method", default="rtn", help="rtn, gptq, awq or smoothquant")
    quantize.add_argument("--observer", default="minmax", help="observer for w8a8-static activation scales")
    quantize.add_argument("--calibration", help="a text file, one calibration sample per line")
    quantize.add_argument("--exclude", type=_list, default=[], help="glob patterns of layers to keep float")
    quantize.add_argument("--out", required=True, help="a new directory for the quantized model (lowbit.load_pretrained)")
    quantize.add_argument("--shard-size", help="largest checkpoint shard, e.g. 2GB (default 2 GiB)")

    export = sub.add_parser("export", help="write a quantized model (or quantize a float one) as GPTQ, AWQ or "
                            "compressed-tensors (vLLM, SGLang, transformers), or as ONNX (onnxruntime)")
    export.add_argument("model", help="model directory: float (give --scheme) or already quantized")
    export.add_argument("--format", required=True, choices=["compressed-tensors", "gptq", "awq", "onnx"])
    export.add_argument("--out", required=True, help="a new directory (onnx: a new .onnx file)")
    export.add_argument("--accuracy-level", type=int, default=4,
                        help="onnx: MatMulNBits' accuracy level (0: exact fp32, slow; 4: int8 compute, fast)")
    export.add_argument("--scheme", help="quantize a float model to this scheme first")
    export.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                        help="GPTQ's zero-point convention (v1 cannot hold a zero point of 0)")
    export.add_argument("--method", default="rtn", help="rtn, gptq, awq or smoothquant (with --scheme)")
    export.add_argument("--observer", default="minmax", help="observer for w8a8-static activation scales")
    export.add_argument("--calibration", help="a text file, one calibration sample per line")
    export.add_argument("--exclude", type=_list, default=["lm_head"],
                        help="glob patterns of layers to keep float (default lm_head, as engines expect)")
    export.add_argument("--shard-size", help="largest checkpoint shard, e.g. 2GB (default 2 GiB)")

    inspect = sub.add_parser("inspect", help="per-layer numerics of a quantized model against the float one; "
                                        "for an .onnx file, whether it computes right on every CPU")
    inspect.add_argument("model", help="model directory, or an .onnx file")
    inspect.add_argument("--scheme", default="w4a16-g128")
    inspect.add_argument("--checkpoint", help="a lowbit checkpoint of this model (default: quantize now, RTN)")
    inspect.add_argument("--texts", help="a text file of inputs, one per line (default: pydoc sentences)")
    inspect.add_argument("--sqnr-threshold", type=float, default=20.0, help="flag layers below this SQNR (dB)")
    inspect.add_argument("--plot", help="write a PNG of SQNR per layer here")

    report = sub.add_parser("report", help="memory per scheme, GPU fit, cost per million tokens")
    report.add_argument("model", nargs="?", help="model directory (or use --shapes / --params)")
    report.add_argument("--shapes", help="a shape set (llama3-8b, ...) standing for one block's Linear layers")
    report.add_argument("--blocks", type=int, default=32, help="with --shapes: how many blocks")
    report.add_argument("--schemes", type=_list, default=["w8a8", "w8a16", "w4a16-g128", "w4a16-g32"])
    report.add_argument("--price", type=float, default=2.0, help="price per hour of the machine, in your currency")
    report.add_argument("--tokens", type=int, default=256, help="tokens per batch for the measured throughput")
    report.add_argument("--no-measure", action="store_true", help="skip the throughput measurement")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    import lowbit

    try:
        if args.command == "backends":
            print(lowbit.list_backends())
        elif args.command == "demo":
            from lowbit import demo as demo_module

            print(demo_module.run(args.model, args.schemes.split(","), args.sentences))
        elif args.command == "bench" and (args.generate or args.model):
            if not (args.generate and args.model):
                parser.error("--generate and --model DIR go together")
            from lowbit.bench import generate

            models = generate.variants(generate.load(args.model), args.schemes)
            rows = generate.run(models, args.modes, prompts=args.prompts, decode=args.decode, batches=args.batches,
                                rounds=args.rounds)
            print(generate.table(rows))
        elif args.command == "bench":
            from lowbit import bench

            with lowbit.use_cpu_isa(args.isa or "auto"):
                result = bench.run(args.schemes, bench.parse_shapes(args.shapes), args.m or bench.DEFAULT_M,
                                   paths=args.paths, impls=args.impls, rotate=args.rotate, remeasure=args.remeasure,
                                   rounds=args.rounds)
            print(result.table())
            if args.json:
                result.write_json(args.json)
            if args.plot:
                result.plot(args.plot)
        elif args.command == "tune":
            from lowbit import bench, plan

            path = args.out or plan.default_path()
            existing = plan.Plan.load(path) if args.out is None and plan.default_path().exists() else None
            tuned = bench.tune(args.schemes, bench.parse_shapes(args.shapes), into=existing)
            print(f"plan for {len(tuned.entries)} (scheme, shape) entries written to {tuned.save(path)}")
            for key, entry in tuned.entries.items():
                runs, prev = [], None
                for b in sorted(entry):
                    if entry[b] != prev:
                        runs.append(f"from M={b}: {entry[b]}")
                    prev = entry[b]
                print(f"  {key}: {', '.join(runs)}")
        else:
            from lowbit import tools

            print(getattr(tools, args.command)(args))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
