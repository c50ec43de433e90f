"""GPU benchmark of lowbit's Triton and CUDA kernels against torch's own paths, in one process.

    python bench/gpu.py --out DIR          # on a GPU (bench/gpu_check.sh calls it)
    TRITON_INTERPRET=1 python bench/gpu.py --smoke   # CPU: tiny shapes, checks the script runs

Per Llama-3-8B shape (K x N = 4096x4096, 4096x14336, 14336x4096) and M in {1, 16, 64, 256,
1024, 4096} it times, with CUDA events (``triton.testing.do_bench``, median):
  - bf16 ``torch.matmul`` (cuBLAS), ``torch._int_mm`` plus a separate fp32 epilogue (M > 16,
    its limit), tinygemm ``torch._weight_int4pack_mm`` (g128);
  - lowbit triton: int8 scaled matmul on pre-quantized activations, W8A8 (quantize + GEMM),
    W4A16 g128 asymmetric, W8A16;
  - lowbit cuda: the int8 tensor-core GEMM (csrc/cuda) on pre-quantized activations, W8A8,
    and the W4A16 tensor-core GEMM (g128 asymmetric).
Every implementation's output is checked against a float reference before it is timed.
Weights are rotated through enough copies to exceed twice the L2 cache, so small-M
timings read weights from HBM as a real model's layers do. The memory-bound kernels
(per-token quantization, int4/int8 dequantization; Triton and CUDA) are reported as a
percentage of the device copy bandwidth measured in the same run, the GEMMs against the
measured bf16 and int8 matrix rates. Writes ``gpu_bench.json`` under --out and prints a
Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import torch

import lowbit
from lowbit import formats, reference
from lowbit.kernels import ops as tops
from lowbit.kernels import weight_only

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 16, 64, 256, 1024, 4096]
L2_BYTES = 60 * 2**20


def bench(fn, cuda: bool) -> float:
    """Median milliseconds of ``fn``."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rotating(make, nbytes: int):
    """A function cycling through copies of a weight, enough of them to exceed twice the L2."""
    copies = [make() for _ in range(max(1, min(8, math.ceil(2 * L2_BYTES / max(nbytes, 1)))))]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return nxt


