"""The checkout and the build as a user meets them: nothing in the checkout shadows an
installed package, the submodules the README uses are attributes of ``lowbit``, and an
extension built against another torch is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import lowbit
import pytest
import torch

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
    for name in ("lora", "qat", "decode", "bench", "interop", "plan", "calibrate"):
        assert name in lowbit.__all__ and getattr(lowbit, name).__name__ == f"lowbit.{name}"


def test_the_extension_records_the_torch_it_was_built_against():
    from lowbit import _extension

    info = _extension._build_info(os.environ.get(_extension.DIR_ENV))
    assert info is not None, "the build wrote no lowbit/_build_info.py"
    assert info.TORCH_VERSION == torch.__version__
    _extension.check_build(info)  # this torch: no complaint


@pytest.mark.parametrize("field,value,says", [
    ("TORCH_VERSION", "2.11.0+cu128", "built against torch 2.11.0+cu128, and this environment has torch"),
    ("CXX11_ABI", 2, "C++11 ABI flag 2"),
    ("CUDA", "99.1", "CUDA 99.1"),
])
def test_another_torch_is_refused_by_name_before_loading(field, value, says):
    # A build recorded as made against another torch (a forged record): one ImportError
    # naming both and the rebuild command, not an undefined symbol from the loader.
    from lowbit import _extension

    real = _extension._build_info(os.environ.get(_extension.DIR_ENV))
    forged = types.SimpleNamespace(TORCH_VERSION=real.TORCH_VERSION, CXX11_ABI=real.CXX11_ABI, CUDA=real.CUDA)
    setattr(forged, field, value)
    with pytest.raises(ImportError, match="rebuild it against this torch") as caught:
        _extension.check_build(forged)
    assert says in str(caught.value) and "--no-build-isolation" in str(caught.value)


def test_loading_checks_the_record_first(tmp_path, monkeypatch):
    # An extension directory whose record names another torch is refused before its .so
    # is opened (the .so here is not even a library).
    from lowbit import _extension

    (tmp_path / "_build_info.py").write_text('TORCH_VERSION = "2.0.0"\nCXX11_ABI = 1\nCUDA = ""\n')
    (tmp_path / "_probe.cpython-311-x86_64-linux-gnu.so").write_text("not a library")
    monkeypatch.setenv(_extension.DIR_ENV, str(tmp_path))
    with pytest.raises(ImportError, match="built against torch 2.0.0"):
        _extension.load("_probe")


def _names(path: Path) -> dict[str, str]:
    """{normalized distribution name: the line} of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = line.replace(">", "=").replace("<", "=").replace("~", "=").replace("!", "=").split("=")[0]
            out[name.strip().lower().replace("_", "-").replace(".", "-")] = line
    return out


def test_the_locks_cover_what_the_makefile_installs():
    # Every distribution requirements/*.in asks for is pinned in each torch's lock (a new
    # one without `make lock` would be resolved afresh on each machine), at the version the
    # .in names when it names one; each lock's torch is the one its name says, and the
    # Makefile's default and oldest torch both have one.
    req = ROOT / "requirements"
    makefile = (ROOT / "Makefile").read_text().splitlines()
    default, oldest = (next(line.split("=")[-1].strip() for line in makefile if line.startswith(prefix))
                       for prefix in ("TORCH_VERSION ?=", "OLDEST_TORCH :="))
    locks = sorted(req.glob("torch-*.txt"))
    assert {default, oldest} <= {p.stem.removeprefix("torch-") for p in locks}
    for path in locks:
        version = path.stem.removeprefix("torch-")
        lock = _names(path)
        assert lock["torch"].split("+")[0] == f"torch=={version.split('+')[0]}", path  # +cpu builds too
        for name, line in _names(req / "dev.in").items():
            assert name in lock and lock[name].startswith(f"{lock[name].split('==')[0]}=="), (path, name)
            if "==" in line:
                assert lock[name].split("==")[1] == line.split("==")[1], (path, line)
        gptq = _names(req / f"gptqmodel-torch-{version}.txt")
        assert all(name in gptq or name in lock for name in _names(req / "gptqmodel.in")), path


def _readme_install_block() -> list[str]:
    """The commands of the README's "Installing with pip" shell block, comments dropped."""
    text = (ROOT / "README.md").read_text().split("## Installing with pip", 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_readmes_pip_install_builds_and_runs(tmp_path):
    # The README's `pip install --no-build-isolation .`, run as written into a new venv that
    # sees this environment's packages (torch, the build tools) through a .pth file but not
    # its editable lowbit, with the README's LOWBIT_CUDA=OFF switch and a build tree of its
    # own (the README's default tree is the one `make build` keeps). Then the smoke test of
    # the installed package: every scheme against the reference.
    commands = _readme_install_block()
    named = commands[0].split()[2]  # the torch the README installs first: one with a lock
    assert named.startswith("torch==") and (ROOT / "requirements" / f"torch-{named[7:]}.txt").exists(), commands[0]
    install = next(c for c in commands if c.endswith(" ."))
    assert install == "pip install --no-build-isolation .", install
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "outer-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    args = install.split()[1:] + ["-C", "cmake.define.LOWBIT_CUDA=OFF", "-C",
                                  f"build-dir={ROOT / 'build' / 'readme-install'}", "--quiet"]
    built = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stderr[-3000:]
    smoke = subprocess.run([str(python), str(ROOT / "tests" / "wheel_smoke.py")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert smoke.returncode == 0, smoke.stdout[-2000:] + smoke.stderr[-3000:]
    assert "smoke test passed" in smoke.stdout
    cuda = subprocess.run([str(python), "-c", "from lowbit import _build_info; print(repr(_build_info.CUDA))"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert cuda.stdout.strip() == "''", "LOWBIT_CUDA=OFF still built the CUDA kernels"
