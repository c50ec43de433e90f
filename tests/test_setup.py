"""The checkout as a user meets it: nothing in it shadows an installed package, and the
submodules the README uses are attributes of ``lowbit``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lowbit

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository root with `-c`, so the root is sys.path[0] exactly as for
# `python -m pytest` or a script on stdin.
_SHADOWS = r"""
import importlib.metadata, importlib.util, json, os
root = os.path.realpath(os.getcwd())
installed = importlib.metadata.packages_distributions()
names = sorted({e.name.removesuffix(".py") for e in os.scandir(root) if not e.name.startswith(".")})
found = []
for name in names:
    if not name.isidentifier():
        continue
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    inside = [p for p in places if p and os.path.realpath(p).startswith(root + os.sep)]
    # A module or regular package in the checkout always wins; a namespace portion only
    # joins (or stands in for) a distribution of the same name.
    if inside and (spec.origin or name in installed):
        found.append([name, inside, installed.get(name, [])])
print(json.dumps(found))
"""


def _from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_nothing_at_the_root_is_importable():
    out = _from_root(_SHADOWS)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], "importable from the repository root (name, where, distributions using it)"


def test_transformers_imports_from_the_root():
    # transformers imports the `kernels` distribution (a kernel hub) when it loads model
    # code; a top-level kernels/ in the checkout once replaced it there.
    out = _from_root("import transformers; transformers.LlamaForCausalLM; import kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert not out.stdout.strip().startswith(str(ROOT) + "/kernels")


def test_readme_submodules_are_attributes():
    fresh = subprocess.run([sys.executable, "-c", "import lowbit; print(lowbit.lora.add_lora, lowbit.qat.prepare)"],
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    for name in ("lora", "qat", "bench", "interop", "plan", "calibrate"):
        assert name in lowbit.__all__ and getattr(lowbit, name).__name__ == f"lowbit.{name}"
