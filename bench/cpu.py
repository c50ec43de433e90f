"""CPU backend benchmark: lowbit's CPU kernels against torch's own CPU paths, side by side.

    python bench/cpu.py                   # Llama-3-8B shapes, M in 1..2048, all schemes
    python bench/cpu.py --quick           # 4096 x 4096 only, M in {1, 32, 512}
    python bench/cpu.py --rotate          # weights rotated through more than the L3 cache
    python bench/cpu.py --json out.json   # full results

Per scheme, one table: lowbit's time, GFLOP/s, weight GB/s and % of the measured
ceiling (vpdpbusd rate for W8A8, fp32 FMA rate for the weight-only kernels, which
compute in fp32), then the time ratio of each baseline to lowbit (> 1: lowbit faster):
  W8A8  (fp32 activations): torch dynamic int8 Linear (fbgemm/x86), fp32 nn.Linear
  W4A16 (bf16 activations, g128): torch._weight_int4pack_mm_for_cpu, bf16 nn.Linear
  W8A16 (bf16 activations): torch._weight_int8pack_mm, bf16 nn.Linear
"""

from __future__ import annotations

import argparse
import os
import platform
import warnings

import torch
from harness import LLAMA3_8B, M_VALUES, Ceilings, Row, median_seconds, table, write_json
from tqdm import tqdm

import lowbit
from lowbit import formats, ops, reference

GROUP = 128


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * (1024 if text.endswith("K") else 2**20)
    except (OSError, ValueError):
        return 32 * 2**20


def copies_for(weight_bytes: int, rotate: bool) -> int:
    """Enough weight copies that cycling through them streams from DRAM."""
    return 1 + (2 * llc_bytes()) // max(weight_bytes, 1) if rotate else 1


def w8a8_impls(k, n, copies, gen):
    impls = {"lowbit": [], "fbgemm": [], "fp32": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(copies):
            linear = torch.nn.Linear(k, n)
            q, s = formats.quantize_int8_per_channel(linear.weight.detach())
            packed = ops.int8_prepack(q)
            bias = linear.bias.detach()
            impls["lowbit"].append(lambda x, p=packed, s=s, b=bias: ops.w8a8_linear_prepacked(x, p, s, b))
            dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
            impls["fbgemm"].append(dyn)
            impls["fp32"].append(linear)
    return impls, torch.float32, n * k


def w4a16_impls(k, n, copies, gen):
    impls = {"lowbit": [], "int4pack": [], "bf16": []}
    for _ in range(copies):
        w = torch.randn(n, k, generator=gen) / k**0.5
        packed, scales, zeros = formats.quantize_int4_groupwise(w, GROUP, symmetric=False)
        wp, params = ops.w4a16_prepack(packed, scales, zeros, GROUP)
        impls["lowbit"].append(lambda x, wp=wp, pr=params: ops.w4a16_linear_prepacked(x, wp, pr, GROUP, n, None))
        q = reference.unpack_int4(packed)
        tiny = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.stack([scales.t(), (-(zeros.float() - 8) * scales).t()], dim=-1).to(torch.bfloat16).contiguous()
        impls["int4pack"].append(lambda x, t=tiny, sz=sz: torch._weight_int4pack_mm_for_cpu(x, t, GROUP, sz))
        linear = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        impls["bf16"].append(linear)
    return impls, torch.bfloat16, n * k // 2 + scales.numel() * 5


def w8a16_impls(k, n, copies, gen):
    impls = {"lowbit": [], "int8pack": [], "bf16": []}
    for _ in range(copies):
        w = torch.randn(n, k, generator=gen) / k**0.5
        q, s = formats.quantize_int8_per_channel(w)
        wp = ops.w8a16_prepack(q)
        impls["lowbit"].append(lambda x, wp=wp, s=s: ops.w8a16_linear_prepacked(x, wp, s, None))
        impls["int8pack"].append(lambda x, q=q, s=s.to(torch.bfloat16): torch._weight_int8pack_mm(x, q, s))
        impls["bf16"].append(torch.nn.Linear(k, n, bias=False).to(torch.bfloat16))
    return impls, torch.bfloat16, n * k + n * 4


SCHEMES = {
    "w8a8": (w8a8_impls, "int8_ops", ["fbgemm", "fp32"]),
    "w4a16": (w4a16_impls, "fp32_flops", ["int4pack", "bf16"]),
    "w8a16": (w8a16_impls, "fp32_flops", ["int8pack", "bf16"]),
}


@torch.inference_mode()
def run(schemes, shapes, m_values, rotate: bool, ceilings: Ceilings) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    jobs = [(s, k, n) for s in schemes for k, n in shapes]
    for scheme, k, n in tqdm(jobs, desc="benchmarking", leave=False):
        build, ceiling_name, _ = SCHEMES[scheme]
        impls, dtype, weight_bytes = build(k, n, 1, gen)
        copies = copies_for(weight_bytes, rotate)
        if copies > 1:
            impls, dtype, weight_bytes = build(k, n, copies, gen)
        for m in m_values:
            x = torch.randn(m, k, generator=gen).to(dtype)
            for name, fns in impls.items():
                seconds = median_seconds(lambda i, fns=fns: fns[i % len(fns)](x))
                rows.append(Row(scheme, k, n, m, name, seconds, weight_bytes, getattr(ceilings, ceiling_name)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="w8a8,w4a16,w8a16")
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 and M in {1, 32, 512} only")
    parser.add_argument("--m", help="comma-separated M values")
    parser.add_argument("--rotate", action="store_true", help="rotate weight copies through more than the L3")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args(argv)
    schemes = args.schemes.split(",")
    for s in schemes:
        if s not in SCHEMES:
            parser.error(f"unknown scheme {s!r}; choose from {sorted(SCHEMES)}")
    shapes = [(4096, 4096)] if args.quick else LLAMA3_8B
    m_values = [int(v) for v in args.m.split(",")] if args.m else ([1, 32, 512] if args.quick else M_VALUES)

    ceilings = Ceilings.measure()
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU path {lowbit.cpu_isa()}, LLC {llc_bytes() / 2**20:.0f} MiB, "
          f"weights {'rotated past the LLC' if args.rotate else 'reused (warm cache)'}")
    print(f"ceilings measured now: vpdpbusd {ceilings.int8_ops / 1e9:.0f} GOP/s, fp32 FMA "
          f"{ceilings.fp32_flops / 1e9:.0f} GFLOP/s, DRAM copy {ceilings.copy_bytes / 1e9:.1f} GB/s\n")
    rows = run(schemes, shapes, m_values, args.rotate, ceilings)
    for scheme in schemes:
        _, ceiling_name, baselines = SCHEMES[scheme]
        title = f"{scheme} (% of {'vpdpbusd' if ceiling_name == 'int8_ops' else 'fp32 FMA'} ceiling)"
        print(table([r for r in rows if r.scheme == scheme], "lowbit", baselines, title) + "\n")
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": lowbit.cpu_isa(),
                "rotate": args.rotate, "host": os.uname().nodename}
        write_json(args.json, rows, ceilings, meta)


if __name__ == "__main__":
    main()
