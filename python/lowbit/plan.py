"""Batch-aware kernel choice: which kernel path each quantized layer takes at each M.

A plan maps (scheme, device, N, K) to a kernel path per M bucket (powers of two up to
2048; an M takes the smallest bucket at or above it, the last one beyond). ``lowbit tune``
measures every path on this machine and stores the plan as JSON in the user's cache
directory (``$LOWBIT_CACHE``, default ``~/.cache/lowbit``; ``$LOWBIT_PLAN`` names another
file); quantized layers look their shape up when they are built or moved (``prepack``)
and pick the path by M in ``forward`` — a comparison of M against constants, which
torch.compile turns into guards, not graph breaks. Without a plan entry the kernels'
built-in heuristics apply (path -1).

The CPU kernel paths (the ``path`` argument of the prepacked ops) are one table in C++
(csrc/cpu/paths.h), read here as ``KERNEL_PATHS``: each path has a name (unique within its
family, what plans store), an id (what the ops take), a family (``Scheme.kernel_family``:
"int8" or "weight_only") and whether this CPU can run it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import warnings
from pathlib import Path

import torch

from lowbit import _extension
from lowbit.formats import Scheme

FORMAT_VERSION = 1
BUCKETS = tuple(2**i for i in range(12))  # 1 .. 2048
AUTO = "auto"  # the kernel's own choice by M (id -1)
AUTO_ID = -1


@dataclasses.dataclass(frozen=True)
class KernelPath:
    name: str
    id: int
    family: str
    unavailable: str  # empty when this CPU can run the path, else why not

    @property
    def runnable(self) -> bool:
        return not self.unavailable


KERNEL_PATHS: tuple[KernelPath, ...] = tuple(KernelPath(*row) for row in _extension.load("_C").kernel_paths())
FAMILIES = ("int8", "weight_only")


def paths_for(family: str) -> dict[str, int]:
    """The kernel paths of a family by name, with "auto" (-1): a plan may name any of them."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {FAMILIES}")
    return {AUTO: AUTO_ID, **{p.name: p.id for p in KERNEL_PATHS if p.family == family}}


def path_id(family: str, name: str) -> int:
    """The id the ops take for path ``name`` of ``family``."""
    ids = paths_for(family)
    if name not in ids:
        raise ValueError(f"unknown {family} kernel path {name!r}; expected one of {sorted(ids)}")
    return ids[name]


def runnable_paths(family: str) -> list[str]:
    """The fixed paths of ``family`` this CPU can run, narrowest first."""
    paths_for(family)
    return [p.name for p in KERNEL_PATHS if p.family == family and p.runnable]


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def machine_id() -> dict:
    """What a plan's measurements depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def default_path() -> Path:
    if os.environ.get("LOWBIT_PLAN"):
        return Path(os.environ["LOWBIT_PLAN"])
    key = hashlib.sha256(json.dumps(machine_id(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"plan-{key}.json"


def key(scheme: str, device: str, n: int, k: int) -> str:
    return f"{scheme}|{device}|{n}|{k}"


@dataclasses.dataclass
class Plan:
    """``entries[key(scheme, device, n, k)][bucket] = path name``; ``timings`` keeps what
    ``lowbit tune`` measured (seconds per path), for the record; ``source`` is the file it
    was loaded from or saved to, if any (warnings name it)."""

    entries: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=machine_id)
    timings: dict[str, dict[int, dict[str, float]]] = dataclasses.field(default_factory=dict)
    source: str | None = None

    def paths(self, scheme: Scheme, device: str, n: int, k: int) -> tuple[tuple[int, int], ...] | None:
        """``((largest M, path id), ...)`` ascending, one pair per run of buckets that share a
        path (so that dispatch compares M with as few bounds as possible; an M beyond the
        last bound takes the last path), or None without an entry or when the entry is
        "auto" throughout.

        A plan tuned on another machine may name paths this CPU cannot run (an AVX-512 path
        on an AVX2 CPU): their buckets dispatch automatically instead, with a warning that
        names the paths and the plan, so that the plan never breaks a model."""
        entry_key = key(str(scheme), device, n, k)
        entry = self.entries.get(entry_key)
        if not entry:
            return None
        family = scheme.kernel_family
        ids = paths_for(family)
        unavailable = {p.name: p.unavailable for p in KERNEL_PATHS if p.family == family and not p.runnable}
        dropped = sorted({entry[b] for b in entry if entry[b] in unavailable})
        if dropped:
            reasons = "; ".join(f"{name}: {unavailable[name]}" for name in dropped)
            warnings.warn(f"plan {self.source or '(in memory)'}, entry {entry_key}: this CPU cannot run the {family} "
                          f"kernel paths {dropped} ({reasons}); their M buckets dispatch automatically",
                          RuntimeWarning, stacklevel=2)
        runs: list[tuple[int, int]] = []
        for b in sorted(entry):
            path = AUTO_ID if entry[b] in unavailable else ids[entry[b]]
            if runs and runs[-1][1] == path:
                runs[-1] = (b, path)
            else:
                runs.append((b, path))
        return None if all(p == AUTO_ID for _, p in runs) else tuple(runs)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path else default_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format_version": FORMAT_VERSION, "machine": self.machine,
                   "entries": {k: {str(b): p for b, p in v.items()} for k, v in self.entries.items()},
                   "timings": {k: {str(b): t for b, t in v.items()} for k, v in self.timings.items()}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        tmp.replace(path)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            payload = json.loads(Path(path).read_text())
            if payload.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {payload.get('format_version')!r}, expected {FORMAT_VERSION}")
            entries = {}
            for k, v in payload["entries"].items():
                scheme, device, n, kk = k.split("|")
                names = paths_for(Scheme.parse(scheme).kernel_family)
                row = {int(b): p for b, p in v.items()}
                bad = [p for p in row.values() if p not in names]
                if bad or not set(row) <= set(BUCKETS) or device not in ("cpu", "cuda"):
                    raise ValueError(f"entry {k!r} names unknown paths {bad} or buckets {sorted(set(row) - set(BUCKETS))}")
                int(n), int(kk)
                entries[k] = row
            timings = {k: {int(b): t for b, t in v.items()} for k, v in payload.get("timings", {}).items()}
            return cls(entries, payload.get("machine", {}), timings, str(path))
        except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a usable lowbit plan: {e}") from e


_active: list = []  # [Plan | None] once loaded


def active_plan() -> Plan | None:
    """The plan quantized layers use: set with ``use_plan``/``set_plan``, else the cached
    plan of this machine if ``lowbit tune`` wrote one (loaded once)."""
    if not _active:
        path = default_path()
        _active.append(Plan.load(path) if path.exists() else None)
    return _active[0]


def set_plan(plan: Plan | None) -> None:
    """Use ``plan`` (None: no plan, built-in heuristics) for layers built from now on."""
    _active[:] = [plan]


@contextlib.contextmanager
def use_plan(plan: Plan | None):
    previous = list(_active)
    set_plan(plan)
    try:
        yield plan
    finally:
        _active[:] = previous

