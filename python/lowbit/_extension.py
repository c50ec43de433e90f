"""Loading lowbit's compiled extensions: ``_C`` (the ops and kernels) and, in test builds,
``_models`` (CPU models of the CUDA kernels).

``LOWBIT_EXTENSION_DIR`` names a CMake build directory to load them from instead of the
installed package (``make sanitize`` points it at its AddressSanitizer build).

An extension runs only with the torch it was compiled against: with another the dynamic
loader stops at an undefined symbol. So before loading, ``check_build`` compares the torch
of this process with what the build recorded (``lowbit._build_info``, written by CMake) and
raises an ImportError that names both and the command that rebuilds.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from types import ModuleType

DIR_ENV = "LOWBIT_EXTENSION_DIR"


REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall LOWBIT_SOURCE_DIR (or `make build` in a checkout)"


def _build_info(directory: str | None):
    """The recorded build facts (a module with TORCH_VERSION, CXX11_ABI, CUDA), or None for a
    build that recorded none."""
    if not directory:
        try:
            return importlib.import_module("lowbit._build_info")
        except ImportError:
            return None
    path = os.path.join(directory, "_build_info.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("lowbit._build_info", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_build(info) -> None:
    """ImportError unless this process's torch is the one ``info`` says the extension was built
    against: the same release, the same C++ ABI, and a CUDA runtime of the same major version
    when the build has CUDA kernels."""
    import torch

    ours = torch.__version__.split("+")[0]
    built = info.TORCH_VERSION.split("+")[0]
    ours_cuda = torch.version.cuda or ""
    problems = []
    if ours != built:
        problems.append(f"torch {info.TORCH_VERSION}, and this environment has torch {torch.__version__}")
    if int(torch._C._GLIBCXX_USE_CXX11_ABI) != int(info.CXX11_ABI):
        problems.append(f"the C++11 ABI flag {int(info.CXX11_ABI)}, and this torch uses "
                        f"{int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    if info.CUDA and ours_cuda.split(".")[0] != info.CUDA.split(".")[0]:
        problems.append(f"CUDA {info.CUDA}, and this torch has {'CUDA ' + ours_cuda if ours_cuda else 'no CUDA'}")
    if problems:
        raise ImportError(f"lowbit's compiled extension was built against {'; '.join(problems)}: rebuild it "
                          f"against this torch with `{REBUILD}`")


def load(name: str) -> ModuleType:
    """``lowbit.<name>``, from ``$LOWBIT_EXTENSION_DIR`` when set; ImportError when absent or
    built against another torch."""
    qualified = f"lowbit.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    directory = os.environ.get(DIR_ENV)
    info = _build_info(directory)
    if info is not None:
        check_build(info)
    if not directory:
        return importlib.import_module(qualified)
    found = sorted(glob.glob(os.path.join(directory, f"{name}.*.so")))
    if not found:
        raise ImportError(f"{DIR_ENV}={directory} holds no {name}.*.so")
    spec = importlib.util.spec_from_file_location(qualified, found[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module
