"""CPU backend benchmark for issue #3's tables: ``lowbit bench`` on the Llama-3-8B shapes.

    python bench/cpu.py                   # = lowbit bench --shapes llama3-8b
    python bench/cpu.py --quick           # 4096 x 4096, M in {1, 32, 512}
    python bench/cpu.py --rotate          # weights rotated through more than the L3 cache

Any other ``lowbit bench`` option passes through (--json, --plot, --m, --impls, ...).
This is the same code path as ``lowbit bench`` (lowbit.bench.runner), not a second one.
"""

from __future__ import annotations

import sys

from lowbit.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--quick" in argv:
        argv.remove("--quick")
        argv += ["--shapes", "4096x4096", "--m", "1,32,512"]
    if "--shapes" not in argv:
        argv += ["--shapes", "llama3-8b"]
    sys.exit(main(["bench", *argv]))
