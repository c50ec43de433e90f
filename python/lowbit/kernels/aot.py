"""Compile every Triton kernel and autotune config ahead of time for sm_80 and sm_90.

No GPU is needed: ``triton.compile`` lowers a kernel to PTX and a cubin for a given target,
and the cuobjdump bundled with Triton reads the cubin's resource usage. This catches what
the interpreter never shows: compile errors, register spills (a stack frame or local
memory in the cubin) and GEMMs that did not get tensor-core instructions (``mma`` on
Ampere, ``mma``/``wgmma`` on Hopper).

Kernels whose results tests hold bit-exact against the reference (``exact``) must hold no
fused multiply-add in their PTX: the compiler contracts ``a * b + c`` by default, which
rounds once where the reference rounds twice (``lowbit.kernels.rounding``).

Each kernel is compiled with the specializations a real launch gets on the shapes lowbit
targets: every pointer 16-byte aligned and the sizes and strides that are multiples of 16
marked so (M is left unmarked: it is any batch size).

Run ``python -m lowbit.kernels.aot`` for the table; tests/test_triton_aot.py runs it in CI.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl  # noqa: F401  (kernels' globals)
from triton.backends.compiler import GPUTarget

from lowbit.kernels import configs, quantize

TARGETS = {"ampere": 80, "hopper": 90}
# Integer arguments that are multiples of 16 on the shapes lowbit targets.
ALIGNED_INTS = {"N", "K", "KP", "G", "stride_xm", "stride_am", "stride_om"}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    kernel: str  # "module.attribute" of the @triton.jit function
    cc: int
    pointers: tuple[tuple[str, str], ...]  # (argument, Triton pointer type)
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 3
    needs_mma: bool = False
    exact: bool = False  # bit-exact against the reference: no contracted multiply-add


@dataclasses.dataclass
class Result:
    spec: Spec
    regs: int = 0
    stack: int = 0
    local: int = 0
    mma: bool = False
    fmas: int = 0  # fp32 fused multiply-adds in the PTX
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem()

    def problem(self) -> str:
        if self.error:
            return self.error
        if self.stack or self.local:
            return f"spills: {self.stack} B stack, {self.local} B local"
        if self.spec.needs_mma and not self.mma:
            return "no tensor-core (mma) instruction"
        if self.spec.exact and self.fmas:
            return f"{self.fmas} contracted fp32 multiply-adds in an exact kernel"
        return ""


def fused_multiply_adds(ptx: str) -> int:
    """fp32 fused multiply-adds in PTX (``fma.rn.f32``, with or without ``.ftz``)."""
    return len(re.findall(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.f32\b", ptx))


def _kernel(path: str):
    module, attr = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def _cfg_name(cfg: triton.Config) -> str:
    tiles = "x".join(str(v) for k, v in cfg.kwargs.items() if k.startswith("BLOCK_"))
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"


def specs() -> list[Spec]:
    """Every kernel x config x target lowbit ships."""
    out = []
    mm = "lowbit.kernels.int8_mm.int8_mm_kernel"
    gemm = "lowbit.kernels.weight_only.wo_gemm_kernel"
    gemv = "lowbit.kernels.weight_only.wo_gemv_kernel"
    for arch, cc in TARGETS.items():
        for cfg in configs.CONFIGS["int8_mm"][arch]:
            out.append(Spec(f"int8_mm bf16 out {_cfg_name(cfg)}", mm, cc,
                            (("a_ptr", "*i8"), ("b_ptr", "*i8"), ("a_scale_ptr", "*fp32"), ("b_scale_ptr", "*fp32"),
                             ("bias_ptr", "*bf16"), ("out_ptr", "*bf16")),
                            (("OUT_DTYPE_ID", 1), ("HAS_BIAS", True), *cfg.kwargs.items()),
                            cfg.num_warps, cfg.num_stages, needs_mma=True, exact=True))
        # W4A16 (asymmetric, bf16 x) and W8A16 (fp16 x), with and without split-K.
        for bits, x_type, zeros in ((4, "bf16", True), (8, "fp16", False)):
            w_type = "*i32" if bits == 4 else "*i8"
            for split in (1, 4):
                for cfg in configs.CONFIGS["wo_gemm"][arch]:
                    if not configs.fits(cfg, 64, 4096, 4096, 128, split, 4096):
                        continue  # the pruner never runs it with this split
                    out.append(Spec(f"wo_gemm int{bits} {x_type} split {split} {_cfg_name(cfg)}", gemm, cc,
                                    (("x_ptr", f"*{x_type}"), ("w_ptr", w_type), ("s_ptr", "*fp32"), ("z_ptr", "*u8"),
                                     ("bias_ptr", f"*{x_type}"), ("out_ptr", f"*{x_type}"), ("acc_ptr", "*fp32")),
                                    (("BITS", bits), ("HAS_ZEROS", zeros), ("HAS_BIAS", True), ("SPLIT_K", split),
                                     ("EVEN_K", True), ("ONE_GROUP", bits == 8), ("DOT_FP32", False),
                                     *cfg.kwargs.items()),
                                    cfg.num_warps, cfg.num_stages, needs_mma=True))
                for cfg in configs.CONFIGS["wo_gemv"][arch]:
                    out.append(Spec(f"wo_gemv int{bits} {x_type} split {split} {_cfg_name(cfg)}", gemv, cc,
                                    (("x_ptr", f"*{x_type}"), ("w_ptr", w_type), ("s_ptr", "*fp32"), ("z_ptr", "*u8"),
                                     ("bias_ptr", f"*{x_type}"), ("out_ptr", f"*{x_type}"), ("acc_ptr", "*fp32")),
                                    (("BITS", bits), ("HAS_ZEROS", zeros), ("HAS_BIAS", True), ("SPLIT_K", split),
                                     ("EVEN_K", True), ("ROWS", 4), *cfg.kwargs.items()),
                                    cfg.num_warps, cfg.num_stages))
        q = "lowbit.kernels.quantize."
        for block_k, one_pass in ((4096, True), (quantize.ONE_PASS_MAX_K, True), (4096, False)):
            out.append(Spec(f"quantize rows K<={block_k} {'one' if one_pass else 'two'} pass", q + "_quantize_rows_kernel",
                            cc, (("x_ptr", "*bf16"), ("q_ptr", "*i8"), ("scale_ptr", "*fp32"),
                                 ("static_scale_ptr", "*fp32")),
                            (("STATIC", False), ("BLOCK_K", block_k), ("ONE_PASS", one_pass)),
                            num_warps=max(1, min(16, block_k // 1024)), exact=True))
        out.append(Spec("dequantize int8 -> bf16", q + "_dequantize_int8_kernel", cc,
                        (("w_ptr", "*i8"), ("s_ptr", "*fp32"), ("out_ptr", "*bf16")),
                        (("BLOCK_R", quantize.DEQUANT_BLOCK_R), ("BLOCK_C", quantize.DEQUANT_BLOCK_C)), exact=True))
        out.append(Spec("dequantize int4 -> bf16", q + "_dequantize_int4_kernel", cc,
                        (("packed_ptr", "*u8"), ("s_ptr", "*fp32"), ("z_ptr", "*u8"), ("out_ptr", "*bf16")),
                        (("HAS_ZEROS", True), ("BLOCK_R", quantize.DEQUANT_BLOCK_R),
                         ("BLOCK_C", quantize.DEQUANT_BLOCK_C // 2)), exact=True))
        out.append(Spec("split-K epilogue -> bf16", "lowbit.kernels.weight_only._split_k_epilogue_kernel", cc,
                        (("acc_ptr", "*fp32"), ("bias_ptr", "*bf16"), ("out_ptr", "*bf16")),
                        (("HAS_BIAS", True), ("SPLIT_K", 4), ("BLOCK", 1024)), exact=True))
    return out


def _cuobjdump() -> str:
    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_spec(spec: Spec) -> Result:
    result = Result(spec)
    start = time.perf_counter()
    fn = _kernel(spec.kernel)
    pointers, constexprs = dict(spec.pointers), dict(spec.constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", spec.cc, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # a compile error is the finding, reported per spec
        result.error = f"compile error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result
    result.mma = bool(re.search(r"\b(w?gmma|mma)\.", compiled.asm["ptx"]))
    result.fmas = fused_multiply_adds(compiled.asm["ptx"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    result.regs, result.stack, result.local = (int(fields.get(k, 0)) for k in ("REG", "STACK", "LOCAL"))
    result.seconds = time.perf_counter() - start
    return result


def compile_all(workers: int | None = None, progress: bool = False) -> list[Result]:
    """Compile every spec, ``workers`` processes at a time (default: the CPU count)."""
    todo = specs()
    workers = workers or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = pool.map(compile_spec, todo)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(todo), desc="compiling Triton kernels")
        return list(results)


def table(results: list[Result]) -> str:
    lines = [f"{'sm':>3} {'kernel / config':<58} {'regs':>4} {'mma':>4} {'fma':>4} {'s':>5}  problem"]
    for r in results:
        lines.append(f"{r.spec.cc:>3} {r.spec.name:<58} {r.regs:>4} {'yes' if r.mma else '-':>4} {r.fmas:>4} "
                     f"{r.seconds:>5.1f}  {r.problem()}")
    return "\n".join(lines)


def main() -> int:
    results = compile_all(progress=True)
    print(table(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results)} compiled, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
