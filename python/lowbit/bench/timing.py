"""Timing and the machine's ceilings.

Every figure is measured in the same process as the baselines it is compared with:
these machines are shared and noisy, so a ratio measured side by side means more than
an absolute time. A time is the median of repeated calls after a warm-up; with
``rotate``, each call uses the next of several weight copies whose total size exceeds
the last-level cache, which gives the cold-cache (DRAM-bound) figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lowbit.backends.cpu import cpu_isa
from lowbit.plan import cache_dir, machine_id


def median_seconds(fn: Callable[[int], object], min_time: float = 0.3, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median time of ``fn(i)`` (i = call index, for rotating inputs) after one warm-up;
    calls slower than 0.2 s are repeated only twice, slower than 1 s once."""
    t0 = time.perf_counter()
    fn(0)
    warm = time.perf_counter() - t0
    if warm > 0.2:
        min_reps = min(min_reps, 1 if warm > 1.0 else 2)
    times: list[float] = []
    start = time.perf_counter()
    i = 1
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


LONG_CALL = 0.05  # seconds


def interleaved_seconds(fns: dict[str, Callable[[int], object]], rounds: int = 3, min_time: float = 0.1) -> dict:
    """Time several implementations round-robin, ``rounds`` times each, and keep each
    one's fastest round median: interference from the rest of a shared machine only ever
    slows a round down, and round-robin spreads it over all candidates rather than
    whichever ran during it. Calls longer than ``LONG_CALL`` get one round."""
    best = {name: float("inf") for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if r and best[name] > LONG_CALL:
                continue  # long calls average the noise out within one round
            best[name] = min(best[name], median_seconds(fn, min_time=min_time))
    return best


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * (1024 if text.endswith("K") else 2**20)
    except (OSError, ValueError):
        return 32 * 2**20


@dataclasses.dataclass
class Ceilings:
    """Rates measured on this machine, all intra-op threads together: int8 multiply-add
    operations (2 per multiply-add), fp32 FMA FLOP, DRAM copy bytes (read + written) per
    second; the int8 and fp32 rates with the widest instructions of the CPU path the kernels
    take (``lowbit.cpu_isa()``: vpdpbusd zmm on AVX-512 VNNI, vpmaddubsw + vpmaddwd or
    AVX-VNNI's vpdpbusd ymm on AVX2), named in ``int8_instruction`` / ``fma_instruction``."""

    int8_ops: float
    fp32_flops: float
    copy_bytes: float
    int8_instruction: str
    fma_instruction: str

    @classmethod
    def measure(cls) -> Ceilings:
        ext = sys.modules["lowbit._C"]
        src = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB: far past any cache
        src.fill_(1.0)
        dst = torch.empty_like(src)
        t = median_seconds(lambda _: dst.copy_(src), min_time=0.5)
        (int8, int8_instruction), (fma, fma_instruction) = ext.cpu_peak("int8", 0.3), ext.cpu_peak("fma", 0.3)
        return cls(int8, fma, 2 * src.numel() * 4 / t, int8_instruction, fma_instruction)

    @classmethod
    def cached(cls, remeasure: bool = False) -> Ceilings:
        """Measured once per machine (CPU, threads, torch) and CPU path, and kept in the cache
        directory."""
        ident = {**machine_id(), "isa": cpu_isa()}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
        path = cache_dir() / f"ceilings-{key}.json"
        if path.exists() and not remeasure:
            try:
                return cls(**json.loads(path.read_text()))
            except (TypeError, ValueError):
                pass
        ceilings = cls.measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(ceilings)))
        return ceilings
