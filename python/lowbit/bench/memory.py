"""Memory measurements: the bytes of the tensors alive in the process, and the peak
resident set of a piece of work.

``live_tensor_bytes`` counts each storage once (views and aliases share theirs) among the
tensors the garbage collector can reach, plus those QuantLinear layers hold inside their
weight stores; it is what "the model holds" means in the memory table of bench/RESULTS.md.
"""

from __future__ import annotations

import gc
import warnings

import torch

from lowbit.calibrate.rss import RssPeak

__all__ = ["RssPeak", "live_tensor_bytes"]


def live_tensor_bytes(device: str = "cpu") -> int:
    """Bytes of the distinct storages of every live tensor on ``device``."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on some module objects warns of deprecated names
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == device and not obj.is_meta:
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError):
                continue
    return sum(seen.values())
