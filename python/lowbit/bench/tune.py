"""``lowbit tune``: measure every CPU kernel path per (scheme, shape, M bucket) and keep
the fastest in a plan (``lowbit.plan``).

Each path is timed with the same inputs, one after another, at every bucket of M; a path
more than 3x slower than the best at one bucket is not timed at larger ones (the paths'
costs grow with M at different rates, never back). The plan records the fastest path per
bucket and every time it measured. Within 3% of the fastest, it prefers "auto" (the
kernel's own choice, which costs no dispatch per call), then the path of the bucket
below, so that noise does not flip the choice back and forth.
Implementations are timed round-robin (``interleaved_seconds``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tqdm import tqdm

from lowbit import formats, plan
from lowbit.backends import choose_backend
from lowbit.bench.timing import interleaved_seconds
from lowbit.formats import Scheme

PRUNE_FACTOR = 3.0
HYSTERESIS = 0.03


def tune(
    schemes: Sequence[str] = ("w8a8", "w4a16-g128", "w8a16"),
    shapes: Sequence[tuple[int, int]] = ((4096, 4096),),
    m_values: Sequence[int] = plan.BUCKETS,
    *,
    into: plan.Plan | None = None,
    progress: bool = True,
) -> plan.Plan:
    """Measure and return a plan (added to ``into`` when given; not saved)."""
    bad = [m for m in m_values if m not in plan.BUCKETS]
    if bad:
        raise ValueError(f"tune measures the plan's M buckets {list(plan.BUCKETS)}; got {bad}")
    result = into or plan.Plan()
    gen = torch.Generator().manual_seed(0)
    jobs = [(Scheme.parse(s), k, n) for s in schemes for k, n in shapes]
    with torch.inference_mode():
        for scheme, k, n in tqdm(jobs, desc="lowbit tune", disable=None if progress else True):
            w = torch.randn(n, k, generator=gen) / k**0.5
            act = torch.tensor([0.05]) if scheme.static_activations else None
            qw = formats.quantize_weight(w, scheme, act_scale=act)
            cpu = choose_backend(scheme, "cpu", "cpu")
            packed = cpu.prepack(qw)
            ids = plan.paths_for(scheme.kernel_family)
            live = [plan.AUTO] + [p for p in plan.runnable_paths(scheme.kernel_family) if p != "scalar"]
            dtype = torch.bfloat16 if scheme.weight_only else torch.float32
            key = plan.key(str(scheme), "cpu", n, k)
            entry, timings = result.entries.setdefault(key, {}), result.timings.setdefault(key, {})
            for m in sorted(m_values):
                x = torch.randn(m, k, generator=gen).to(dtype)
                fns = {name: (lambda _, p=dataclasses.replace(packed, paths=((plan.BUCKETS[-1], ids[name]),)):
                              cpu.apply(x, p, None)) for name in live}
                times = interleaved_seconds(fns)
                best = min(times, key=times.get)
                previous = entry.get(max([b for b in entry if b < m], default=0))
                for keep in ("auto", previous):  # within noise of the fastest: prefer these
                    if keep in times and times[keep] <= (1 + HYSTERESIS) * times[best]:
                        best = keep
                        break
                entry[m], timings[m] = best, times
                live = [p for p in live if p == "auto" or times[p] <= PRUNE_FACTOR * times[best]]
    return result
