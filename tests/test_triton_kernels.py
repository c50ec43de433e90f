"""The Triton kernels (lowbit.kernels) against the reference.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); with one, on CUDA tensors, compiled. Integer results (quantized
activations, the int8 GEMM's accumulator and its fp32 epilogue) match the reference bit for
bit; the weight-only GEMMs match within the fp32 summation bound. Two interpreter limits
shape the tests: its fp32 -> bf16 conversion truncates instead of rounding to nearest, so
bf16 outputs there are allowed one bf16 step; and its bf16 ``tl.dot`` is wrong, so the
weight-only launcher upcasts bf16 to fp32 before the dot when interpreting (the bf16 dot
itself is covered on the GPU and by the ahead-of-time compile test).
"""

from __future__ import annotations

import copy

import lowbit
import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    TRITON_DEVICE,
    TRITON_INTERPRETED,
    activation,
    assert_linear_close,
    assert_same_rounding,
    int4_weight,
    int8_values,
    int8_weight,
)
from hypothesis import given
from hypothesis import strategies as st
from lowbit import reference
from lowbit.kernels import configs, int8_mm, ops, weight_only

DEV = TRITON_DEVICE
seeds = st.integers(0, 2**31 - 1)


# --- quantize / dequantize ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (3, 4, 100), (2, 20000)])
def test_quantize_per_token_is_bitwise_the_reference(dtype, shape):
    x = activation(shape, dtype, DEV, seed=shape[-1])
    x[0, ..., :] = 0  # an all-zero row: scale 1, codes 0
    q, s = ops.quantize_per_token(x)
    qr, sr = reference.quantize_per_token(x.cpu())
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@given(m=st.integers(1, 9), k=st.integers(1, 300), nc=st.booleans(), seed=seeds)
def test_quantize_per_token_any_shape_and_stride(m, k, nc, seed):
    x = activation((m, k), torch.float16, DEV, seed, noncontiguous=nc)
    q, s = ops.quantize_per_token(x)
    qr, sr = reference.quantize_per_token(x.cpu())
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_per_tensor_is_bitwise_the_reference(dtype):
    x = activation((6, 130), dtype, DEV, seed=3)
    scale = (x.float().abs().amax() / 200).reshape(1)  # some values clamp at +-127
    assert torch.equal(ops.quantize_per_tensor(x, scale).cpu(), reference.quantize_per_tensor(x.cpu(), scale.cpu()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,k", [(1, 8), (7, 300), (33, 64), (9, 1000)])
def test_dequantize_int8(dtype, n, k):
    w, s = int8_weight(n, k, seed=n, device=DEV)
    assert_same_rounding(ops.dequantize_int8(w, s, dtype), reference.dequantize_int8(w.cpu(), s.cpu(), dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,k,g", [(1, 64, 32), (7, 256, 64), (33, 384, 128), (5, 40, 40), (3, 600, 600)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_int4(dtype, n, k, g, symmetric):
    p, s, z = int4_weight(n, k, g, symmetric, seed=k, device=DEV)
    ref = reference.dequantize_int4(p.cpu(), s.cpu(), None if z is None else z.cpu(), g, dtype)
    assert_same_rounding(ops.dequantize_int4(p, s, z, g, dtype), ref)


# --- int8 scaled matmul ------------------------------------------------------------------------


def _int8_case(m, n, k, seed, bias=True):
    a, b = int8_values((m, k), seed, DEV), int8_values((n, k), seed + 1, DEV)
    g = torch.Generator().manual_seed(seed)
    sa = (torch.rand(m, generator=g) * 1e-3).to(DEV)
    sb = (torch.rand(n, generator=g) * 1e-3).to(DEV)
    b_ = torch.randn(n, generator=g).to(DEV) if bias else None
    return a, b, sa, sb, b_


@given(m=st.integers(1, 70), n=st.integers(1, 70), k=st.integers(1, 300), dtype=st.sampled_from(FLOAT_DTYPES),
       bias=st.booleans(), seed=seeds)
def test_int8_scaled_mm_is_bitwise_the_reference(m, n, k, dtype, bias, seed):
    a, b, sa, sb, b_ = _int8_case(m, n, k, seed % 1000, bias)
    ref = reference.int8_scaled_mm(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), None if b_ is None else b_.cpu(), dtype)
    assert_same_rounding(ops.int8_scaled_mm(a, b, sa, sb, b_, dtype), ref)


# Both lists in the interpreter; on a GPU the device's own (compiling the other list's
# configs costs minutes of the GPU check; tests/test_triton_aot.py compiles both for both).
ARCHS = ["ampere", "hopper"] if TRITON_INTERPRETED else [configs.arch()]


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_scaled_mm_every_autotune_config(arch):
    a, b, sa, sb, b_ = _int8_case(37, 70, 200, 11)
    ref = reference.int8_scaled_mm(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), b_.cpu(), torch.float32)
    for cfg in configs.CONFIGS["int8_mm"][arch]:
        assert torch.equal(int8_mm.int8_scaled_mm(a, b, sa, sb, b_, torch.float32, config=cfg).cpu(), ref), cfg


def test_int8_scaled_mm_strided_a():
    a, b, sa, sb, b_ = _int8_case(9, 20, 64, 5)
    wide = torch.zeros(9, 100, dtype=torch.int8, device=DEV)
    wide[:, 10:74] = a
    view = wide[:, 10:74]  # row stride 100
    assert torch.equal(ops.int8_scaled_mm(view, b, sa, sb, b_, torch.float32).cpu(),
                       reference.int8_scaled_mm(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), b_.cpu(), torch.float32))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_w8a8_linear_is_bitwise_the_reference(static, dtype):
    x = activation((2, 3, 160), dtype, DEV, seed=4)
    w, s = int8_weight(45, 160, seed=4, device=DEV)
    bias = torch.randn(45).to(DEV)
    x_scale = (x.float().abs().amax() / 127).reshape(1) if static else None
    ref = reference.w8a8_linear(x.cpu(), w.cpu(), s.cpu(), bias.cpu(), None if x_scale is None else x_scale.cpu())
    assert_same_rounding(ops.w8a8_linear(x, w, s, bias, x_scale), ref)


# --- weight-only GEMM / GEMV ---------------------------------------------------------------------


def _w4(n, k, g, symmetric, seed=0):
    p, s, z = int4_weight(n, k, g, symmetric, seed=seed, device=DEV)
    return (p, s, z), weight_only.prepack_int4(p, s, z, g)


def _check_w4(y, x, canonical, g, bias):
    p, s, z = (t.cpu() if t is not None else None for t in canonical)
    xc, bc = x.cpu(), None if bias is None else bias.cpu()
    ref = reference.w4a16_linear(xc, p, s, z, g, bc)
    assert_linear_close(y.cpu(), ref, xc, reference.dequantize_int4(p, s, z, g, torch.float32), bc)


@pytest.mark.parametrize("variant,m", [("gemv", 1), ("gemv", 3), ("gemv", 4), ("gemm", 1), ("gemm", 5), ("gemm", 33)])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a16_variants_and_splits(variant, m, split_k, g, symmetric):
    k, n = 512, 72
    canonical, w = _w4(n, k, g, symmetric, seed=m + g)
    x = activation((m, k), torch.float16, DEV, seed=m)
    bias = torch.randn(n).to(DEV).half()
    y = weight_only.linear(x, w, bias, variant=variant, split_k=split_k)
    _check_w4(y, x, canonical, g, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 4, 17])
