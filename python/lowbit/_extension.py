"""Loading lowbit's compiled extensions: ``_C`` (the ops and kernels) and, in test builds,
``_models`` (CPU models of the CUDA kernels).

``LOWBIT_EXTENSION_DIR`` names a CMake build directory to load them from instead of the
installed package (``make sanitize`` points it at its AddressSanitizer build).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from types import ModuleType

DIR_ENV = "LOWBIT_EXTENSION_DIR"


def load(name: str) -> ModuleType:
    """``lowbit.<name>``, from ``$LOWBIT_EXTENSION_DIR`` when set; ImportError when absent."""
    qualified = f"lowbit.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    directory = os.environ.get(DIR_ENV)
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
