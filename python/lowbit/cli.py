"""The ``lowbit`` command line (also ``python -m lowbit``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit inference for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a Linear layer with every scheme and time every backend")
    demo.add_argument("--in-features", type=int, default=2048)
    demo.add_argument("--out-features", type=int, default=2048)
    demo.add_argument("--tokens", type=int, default=32)
    sub.add_parser("backends", help="list the backends and whether they are available here")
    args = parser.parse_args(argv)

    import lowbit

    if args.command == "backends":
        print(lowbit.backends())
    elif args.command == "demo":
        from lowbit import demo as demo_module

        print(demo_module.run(args.in_features, args.out_features, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