def test_w4a16_every_dtype(dtype, m):
    canonical, w = _w4(40, 256, 64, False, seed=m)
    x = activation((m, 256), dtype, DEV, seed=m)
    _check_w4(ops.weight_only_linear(x, w.codes, w.scales, w.zeros, None, 64, 4, 40, 256), x, canonical, 64, None)


@pytest.mark.parametrize("k", [40, 72, 96, 1000])
@pytest.mark.parametrize("m", [2, 9])
def test_w4a16_per_row_group_and_k_not_a_multiple_of_32(k, m):
    """G = K: the only case where K need not be a multiple of 32 (padded at prepack)."""
    canonical, w = _w4(24, k, k, False, seed=k)
    x = activation((m, k), torch.float32, DEV, seed=k, noncontiguous=True)
    _check_w4(weight_only.linear(x, w), x, canonical, k, None)


@pytest.mark.parametrize("family", ["wo_gemm", "wo_gemv"])
@pytest.mark.parametrize("arch", ARCHS)
def test_w4a16_every_autotune_config(family, arch):
    m = 3 if family == "wo_gemv" else 20
    canonical, w = _w4(72, 256, 128, False, seed=1)
    x = activation((m, 256), torch.float16, DEV, seed=2)
    for cfg in configs.CONFIGS[family][arch]:
        y = weight_only.linear(x, w, variant=family[3:], config=cfg, split_k=1)
        _check_w4(y, x, canonical, 128, None)


