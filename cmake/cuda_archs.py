"""The CUDA targets of a build, from ``TORCH_CUDA_ARCH_LIST`` in every form torch accepts.

    python cmake/cuda_archs.py "8.0;8.6+PTX"   ->  line 1: nvcc -gencode flags, space-separated
                                                   line 2: the targets ("sm_80,sm_86,compute_86")

Forms: entries separated by ";", spaces or commas; "X.Y" (SASS for sm_XY), "X.Ya" (the
architecture-specific sm_XYa, e.g. 9.0a for wgmma), "+PTX" (PTX as well, which newer GPUs
compile at load time), torch's generation names ("Ampere", "Hopper", "Blackwell", ...),
and "native" (the visible GPUs, through torch). Entries below 8.0 are dropped with a
warning: lowbit's CUDA kernels need cp.async and bf16 tensor cores. PTX of the newest
architecture is always embedded, so that a GPU newer than every listed one still runs the
build. Errors name the entry and exit with status 2.

CMakeLists.txt runs this to build the flags; lowbit's CUDA backend reads the targets back
(``lowbit._C.cuda_targets()``) to know which GPUs the binary runs on.
"""

from __future__ import annotations

import re
import sys

DEFAULT = "8.0;9.0a"
MIN_CC = 80
# torch.utils.cpp_extension's generation names, as torch expands them.
NAMED = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX", "Ampere+Tegra": "8.7",
    "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX", "Blackwell+Tegra": "11.0",
    "Blackwell": "10.0;10.3;12.0;12.1+PTX", "Rubin": "10.7+PTX",
}
ENTRY = re.compile(r"(\d+)\.(\d)(a?)(\+PTX)?")


class ArchError(ValueError):
    pass


def _native() -> str:
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not caps:
        raise ArchError("TORCH_CUDA_ARCH_LIST=native, but no GPU is visible")
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"


def parse(text: str | None) -> tuple[list[str], list[str], list[str]]:
    """(gencode flags, targets, warnings) for an arch list (None or empty: the default)."""
    text = (text or "").strip() or DEFAULT
    if text == "native":
        text = _native()
    for name in sorted(NAMED, key=len, reverse=True):  # "Ampere+Tegra" before "Ampere"
        text = text.replace(name, NAMED[name])
    entries = [e for e in re.split(r"[;\s,]+", text) if e]
    sass, ptx, warnings = [], [], []
    for entry in entries:
        m = ENTRY.fullmatch(entry)
        if m is None:
            raise ArchError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not X.Y, X.Ya, X.Y+PTX or a generation name")
        major, minor, specific, with_ptx = m.groups()
        cc = int(major) * 10 + int(minor)
        if cc < MIN_CC:
            warnings.append(f"skipping {entry}: lowbit's CUDA kernels need compute capability 8.0 or newer")
            continue
        arch = f"{cc}{specific}"
        if arch not in sass:
            sass.append(arch)
        if with_ptx and arch not in ptx:
            ptx.append(arch)
    if not sass:
        raise ArchError(f"TORCH_CUDA_ARCH_LIST={text!r} names no architecture of compute capability 8.0 or newer")
    newest = max(sass, key=lambda a: int(a.rstrip("a"))).rstrip("a")  # its generic PTX runs on newer GPUs
    if newest not in ptx:
        ptx.append(newest)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass]
    flags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]
    return flags, [f"sm_{a}" for a in sass] + [f"compute_{a}" for a in ptx], warnings


def main(argv: list[str]) -> int:
    try:
        flags, targets, warnings = parse(argv[1] if len(argv) > 1 else None)
    except ArchError as e:
        print(f"lowbit: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"lowbit: {w}", file=sys.stderr)
    print(" ".join(flags))
    print(",".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