def ceilings(dev, cuda: bool, smoke: bool) -> dict:
    n = 2**26 if not smoke else 2**20
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), cuda)
    s = 8192 if not smoke else 256
    a = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    bf16_ms = bench(lambda: a @ a, cuda)
    ai = torch.randint(-127, 128, (s, s), device=dev, dtype=torch.int8)
    int8_ms = bench(lambda: torch._int_mm(ai, ai.t()), cuda)
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "bf16_TFLOPs": 2 * s**3 / bf16_ms / 1e9,
            "int8_TOPs": 2 * s**3 / int8_ms / 1e9}


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tinygemm_weight(w: torch.Tensor, group: int):
    """torch's int4 tinygemm layout for w (bf16 [N, K]): asymmetric per-group, as torchao packs it."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    zero = lo + scale * 8
    q = ((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


def gemm_rows(dev, cuda: bool, smoke: bool, ceil: dict) -> list[dict]:
    rows = []
    shapes = SHAPES if not smoke else [(256, 128)]
    ms = MS if not smoke else [1, 16, 64]
    xdtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 dot is wrong
    for k, n in shapes:
        torch.manual_seed(k + n)
        w = torch.randn(n, k, device=dev) / k**0.5
        qw8, s8 = formats.quantize_int8_per_channel(w)
        p4, sc4, z4 = formats.quantize_int4_groupwise(w, 128, symmetric=False)
        w_ref = w.to(xdtype)
        bf_next = rotating(lambda: w.to(xdtype), n * k * 2)
        i8_next = rotating(lambda: qw8.clone(), n * k)
        w4_next = rotating(lambda: weight_only.prepack_int4(p4, sc4, z4, 128), n * k // 2)
        w8_next = rotating(lambda: weight_only.prepack_int8(qw8, s8), n * k)
        if cuda:
            tg_next = rotating(lambda: tinygemm_weight(w.to(torch.bfloat16), 128), n * k // 2)
            cw_next = rotating(lambda: tuple(t.to(dev) for t in lowbit.ops.w4a16_cuda_prepack(
                p4.cpu(), sc4.cpu(), z4.cpu(), 128)), n * k // 2)
        for m in ms:
            x = torch.randn(m, k, device=dev).to(xdtype)
            xq, sx = reference.quantize_per_token(x)
            ref8 = reference.w8a8_linear(x, qw8, s8, None)
            ref4 = reference.w4a16_linear(x, p4, sc4, z4, 128, None)
            ref_w8 = reference.w8a16_linear(x, qw8, s8, None)
            impls = {
                "bf16 matmul (cuBLAS)": (lambda: x @ bf_next().t(), x @ w_ref.t(), 0.02),
                "triton int8_scaled_mm": (lambda: tops.int8_scaled_mm(xq, i8_next(), sx, s8, None, xdtype), ref8, 1e-3),
                "cuda int8_scaled_mm": (lambda: lowbit.ops.int8_scaled_mm(xq, i8_next(), sx, s8, None, xdtype), ref8,
                                        1e-3),
                "cuda w8a8 (quant+mm)": (lambda: lowbit.ops.w8a8_linear(x, i8_next(), s8, None, None), ref8, 1e-3),
                "triton w8a8 (quant+mm)": (lambda: tops.w8a8_linear(x, i8_next(), s8, None, None), ref8, 1e-3),
                "triton w4a16 g128": (lambda: _wo(x, w4_next()), ref4, 1e-2),
                "triton w8a16": (lambda: _wo(x, w8_next()), ref_w8, 1e-2),
            }
            if m > 16:
                impls["torch._int_mm + epilogue"] = (
                    lambda: (torch._int_mm(xq, i8_next().t()).float() * sx[:, None] * s8[None, :]).to(xdtype),
                    ref8, 1e-3)
            if not cuda:  # no CUDA kernels to run on CPU tensors
                del impls["cuda int8_scaled_mm"], impls["cuda w8a8 (quant+mm)"]
            if cuda:
                impls["cuda w4a16 g128"] = (
                    lambda: lowbit.ops.w4a16_linear_cuda_prepacked(x, *cw_next(), 128, n, None), ref4, 1e-2)
                impls["tinygemm _weight_int4pack_mm"] = (
                    lambda: torch._weight_int4pack_mm(x, *_tg(tg_next(), 128)), None, None)
            times = {}
            for name, (fn, ref, tol) in impls.items():
                y = fn()
                err = rel_err(y, ref) if ref is not None else float("nan")
                if ref is not None and not err < tol:
                    raise AssertionError(f"{name} K={k} N={n} M={m}: relative error {err:.2e} over {tol}")
                times[name] = bench(fn, cuda)
            bf = times["bf16 matmul (cuBLAS)"]
            for name, ms_ in times.items():
                flops = 2 * m * n * k
                peak = ceil["int8_TOPs"] if "int8" in name or "w8a8" in name or "_int_mm" in name else ceil["bf16_TFLOPs"]
                rows.append({"kernel": name, "K": k, "N": n, "M": m, "ms": ms_, "vs_bf16": bf / ms_,
                             "vs_int_mm": times.get("torch._int_mm + epilogue", float("nan")) / ms_,
                             "vs_tinygemm": times.get("tinygemm _weight_int4pack_mm", float("nan")) / ms_,
                             "TFLOPs": flops / ms_ / 1e9, "pct_peak": 100 * flops / ms_ / 1e9 / peak})
            print(f"K={k} N={n} M={m}: " + ", ".join(f"{a} {b:.4f} ms" for a, b in times.items()), file=sys.stderr)
    return rows


def _wo(x, p):
    return tops.weight_only_linear(x, p.codes, p.scales, p.zeros, None, p.group_size, p.bits, p.out_features,
                                   p.in_features)


def _tg(packed_sz, group):
    packed, sz = packed_sz
    return packed, group, sz


def memory_rows(dev, cuda: bool, smoke: bool, ceil: dict) -> list[dict]:
    rows = []
    n, k = (14336, 4096) if not smoke else (64, 256)
    w = torch.randn(n, k, device=dev) / k**0.5
    qw8, s8 = formats.quantize_int8_per_channel(w)
    p4, sc4, z4 = formats.quantize_int4_groupwise(w, 128, symmetric=False)
    x = torch.randn(n, k, device=dev).to(torch.bfloat16 if cuda else torch.float16)
    cases = {
        "quantize_per_token": (lambda impl: impl.quantize_per_token(x), x.numel() * (x.element_size() + 1) + n * 4,
                               reference.quantize_per_token(x)[0]),
        "dequantize_int8 -> bf16": (lambda impl: impl.dequantize_int8(qw8, s8, torch.bfloat16), n * k * 3 + n * 4,
                                    reference.dequantize_int8(qw8, s8, torch.bfloat16)),
        "dequantize_int4 g128 -> bf16": (lambda impl: impl.dequantize_int4(p4, sc4, z4, 128, torch.bfloat16),
                                         n * k // 2 + n * k * 2 + sc4.numel() * 5,
                                         reference.dequantize_int4(p4, sc4, z4, 128, torch.bfloat16)),
    }
    impls = {"triton": tops}
    if cuda:
        impls["cuda"] = lowbit.ops
    for case, (run, nbytes, ref) in cases.items():
        for name, impl in impls.items():
            y = run(impl)
            y = y[0] if isinstance(y, tuple) else y
            assert rel_err(y, ref) < 1e-2, f"{name} {case}: wrong result"
            ms_ = bench(lambda: run(impl), cuda)
            gbps = nbytes / ms_ / 1e6
            rows.append({"kernel": f"{name} {case}", "N": n, "K": k, "ms": ms_, "GBps": gbps,
                         "pct_copy": 100 * gbps / ceil["copy_GBps"]})
    return rows


def markdown(ceil, gemm, mem) -> str:
    lines = [f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
             f"int8 {ceil['int8_TOPs']:.0f} TOP/s", "",
             "| kernel | K x N | M | ms | x bf16 | x _int_mm+epi | x tinygemm | TFLOP/s | % peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gemm:
        lines.append(f"| {r['kernel']} | {r['K']}x{r['N']} | {r['M']} | {r['ms']:.4f} | {r['vs_bf16']:.2f} | "
                     f"{r['vs_int_mm']:.2f} | {r['vs_tinygemm']:.2f} | {r['TFLOPs']:.1f} | {r['pct_peak']:.0f} |")
    lines += ["", "| memory-bound kernel | N x K | ms | GB/s | % of copy |", "|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['kernel']} | {r['N']}x{r['K']} | {r['ms']:.4f} | {r['GBps']:.0f} | {r['pct_copy']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU tensors (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    dev = "cuda" if cuda else "cpu"
    ceil = ceilings(dev, cuda, args.smoke)
    gemm = gemm_rows(dev, cuda, args.smoke, ceil)
    mem = memory_rows(dev, cuda, args.smoke, ceil)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter smoke run)"}
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "ceilings": ceil, "gemm": gemm, "memory": mem},
                                                   indent=1))
    print(f"{meta['device']}, torch {meta['torch']}, {meta['date']}")
    print(markdown(ceil, gemm, mem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