def test_w4a16_3d_and_noncontiguous_input():
    canonical, w = _w4(30, 128, 32, True, seed=3)
    x = activation((2, 3, 128), torch.float16, DEV, seed=3, noncontiguous=True)
    y = ops.weight_only_linear(x, w.codes, w.scales, w.zeros, None, 32, 4, 30, 128)
    assert y.shape == (2, 3, 30)
    _check_w4(y, x, canonical, 32, None)


@pytest.mark.parametrize("m", [1, 4, 6, 40])
def test_w8a16(m):
    wq, s = int8_weight(50, 320, seed=m, device=DEV)
    w = weight_only.prepack_int8(wq, s)
    x = activation((m, 320), torch.float16, DEV, seed=m)
    bias = torch.randn(50).to(DEV).half()
    y = ops.weight_only_linear(x, w.codes, w.scales, None, bias, w.group_size, 8, 50, 320)
    xc, wc, sc, bc = x.cpu(), wq.cpu(), s.cpu(), bias.cpu()
    assert_linear_close(y.cpu(), reference.w8a16_linear(xc, wc, sc, bc), xc, reference.dequantize_int8(wc, sc, torch.float32), bc)


# --- shape choices and the shared pruner ---------------------------------------------------------


def test_split_k_is_chosen_by_shape():
    assert configs.split_k(1, 4096, 4096, 128) > 1  # 32 tiles cannot fill an H200's SMs
    assert configs.split_k(1, 14336, 4096, 128) < configs.split_k(1, 4096, 4096, 128)
    assert configs.split_k(256, 4096, 4096, 128) == 1  # large M: plain tiling
    for m, n, k in [(1, 4096, 4096), (16, 4096, 14336), (4, 14336, 4096)]:
        s = configs.split_k(m, n, k, 128)
        assert k % (s * 128) == 0


def test_pruner_keeps_only_configs_that_fit():
    cands = configs.CONFIGS["wo_gemm"]["hopper"]
    args = dict(M=3, N=4096, K=4096, KP=4096, G=32)
    kept = configs.prune(cands, args, SPLIT_K=1)
    assert kept and all(c.kwargs["BLOCK_K"] == 32 for c in kept)
    args = dict(M=3, N=4096, K=4096, KP=4096, G=128)
    assert all(4096 % (c.kwargs["BLOCK_K"] * 8) == 0 for c in configs.prune(cands, args, SPLIT_K=8))
    with pytest.raises(ValueError, match="no kernel config fits"):
        configs.prune(cands, dict(M=3, N=64, K=96, KP=96, G=32), SPLIT_K=2)


def test_pruner_drops_oversized_tiles():
    import os

    cands = configs.CONFIGS["int8_mm"]["hopper"]
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        small = configs.prune(cands, dict(M=8, N=4096, K=4096))
        big = configs.prune(cands, dict(M=4096, N=4096, K=4096))
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    assert all(c.kwargs["BLOCK_M"] <= 16 for c in small) and len(big) == len(cands)


def test_gemv_is_used_up_to_four_rows():
    canonical, w = _w4(40, 128, 32, False)
    with pytest.raises(ValueError, match="at most 4 rows"):
        weight_only.linear(activation((5, 128), torch.float16, DEV), w, variant="gemv")


# --- errors, fakes, compile, backend ----------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    canonical, w = _w4(40, 128, 32, False)
    with pytest.raises(ValueError, match="K = 64 features"):
        weight_only.linear(activation((2, 64), torch.float16, DEV), w)
    with pytest.raises(TypeError, match="x must be float32"):
        weight_only.linear(torch.ones(2, 128, dtype=torch.int32, device=DEV), w)
    with pytest.raises(ValueError, match="split_k = 8 does not divide"):
        weight_only.linear(activation((2, 128), torch.float16, DEV), w, split_k=8)
    with pytest.raises(ValueError, match="does not fit"):
        weight_only.linear(activation((9, 128), torch.float16, DEV), w, config=configs.CONFIGS["wo_gemm"]["hopper"][0])
    a, b, sa, sb, _ = _int8_case(4, 8, 32, 0)
    with pytest.raises(ValueError, match="a is \\[M, K\\]"):
        ops.int8_scaled_mm(a, b[:, :16].contiguous(), sa, sb, None, torch.float32)
    with pytest.raises(TypeError, match="b must be torch.int8"):
        ops.int8_scaled_mm(a, b.float(), sa, sb, None, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        weight_only.prepack_int4(*canonical[:3], 48)


def _op_cases():
    canonical, w = _w4(40, 128, 32, False)
    x = activation((3, 128), torch.float16, DEV)
    wq, s = int8_weight(40, 128, device=DEV)
    a, b, sa, sb, bias = _int8_case(5, 40, 128, 0)
    return [
        (torch.ops.lowbit_triton.quantize_per_token, (x,)),
        (torch.ops.lowbit_triton.quantize_per_tensor, (x, torch.tensor([0.1], device=DEV))),
        (torch.ops.lowbit_triton.int8_scaled_mm, (a, b, sa, sb, bias, torch.bfloat16)),
        (torch.ops.lowbit_triton.w8a8_linear, (x, wq, s, None, None)),
        (torch.ops.lowbit_triton.weight_only_linear, (x, w.codes, w.scales, w.zeros, None, 32, 4, 40, 128)),
        (torch.ops.lowbit_triton.dequantize_int8, (wq, s, torch.float16)),
        (torch.ops.lowbit_triton.dequantize_int4, (*canonical, 32, torch.float32)),
    ]


def test_ops_pass_opcheck():
    # Under the interpreter the functionalized (AOT) trace would run the kernels on fake
    # tensors (see kernels/ops.py), so there only the schema and fake-tensor checks apply.
    utils = ("test_schema", "test_faketensor") if TRITON_INTERPRETED else None
    for op, args in _op_cases():
        if utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=utils)


