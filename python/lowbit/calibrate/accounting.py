"""Byte accounting: how much calibration state (statistics, Hessians, held activations) a
run holds at a time, counted where it is allocated and freed, and its peak.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def tensors(obj) -> list[torch.Tensor]:
    """The tensors inside nested tuples, lists and mappings (batches, block arguments)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(obj))


class StateBytes:
    """A running count of held bytes and its peak."""

    def __init__(self):
        self.held = 0
        self.peak = 0

    def hold(self, count: int) -> None:
        self.held += count
        self.peak = max(self.peak, self.held)

    def release(self, count: int) -> None:
        self.held -= count

    def release_all(self) -> None:
        self.held = 0
