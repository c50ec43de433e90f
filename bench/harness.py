"""The benchmark harness: timing, ceilings, tables and JSON, shared by every backend.

Every figure is measured in the same process as the baselines it is compared with:
these machines are shared and noisy, so a ratio measured side by side means more than
an absolute time. Timing is the median of repeated calls after a warm-up; with
``rotate``, each call uses the next of several weight copies whose total size exceeds
the last-level cache, which gives the cold-cache (DRAM-bound) figure.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N) of attention and MLP
M_VALUES = [1, 8, 32, 128, 512, 2048]


def median_seconds(fn: Callable[[int], object], min_time: float = 0.3, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median time of ``fn(i)`` (i = call index, for rotating inputs) after one warm-up."""
    fn(0)
    times: list[float] = []
    start = time.perf_counter()
    i = 1
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


@dataclasses.dataclass
class Ceilings:
    """Rates measured on this machine, all intra-op threads together."""

    int8_ops: float  # vpdpbusd operations per second (2 per multiply-add)
    fp32_flops: float  # fp32 FMA FLOP per second
    copy_bytes: float  # DRAM copy bandwidth, bytes read + written per second

    @classmethod
    def measure(cls) -> Ceilings:
        ext = sys.modules["lowbit._C"]
        src = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB: far past any cache
        src.fill_(1.0)
        dst = torch.empty_like(src)
        t = median_seconds(lambda _: dst.copy_(src), min_time=0.5)
        return cls(ext.cpu_peak("vnni", 0.3), ext.cpu_peak("fma", 0.3), 2 * src.numel() * 4 / t)


@dataclasses.dataclass
class Row:
    scheme: str
    k: int
    n: int
    m: int
    impl: str
    seconds: float
    weight_bytes: int
    ceiling: float  # the rate the percentage refers to (ops/s)

    @property
    def gflops(self) -> float:
        return 2 * self.m * self.n * self.k / self.seconds / 1e9

    @property
    def weight_gbs(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    @property
    def percent_of_ceiling(self) -> float:
        return 100 * self.gflops * 1e9 / self.ceiling


def table(rows: Sequence[Row], ours: str, baselines: Sequence[str], title: str) -> str:
    """One line per (shape, M): our ms, GFLOP/s, weight GB/s, % of ceiling, then the
    ratio of each baseline's time to ours (> 1 means lowbit is faster)."""
    by_key: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.k, r.n, r.m), {})[r.impl] = r
    head = f"{'K x N':>12} {'M':>5} {'ms':>9} {'GFLOP/s':>8} {'GB/s w':>7} {'% ceil':>6}"
    head += "".join(f" {'vs ' + b:>{max(12, len(b) + 3)}}" for b in baselines)
    lines = [title, head]
    for (k, n, m), impls in by_key.items():
        r = impls[ours]
        line = f"{f'{k}x{n}':>12} {m:>5} {r.seconds * 1e3:>9.3f} {r.gflops:>8.1f} {r.weight_gbs:>7.1f} {r.percent_of_ceiling:>6.1f}"
        for b in baselines:
            ratio = impls[b].seconds / r.seconds if b in impls else float("nan")
            line += f" {ratio:>{max(12, len(b) + 3)}.2f}x"
        lines.append(line)
    return "\n".join(lines)


def write_json(path: str, rows: Sequence[Row], ceilings: Ceilings, meta: dict) -> None:
    payload = {
        "meta": meta,
        "ceilings": dataclasses.asdict(ceilings),
        "rows": [dataclasses.asdict(r) | {"gflops": r.gflops, "percent_of_ceiling": r.percent_of_ceiling} for r in rows],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
