"""Triton kernels of lowbit, installed as ``lowbit.kernels`` (the Triton backend adds them).

This module imports no Triton, so the backend can ask ``interpreting()`` at import time
without deciding anything: Triton reads TRITON_INTERPRET when a kernel module defines its
kernels.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, K] view with unit stride along K (copying only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
