"""The ``lowbit`` command line (also ``python -m lowbit``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit inference for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a sentence-embedding model with every scheme and compare")
    demo.add_argument("--model", help="a sentence-transformers model directory (default: all-MiniLM-L6-v2)")
    demo.add_argument("--schemes", default=",".join(["w8a8", "w8a16", "w4a16-g128", "w4a16-g32"]),
                      help="comma-separated schemes")
    demo.add_argument("--sentences", type=int, default=64)
    sub.add_parser("backends", help="list the backends and whether they are available here")
    args = parser.parse_args(argv)

    import lowbit

    try:
        if args.command == "backends":
            print(lowbit.backends())
        elif args.command == "demo":
            from lowbit import demo as demo_module

            print(demo_module.run(args.model, args.schemes.split(","), args.sentences))
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
