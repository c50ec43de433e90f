"""``lowbit bench``: every lowbit backend and kernel path beside torch's own paths.

For each scheme and layer shape, the implementations timed at each M (rows of the
activation) are:

* ``lowbit:cpu`` — the CPU backend as it runs without a plan (the kernels' built-in
  choice), ``lowbit:cpu[plan]`` — through the tuned plan (when it has the shape),
  ``lowbit:cpu[<path>]`` — kernel paths fixed (``lowbit.plan``), when asked for;
* ``lowbit:reference`` — the pure-PyTorch reference backend;
* torch: ``torch:fp32`` / ``torch:bf16`` ``nn.Linear``, and per scheme its quantized
  counterpart: ``torch:fbgemm`` (dynamic int8 Linear) for w8a8, ``torch:int8pack``
  (``_weight_int8pack_mm``) for w8a16, ``torch:int4pack``
  (``_weight_int4pack_mm_for_cpu``) for asymmetric w4a16.

W8A8 runs on fp32 activations (the fbgemm baseline takes fp32), the weight-only schemes
on bf16. Each row reports ms, the speedup over each torch baseline timed beside it,
TFLOP/s, weight GB/s and the percentage of the measured ceiling (the int8 multiply-add
rate for W8A8, the fp32 FMA rate for the weight-only kernels, which compute in fp32; each
with the widest instructions of the CPU path, ``Ceilings``); ``crossover``
lists the M values at which each lowbit implementation beats bf16.

Up to ``READ_MAX_M`` rows, where a weight-only or int8 kernel streams its weights and does
little else, ``memory:read`` times a plain read of as many bytes as the packed weights
(``torch.sum`` over a float32 buffer of that size, the same copies with ``rotate``): its
GB/s column is the memory ceiling those rows are bound by, measured beside them (warm,
from whichever cache level holds that many bytes; rotated, from DRAM). ``bounds`` turns
both ceilings into the most any W8A8 kernel could gain over fbgemm at those rows.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import warnings
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from lowbit import formats, plan, reference
from lowbit.backends import choose_backend
from lowbit.backends.cpu import CpuPacked, best_cpu_isa, cpu_isa
from lowbit.bench.timing import Ceilings, interleaved_seconds, llc_bytes
from lowbit.formats import Scheme

DEFAULT_M = [1, 8, 32, 128, 512, 2048]
BASELINE = "torch:bf16"
READ = "memory:read"
INT8_BASELINE = "torch:fbgemm"
READ_MAX_M = 16


@dataclasses.dataclass
class Row:
    scheme: str
    k: int
    n: int
    m: int
    impl: str
    seconds: float
    weight_bytes: int
    ceiling: float  # ops/s the percentage refers to

    @property
    def tflops(self) -> float:
        return 2 * self.m * self.n * self.k / self.seconds / 1e12

    @property
    def weight_gbs(self) -> float:
        return self.weight_bytes / self.seconds / 1e9

    @property
    def percent_of_ceiling(self) -> float:
        return 100 * self.tflops * 1e12 / self.ceiling


@dataclasses.dataclass
class Bound:
    """A lowbit implementation's speedup over torch's integer baseline at one (scheme, shape,
    M), and the most any kernel could reach there by each floor and by both."""

    scheme: str
    k: int
    n: int
    m: int
    impl: str
    measured: float
    read: float     # the baseline's time over a plain read of the weight bytes
    compute: float  # the baseline's time over the multiply-adds at the int8 ceiling
    bound: float    # the baseline's time over the larger of the two floors


Impl = tuple[list[Callable[[torch.Tensor], torch.Tensor]], torch.dtype]


def _lowbit_impls(scheme: Scheme, w: torch.Tensor, paths: Sequence[str], active: plan.Plan | None) -> dict:
    act = torch.tensor([0.05]) if scheme.static_activations else None
    qw = formats.quantize_weight(w, scheme, act_scale=act)
    dtype = torch.bfloat16 if scheme.weight_only else torch.float32
    cpu = choose_backend(scheme, "cpu", "cpu")
    packed: CpuPacked = cpu.prepack(qw)
    impls = {"lowbit:cpu": ([lambda x, p=dataclasses.replace(packed, paths=None): cpu.apply(x, p, None)], dtype)}
    if active and plan.key(str(scheme), "cpu", qw.out_features, qw.in_features) in active.entries:
        entry = active.paths(scheme, "cpu", qw.out_features, qw.in_features)
        impls["lowbit:cpu[plan]"] = ([lambda x, p=dataclasses.replace(packed, paths=entry): cpu.apply(x, p, None)],
                                     dtype)
    ids = plan.paths_for(scheme.kernel_family)
    for name in paths:
        fixed = dataclasses.replace(packed, paths=((plan.BUCKETS[-1], ids[name]),))
        impls[f"lowbit:cpu[{name}]"] = ([lambda x, p=fixed: cpu.apply(x, p, None)], dtype)
    ref = choose_backend(scheme, "cpu", "reference")
    rp = ref.prepack(qw)
    impls["lowbit:reference"] = ([lambda x, p=rp: ref.apply(x, p, None)], dtype)
    return impls, qw.nbytes()


def _torch_impls(scheme: Scheme, w: torch.Tensor) -> dict:
    n, k = w.shape
    fp32 = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        fp32.weight.copy_(w)
    bf16 = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(w)
    impls = {"torch:fp32": ([fp32], torch.float32), BASELINE: ([bf16], torch.bfloat16)}
    if not scheme.weight_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(fp32), {torch.nn.Linear},
                                                         dtype=torch.qint8)
        impls[INT8_BASELINE] = ([dyn], torch.float32)
    elif not scheme.is_int4:
        q, s = formats.quantize_int8_per_channel(w)
        sb = s.to(torch.bfloat16)
        impls["torch:int8pack"] = ([lambda x, q=q, s=sb: torch._weight_int8pack_mm(x, q, s)], torch.bfloat16)
    elif not scheme.symmetric and scheme.group_size is not None:
        g = scheme.group_size
        packed, scales, zeros = formats.quantize_int4_groupwise(w, g, False)
        tiny = torch._convert_weight_to_int4pack_for_cpu(reference.unpack_int4(packed).to(torch.int32), 1)
        sz = torch.stack([scales.t(), (-(zeros.float() - 8) * scales).t()], dim=-1).to(torch.bfloat16).contiguous()
        impls["torch:int4pack"] = ([lambda x, t=tiny, sz=sz: torch._weight_int4pack_mm_for_cpu(x, t, g, sz)],
                                   torch.bfloat16)
    return impls


def _copies(weight_bytes: int, rotate: bool) -> int:
    """Enough weight copies that cycling through them streams from DRAM."""
    return 1 + (2 * llc_bytes()) // max(weight_bytes, 1) if rotate else 1


@dataclasses.dataclass
class BenchResult:
    rows: list[Row]
    ceilings: Ceilings
    meta: dict

    def schemes(self) -> list[str]:
        return list(dict.fromkeys(r.scheme for r in self.rows))

    def crossover(self) -> dict[tuple[str, int, int, str], list[int]]:
        """(scheme, k, n, lowbit impl) -> the M values at which it beats torch:bf16."""
        base = {(r.scheme, r.k, r.n, r.m): r.seconds for r in self.rows if r.impl == BASELINE}
        out: dict = {}
        for r in self.rows:
            if r.impl.startswith("lowbit:"):
                wins = out.setdefault((r.scheme, r.k, r.n, r.impl), [])
                if r.seconds < base.get((r.scheme, r.k, r.n, r.m), 0):
                    wins.append(r.m)
        return out

    def bounds(self) -> list[Bound]:
        """How far any kernel could beat torch's integer baseline (fbgemm) at each W8A8 shape
        and M with the weight read timed: the baseline's time over the larger of two floors,
        the multiply-adds at the machine's int8 rate (``Ceilings.int8_instruction``) and a
        plain read of the weight bytes (each a time no GEMM that does that work can go
        under). Empty on AMX machines, whose tile rate the vector probe does not measure."""
        if self.meta.get("isa") == "amx":
            return []
        times = {(r.scheme, r.k, r.n, r.m, r.impl): r for r in self.rows}
        out = []
        for r in self.rows:
            base = times.get((r.scheme, r.k, r.n, r.m, INT8_BASELINE))
            read = times.get((r.scheme, r.k, r.n, r.m, READ))
            if not r.impl.startswith("lowbit:") or base is None or read is None:
                continue
            compute = 2 * r.m * r.n * r.k / self.ceilings.int8_ops
            out.append(Bound(r.scheme, r.k, r.n, r.m, r.impl, base.seconds / r.seconds,
                             base.seconds / read.seconds, base.seconds / compute,
                             base.seconds / max(read.seconds, compute)))
        return out

    def table(self) -> str:
        lines = [_header(self.meta, self.ceilings)]
        cross = self.crossover()
        for scheme in self.schemes():
            rows = [r for r in self.rows if r.scheme == scheme]
            for k, n in dict.fromkeys((r.k, r.n) for r in rows):
                shape_rows = [r for r in rows if (r.k, r.n) == (k, n)]
                impls = list(dict.fromkeys(r.impl for r in shape_rows))
                # Speedup over each torch baseline timed here (_torch_impls: fp32 and bf16
                # nn.Linear and the scheme's fbgemm, int8pack or int4pack), bf16 first.
                refs = sorted((i for i in impls if i.startswith("torch:")), key=lambda i: i != BASELINE)
                lines.append(f"\n{scheme}  K={k} N={n}  (cells: ms, speedup over each torch baseline, TFLOP/s, "
                             f"weight GB/s, % of the {_ceiling_name(scheme, self.ceilings)} ceiling)")
                width = max(len(i) for i in impls) + 2
                lines.append(f"{'M':>6}  {'impl':<{width}}{'ms':>10}" + "".join(f"{'vs ' + i.removeprefix('torch:'):>12}" for i in refs)
                             + f"{'TFLOP/s':>9}{'GB/s w':>8}{'% ceil':>8}")
                base = {(r.impl, r.m): r.seconds for r in shape_rows if r.impl in refs}
                for m in dict.fromkeys(r.m for r in shape_rows):
                    for r in (r for r in shape_rows if r.m == m):
                        speeds = "".join(f"{base[i, m] / r.seconds:>11.2f}x" if (i, m) in base else f"{'-':>12}"
                                         for i in refs)
                        lines.append(f"{m:>6}  {r.impl:<{width}}{r.seconds * 1e3:>10.3f}{speeds}"
                                     f"{r.tflops:>9.3f}{r.weight_gbs:>8.1f}{r.percent_of_ceiling:>8.1f}")
                for impl in impls:
                    if impl.startswith("lowbit:"):
                        wins = cross.get((scheme, k, n, impl), [])
                        lines.append(f"  {impl} beats bf16 at M = {', '.join(map(str, wins)) if wins else 'none measured'}")
        bounds = self.bounds()
        if bounds:
            lines.append(f"\nbounds: speedup over {INT8_BASELINE} measured, and the most any kernel could reach "
                         f"(floors: a read of the weight bytes; the multiply-adds at the {self.ceilings.int8_instruction} "
                         "ceiling)")
            lines.append(f"{'scheme':<12}{'K x N':>13}{'M':>5}  {'impl':<20}{'measured':>9}{'read':>8}{'compute':>9}"
                         f"{'bound':>8}")
            for b in bounds:
                lines.append(f"{b.scheme:<12}{f'{b.k} x {b.n}':>13}{b.m:>5}  {b.impl:<20}{b.measured:>8.2f}x"
                             f"{b.read:>7.2f}x{b.compute:>8.2f}x{b.bound:>7.2f}x")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"meta": self.meta, "ceilings": dataclasses.asdict(self.ceilings),
                "rows": [dataclasses.asdict(r) | {"tflops": r.tflops, "weight_gbs": r.weight_gbs,
                                                  "percent_of_ceiling": r.percent_of_ceiling} for r in self.rows],
                "crossover": [{"scheme": s, "k": k, "n": n, "impl": i, "beats_bf16_at_m": m}
                              for (s, k, n, i), m in self.crossover().items()],
                "bounds": [dataclasses.asdict(b) for b in self.bounds()]}

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    def plot(self, path: str) -> None:
        """Speedup over torch:bf16 against M, one panel per (scheme, shape), one line per implementation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plotted = [r for r in self.rows if r.impl != READ]  # a ceiling, not a Linear
        panels = list(dict.fromkeys((r.scheme, r.k, r.n) for r in plotted))
        cols = min(3, len(panels))
        rows_ = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.6 * rows_ + 0.8), squeeze=False)
        names = list(dict.fromkeys(r.impl for r in plotted))
        colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one colour per impl
        for ax, (scheme, k, n) in zip(axes.flat, panels):
            rs = [r for r in plotted if (r.scheme, r.k, r.n) == (scheme, k, n)]
            base = {r.m: r.seconds for r in rs if r.impl == BASELINE}
            for impl in dict.fromkeys(r.impl for r in rs):
                pts = [(r.m, base[r.m] / r.seconds) for r in rs if r.impl == impl and r.m in base]
                ax.plot(*zip(*pts), marker="o", markersize=3, label=impl, color=colors[impl],
                        linestyle="--" if impl.startswith("torch") else "-")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{scheme} K={k} N={n}", fontsize=9)
            ax.set_xlabel("M")
            ax.set_ylabel(f"speedup over {BASELINE}")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=colors[n], marker="o", linestyle="--" if n.startswith("torch") else "-")
                   for n in names]
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=7)
        fig.tight_layout(rect=(0, 0.8 / (3.6 * rows_ + 0.8) + 0.02, 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _ceiling_name(scheme: str, c: Ceilings) -> str:
    return c.fma_instruction if Scheme.parse(scheme).weight_only else c.int8_instruction


def _header(meta: dict, c: Ceilings) -> str:
    return (f"lowbit {meta['lowbit']}, torch {meta['torch']}, {meta['cpu']}, {meta['threads']} threads, best CPU path "
            f"{meta['isa']} (lowbit ran {meta['lowbit_isa']}, torch's kernels {meta['torch_isa']}), weights "
            f"{'rotated past the LLC' if meta['rotate'] else 'reused (warm cache)'}\n"
            f"ceilings: int8 {c.int8_instruction} {c.int8_ops / 1e9:.0f} GOP/s, fp32 {c.fma_instruction} "
            f"{c.fp32_flops / 1e9:.0f} GFLOP/s, "
            f"DRAM copy {c.copy_bytes / 1e9:.1f} GB/s (cached per machine; --remeasure)")


def run(
    schemes: Sequence[str] = ("w8a8", "w4a16-g128", "w8a16"),
    shapes: Sequence[tuple[int, int]] = ((4096, 4096),),
    m_values: Sequence[int] = DEFAULT_M,
    *,
    paths: Sequence[str] | None = None,
    impls: Sequence[str] | None = None,
    rotate: bool = False,
    remeasure: bool = False,
    rounds: int = 3,
    progress: bool = True,
) -> BenchResult:
    """Time every implementation (see the module doc) on every (scheme, shape, M).

    ``paths``: the fixed CPU kernel paths to time (default none; ``["all"]``: every path
    this CPU runs but ``scalar``); ``impls``: keep only implementations whose name contains one of these;
    ``rounds``: round-robin rounds per (shape, M), each implementation's fastest kept.
    """
    import lowbit

    parsed = [Scheme.parse(s) for s in schemes]
    if any(m < 1 for m in m_values):
        raise ValueError(f"M values must be positive, got {list(m_values)}")
    ceilings = Ceilings.cached(remeasure)
    active = plan.active_plan()
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    jobs = [(s, k, n) for s in parsed for k, n in shapes]
    with torch.inference_mode():
        for scheme, k, n in tqdm(jobs, desc="lowbit bench", disable=None if progress else True):
            if k % scheme.group_for(k):
                raise ValueError(f"{scheme} needs K divisible by its group size; got K={k}")
            if paths and list(paths) == ["all"]:
                chosen = [p for p in plan.runnable_paths(scheme.kernel_family) if p != "scalar"]
            else:
                chosen = list(paths or [])
            known = plan.paths_for(scheme.kernel_family)
            if set(chosen) - set(known):
                raise ValueError(f"{scheme}: unknown kernel paths {sorted(set(chosen) - set(known))}; "
                                 f"{scheme} takes {sorted(known)}")
            ceiling = ceilings.fp32_flops if scheme.weight_only else ceilings.int8_ops
            table: dict[str, Impl] = {}
            weight_bytes = 0
            w0 = torch.randn(n, k, generator=gen) / k**0.5
            copies = _copies(n * k, rotate)
            for c in range(copies):
                w = w0 if c == 0 else torch.randn(n, k, generator=gen) / k**0.5
                built, weight_bytes = _lowbit_impls(scheme, w, chosen, active)
                for name, (fns, dtype) in {**built, **_torch_impls(scheme, w)}.items():
                    table.setdefault(name, ([], dtype))[0].extend(fns)
            if impls:
                table = {name: v for name, v in table.items() if any(s in name for s in impls) or name == BASELINE}
            if any(m <= READ_MAX_M for m in m_values):
                bufs = [torch.ones(weight_bytes // 4) for _ in range(copies)]
                read: Impl = ([lambda x, b=b: b.sum() for b in bufs], torch.float32)
            for m in m_values:
                x32 = torch.randn(m, k, generator=gen)
                inputs = {torch.float32: x32, torch.bfloat16: x32.to(torch.bfloat16)}
                timing = table | ({READ: read} if m <= READ_MAX_M else {})
                timed = interleaved_seconds({name: (lambda i, fns=fns, x=inputs[dtype]: fns[i % len(fns)](x))
                                             for name, (fns, dtype) in timing.items()}, rounds=rounds)
                rows.extend(Row(str(scheme), k, n, m, name, s, weight_bytes, ceiling) for name, s in timed.items())
    meta = {"lowbit": lowbit.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": plan.machine_id()["cpu"] or platform.machine(), "isa": best_cpu_isa(), "lowbit_isa": cpu_isa(),
            "torch_isa": torch.backends.cpu.get_cpu_capability(), "rotate": rotate,
            "plan": str(plan.default_path()) if active else None}
    return BenchResult(rows, ceilings, meta)