def test_quantized_layer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    layer = torch.nn.Linear(128, 40).to(DEV).half()
    q = lowbit.nn.QuantLinear.from_linear(layer, "w4a16-g32", backend="triton")
    x = activation((3, 128), torch.float16, DEV)
    eager = q(x)
    backend = "eager" if TRITON_INTERPRETED else "inductor"  # Inductor runs Triton kernels only on a GPU
    compiled = torch.compile(q, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static", "w8a16", "w4a16-g64", "w4a16-g128-sym"])
def test_quantize_with_the_triton_backend(scheme):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).half().to(DEV)
    x = activation((5, 256), torch.float16, DEV, seed=1)
    calibration = [x] if lowbit.Scheme.parse(scheme).static_activations else None
    by_reference, by_triton = copy.deepcopy(model), copy.deepcopy(model)
    lowbit.quantize(by_reference, scheme, backend="reference", calibration=calibration, progress=False)
    lowbit.quantize(by_triton, scheme, backend="triton", calibration=calibration, progress=False)
    assert [m.backend.name for m in by_triton.modules() if hasattr(m, "backend")] == ["triton", "triton"]
    y, y_ref = by_triton(x).float(), by_reference(x).float()
    assert (y - y_ref).norm() / y_ref.norm() < 5e-3


def test_backend_listing():
    status = {s.name: s for s in lowbit.list_backends()}["triton"]
    assert status.available
    assert ("interpreter" in status.reason) == TRITON_INTERPRETED


def test_m_bucket_and_interpreter_switch(monkeypatch):
    assert [configs.m_bucket(m) for m in (1, 3, 16, 17, 10000)] == [1, 4, 16, 32, 4096]
    assert configs.interpreting() == TRITON_INTERPRETED
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "0")
    assert not configs.autotuning()
    assert len(configs.prune(configs.CONFIGS["int8_mm"]["hopper"], dict(M=4096, N=4096, K=4096))) == 1


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="on a GPU bench/gpu_check.sh runs the full benchmark")
def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """bench/gpu.py checks each kernel against the reference before timing it; its smoke
    mode runs that path on tiny shapes here, so the GPU check is not the first run."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[1] / "bench" / "gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    kernels = {r["kernel"] for r in result["gemm"]}
    assert {"triton int8_scaled_mm", "triton w8a8 (quant+mm)", "triton w4a16 g128", "triton w8a16"} <= kernels
    assert all(r["ms"] > 0 for r in result["gemm"] + result["memory"])
    assert "| memory-bound kernel |" in proc.stdout


@pytest.mark.parametrize("split_k", [1, 4])
def test_the_triton_kernels_give_the_same_bits_twice(split_k):
    # Split K stores each split's partial tile apart and sums them in order: no atomics.
    x = activation((5, 512), torch.float16, DEV, seed=3)
    packed, scales, zeros = int4_weight(96, 512, 128, False, seed=4, device=DEV)
    w = weight_only.prepack_int4(packed, scales, zeros, 128)
    runs = [weight_only.linear(x, w, None, split_k=split_k, variant="gemm") for _ in range(2)]
    assert torch.equal(*runs)
    q, sw = int8_weight(96, 512, seed=5, device=DEV)
    assert torch.equal(ops.w8a8_linear(x, q, sw, None, None), ops.w8a8_linear(x, q, sw, None, None))
