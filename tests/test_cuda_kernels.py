"""The CUDA kernels (csrc/cuda): their index math on the CPU, their binaries, and — on a
GPU — their results against the reference.

Without a GPU these checks still run: the CPU models of the int8 and W4A16 tensor-core
GEMMs (csrc/cuda/int8_gemm_model.cpp, w4a16_model.cpp, in the test-only extension
lowbit._models), which replay the kernels'
shared-memory layout, ldmatrix addresses, weight shuffle and fragment mapping with the PTX
ISA's definitions, must equal the reference (int8 exactly; W4A16 within the fp32
summation bound), on the real prepacked weights; and the built extension's cubins (sm_80
and sm_90a) must hold the GEMMs with tensor-core instructions and without spills or
stack frames.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import lowbit
import pytest
import torch
from conftest import FLOAT_DTYPES, MODELS, activation, assert_linear_close, int4_weight, int8_values, int8_weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit import ops, reference

needs_models = pytest.mark.skipif(MODELS is None, reason="lowbit._models not built (LOWBIT_TEST_MODELS=ON; make test)")
WGMMA_TILE = MODELS.wgmma_tile if MODELS else 0  # the Hopper kernel's tile id; mma.sync tiles are below it
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")


# --- the CPU model of the int8 GEMM ---------------------------------------------------------


@needs_models
@given(m=st.integers(1, 140), n=st.integers(1, 140), k16=st.integers(1, 20), tile=st.integers(0, WGMMA_TILE),
       seed=st.integers(0, 2**31 - 1))
def test_int8_gemm_model_is_exact(m, n, k16, tile, seed):
    a, b = int8_values((m, 16 * k16), seed), int8_values((n, 16 * k16), seed + 1)
    out = torch.ops.lowbit_model.int8_gemm(a, b, tile)
    assert torch.equal(out, (a.double() @ b.double().t()).to(torch.int32))


@needs_models
def test_int8_gemm_model_covers_full_tiles_and_extremes():
    for tile in range(WGMMA_TILE + 1):
        a = torch.full((130, 256), -127, dtype=torch.int8)
        b = int8_values((260, 256), 7)
        b[::3] = 127
        assert torch.equal(torch.ops.lowbit_model.int8_gemm(a, b, tile), (a.double() @ b.double().t()).int())


@needs_models
def test_int8_gemm_model_rejects_bad_input():
    a = int8_values((4, 32), 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.lowbit_model.int8_gemm(a[:, :24].contiguous(), a[:, :24].contiguous(), 0)
    with pytest.raises(ValueError, match="tile must be"):
        torch.ops.lowbit_model.int8_gemm(a, a, WGMMA_TILE + 1)


# --- the W4A16 weight shuffle and its CPU model ---------------------------------------------------


@needs_models
@given(m=st.integers(1, 70), n=st.integers(1, 600), groups=st.integers(1, 5), g=st.sampled_from([32, 64, 128, None]),
       sym=st.booleans(), m_tiles=st.sampled_from([0, 1, 2, 4]), splits=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_w4a16_prepack_and_model_match_the_reference(m, n, groups, g, sym, m_tiles, splits, seed):
    # Every tile (one, two and four m16 tiles; 0: the launcher's choice by M) and split-K
    # order; group K of any even length (K % 8 != 0 included: the launcher pads x).
    k = groups * (g or 2 * (seed % 150 + 1))
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    gs = g or k
    codes, s_t, z_t = ops.w4a16_cuda_prepack(packed, scales, zeros, gs)
    x = activation((m, k), torch.float32, seed=seed)
    splits = min(splits, (k + 63) // 64)
    out = torch.ops.lowbit_model.w4a16_gemm(x, codes, s_t, z_t, gs, n, m_tiles, splits)
    ref = reference.w4a16_linear(x, packed, scales, zeros, gs, None)
    assert_linear_close(out, ref, x, reference.dequantize_int4(packed, scales, zeros, gs, torch.float32))


@needs_models
@pytest.mark.parametrize("k,g", [(40, 40), (36, 36), (96, 32), (200, 200), (320, 64), (384, 128)])
def test_w4a16_model_stages_every_group_it_reads(k, g):
    # The kernel reads a group's scales from the stage slot the loader filled when the group
    # started; the model poisons unfilled slots (NaN scales), so a group read from the wrong
    # slot, or a slice starting more groups than there are slots, fails here. Distinct
    # scales per group: a group read in place of another shows.
    packed, scales, zeros = int4_weight(300, k, g, False, seed=k)
    scales = scales * torch.arange(1, scales.shape[1] + 1, dtype=torch.float32)
    codes, s_t, z_t = ops.w4a16_cuda_prepack(packed, scales, zeros, g)
    x = activation((20, k), torch.float32, seed=k)
    ref = reference.w4a16_linear(x, packed, scales, zeros, g, None)
    w = reference.dequantize_int4(packed, scales, zeros, g, torch.float32)
    for splits in range(1, (k + 63) // 64 + 1):
        for m_tiles in (1, 2, 4):
            out = torch.ops.lowbit_model.w4a16_gemm(x, codes, s_t, z_t, g, 300, m_tiles, splits)
            assert torch.isfinite(out).all(), (splits, m_tiles)
            assert_linear_close(out, ref, x, w)


@needs_models
def test_w4a16_model_rejects_bad_tiles_and_splits():
    packed, scales, zeros = int4_weight(64, 128, 32, False)
    codes, s_t, z_t = ops.w4a16_cuda_prepack(packed, scales, zeros, 32)
    x = activation((3, 128))
    with pytest.raises(ValueError, match="m_tiles must be 1, 2 or 4"):
        torch.ops.lowbit_model.w4a16_gemm(x, codes, s_t, z_t, 32, 64, 3, 1)
    with pytest.raises(ValueError, match=r"splits must be in \[1, 2\]"):
        torch.ops.lowbit_model.w4a16_gemm(x, codes, s_t, z_t, 32, 64, 1, 3)


def test_w4a16_prepack_pads_and_rejects_bad_input():
    packed, scales, zeros = int4_weight(300, 96, 32, False)
    codes, s_t, z_t = ops.w4a16_cuda_prepack(packed, scales, zeros, 32)
    assert codes.shape == (128 // 16 * 512 // 64 * 512,) and s_t.shape == z_t.shape == (4, 512)
    assert torch.all(s_t[3] == 0) and torch.all(s_t[:, 300:] == 0)  # padding contributes nothing
    sym = ops.w4a16_cuda_prepack(packed, scales, None, 32)[2]
    assert torch.all(sym == 8)
    with pytest.raises(ValueError, match="group_size"):
        ops.w4a16_cuda_prepack(packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"zeros must lie in \[0, 15\]"):
        ops.w4a16_cuda_prepack(packed, scales, zeros + 16, 32)
    with pytest.raises(TypeError, match="scales must be Float"):
        ops.w4a16_cuda_prepack(packed, scales.half(), zeros, 32)


# --- the built binaries -----------------------------------------------------------------------


def _extension() -> pathlib.Path:
    return pathlib.Path(lowbit._C.__file__)


def _cuobjdump() -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lowbit::int8_scaled_mm", "CUDA")


@needs_models
@pytest.mark.skipif(not built_with_cuda, reason="this build has no CUDA kernels (no nvcc)")
def test_cuda_binaries_have_tensor_core_gemms_without_spills():
    so = str(_extension())
    cubins = subprocess.run([_cuobjdump(), "-lelf", so], capture_output=True, text=True, check=True).stdout
    for arch in ("sm_80", "sm_90a"):
        assert f"int8_gemm_kernels.{arch}.cubin" in cubins
    usage = subprocess.run([_cuobjdump(), "-res-usage", so], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    gemms = [k for k in kernels if "16int8_gemm_kernelI" in k[0]]  # mangled name; the file name holds it too
    assert len(gemms) == 2 * WGMMA_TILE * len(FLOAT_DTYPES)  # two architectures, every tile and output type
    for name, regs, stack, local in kernels:
        assert stack == "0" and local == "0", f"{name}: {stack} B stack, {local} B local memory"
    sass = subprocess.run([_cuobjdump(), "-sass", "-fun", gemms[0][0], so], capture_output=True, text=True,
                          check=True).stdout
    assert "IMMA" in sass and "LDSM" in sass and "LDGSTS" in sass  # mma, ldmatrix, cp.async
    wgmma = [k for k in kernels if "22int8_gemm_wgmma_kernelI" in k[0]]
    assert len(wgmma) == 2 * len(FLOAT_DTYPES)
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90a", "-fun", wgmma[0][0], so], capture_output=True,
                          text=True, check=True).stdout
    assert "IGMMA" in sass  # the warpgroup MMA, in the Hopper code
    # one group of MMAs stays in flight in the k loop; all are waited for only at the end
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in sass
    w4 = [k for k in kernels if "17w4a16_gemm_kernelI" in k[0]]
    assert len(w4) == 2 * 2 * 3  # two architectures, fp16 / bf16, blocks of 1, 2 and 4 m16 tiles
    for m_tiles in (1, 2, 4):
        name = next(k[0] for k in w4 if f"6__halfLi{m_tiles}E" in k[0])
        sass = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_80", "-fun", name, so], capture_output=True,
                              text=True, check=True).stdout
        # mma, the lop3 conversion, ldmatrix, cp.async (x, codes and the scale slots)
        assert "HMMA.16816.F32" in sass and "LOP3" in sass and "LDSM" in sass and "LDGSTS" in sass, m_tiles
        # split-K's lock: an acquire load and a release store at GPU scope, no atomics
        assert "LDG.E.STRONG.GPU" in sass and "STG.E.STRONG.GPU" in sass and not re.search(r"\b(ATOM|RED)\b", sass)


# --- on a GPU -----------------------------------------------------------------------------------


@needs_gpu
@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 600), out_dtype=st.sampled_from(FLOAT_DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_int8_scaled_mm_on_cuda_is_bitwise_the_reference(m, n, k, out_dtype, bias, seed):
    a, b = int8_values((m, k), seed, "cuda"), int8_values((n, k), seed + 1, "cuda")
    sa, sb = torch.rand(m, device="cuda") * 1e-3, torch.rand(n, device="cuda") * 1e-3
    bv = torch.randn(n, device="cuda").to(out_dtype) if bias else None
    out = ops.int8_scaled_mm(a, b, sa, sb, bv, out_dtype)
    assert torch.equal(out, reference.int8_scaled_mm(a, b, sa, sb, bv, out_dtype))


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 17, 64, 129, 1000])
def test_int8_scaled_mm_on_cuda_every_tile_size(m):
    a, b = int8_values((m, 4096), m, "cuda"), int8_values((384, 4096), m + 1, "cuda")
    sa, sb = torch.rand(m, device="cuda") * 1e-4, torch.rand(384, device="cuda") * 1e-4
    assert torch.equal(ops.int8_scaled_mm(a, b, sa, sb, None, torch.bfloat16),
                       reference.int8_scaled_mm(a, b, sa, sb, None, torch.bfloat16))


@needs_gpu
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_linear_on_cuda_is_bitwise_the_reference(static):
    x = activation((3, 7, 512), torch.bfloat16, "cuda", seed=1, noncontiguous=True)
    w, s = int8_weight(200, 512, device="cuda")
    bias = torch.randn(200, device="cuda")
    xs = torch.tensor([0.04], device="cuda") if static else None
    assert torch.equal(ops.w8a8_linear(x, w, s, bias, xs), reference.w8a8_linear(x, w, s, bias, xs))


@needs_gpu
def test_unaligned_operands_are_copied_not_misread():
    a = int8_values((9, 200), 3, "cuda")[:, 1:]  # K = 199 and an odd base address
    b = int8_values((33, 199), 4, "cuda")
    sa, sb = torch.rand(9, device="cuda"), torch.rand(33, device="cuda")
    assert torch.equal(ops.int8_scaled_mm(a, b, sa, sb, None, torch.float32),
                       reference.int8_scaled_mm(a, b, sa, sb, None, torch.float32))


@needs_gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)  # fp16 / bf16 on tensor cores, fp32 on CUDA cores
@pytest.mark.parametrize("m", [1, 3, 16, 17, 32, 33, 64, 100])  # blocks of 1, 2 and 4 m16 tiles, with tails
@pytest.mark.parametrize("g,sym", [(32, False), (64, True), (128, False), (None, False)])
def test_w4a16_on_cuda_matches_the_reference(dtype, m, g, sym):
    n, k = 300, 512 if g else 200
    packed, scales, zeros = int4_weight(n, k, g, sym, seed=m)
    gs = g or k
    codes, s_t, z_t = (t.cuda() for t in ops.w4a16_cuda_prepack(packed, scales, zeros, gs))
    x = activation((m, k), dtype, "cuda", seed=m)
    bias = torch.randn(n, device="cuda").to(dtype)
    out = ops.w4a16_linear_cuda_prepacked(x, codes, s_t, z_t, gs, n, bias)
    xc, bc = x.cpu(), bias.cpu()
    ref = reference.w4a16_linear(xc, packed, scales, zeros, gs, bc)
    assert_linear_close(out.cpu(), ref, xc, reference.dequantize_int4(packed, scales, zeros, gs, torch.float32), bc)


@needs_gpu
def test_w4a16_on_cuda_every_tile_height_in_one_process():
    # Each tile height is a kernel of its own with its own shared-memory opt-in: running them
    # in turn (4, 1, 2 m16 tiles, then 4 again) shows an opt-in made for one and not another.
    packed, scales, zeros = int4_weight(320, 1024, 128, False, seed=3)
    codes, s_t, z_t = (t.cuda() for t in ops.w4a16_cuda_prepack(packed, scales, zeros, 128))
    w = reference.dequantize_int4(packed, scales, zeros, 128, torch.float32)
    for m in (100, 1, 20, 70):
        for dtype in (torch.float16, torch.bfloat16):
            x = activation((m, 1024), dtype, "cuda", seed=m)
            out = ops.w4a16_linear_cuda_prepacked(x, codes, s_t, z_t, 128, 320)
            assert_linear_close(out.cpu(), reference.w4a16_linear(x.cpu(), packed, scales, zeros, 128, None), x.cpu(), w)


@needs_gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1, 512, 1088), (2048, 4096, 4096)])
def test_w4a16_on_cuda_llama_shapes(m, n, k):
    # M = 1: split-K (K = 1088 is 17 stages: uneven splits); M = 2048: 64-row blocks.
    g = 128 if k % 128 == 0 else 64
    packed, scales, zeros = int4_weight(n, k, g, False, seed=1)
    codes, s_t, z_t = (t.cuda() for t in ops.w4a16_cuda_prepack(packed, scales, zeros, g))
    x = activation((m, k), torch.bfloat16, "cuda")
    out = ops.w4a16_linear_cuda_prepacked(x, codes, s_t, z_t, g, n)
    ref = reference.w4a16_linear(x.cpu(), packed, scales, zeros, g, None)
    assert_linear_close(out.cpu(), ref, x.cpu(), reference.dequantize_int4(packed, scales, zeros, g, torch.float32))


@needs_gpu
def test_cuda_backend_runs_w8a8_and_w4a16_layers():
    layer = torch.nn.Linear(256, 320).cuda().half()
    x = activation((4, 256), torch.float16, "cuda")
    for scheme in ("w8a8", "w4a16-g128"):
        q = lowbit.nn.QuantLinear.from_linear(layer, scheme)
        assert q.backend.name == "cuda"
        ref = lowbit.nn.QuantLinear.from_linear(layer.cpu().float(), scheme, backend="reference")(x.cpu().float())
        assert (q(x).float().cpu() - ref).norm() / ref.norm() < 1e-2
        layer.cuda().half()


@needs_gpu
def test_cuda_launchers_copy_unaligned_views_and_check_devices():
    buf = int8_values((9 * 64 + 3,), 5, "cuda")
    a = buf[3:].view(9, 64)  # contiguous, but 3 bytes past an aligned address
    b = int8_values((40, 64), 6, "cuda")
    sa, sb = torch.rand(9, device="cuda"), torch.rand(40, device="cuda")
    assert torch.equal(ops.int8_scaled_mm(a, b, sa, sb, None, torch.float32),
                       reference.int8_scaled_mm(a, b, sa, sb, None, torch.float32))
    packed, scales, zeros = int4_weight(40, 128, 32, False)
    codes, s_t, z_t = (t.cuda() for t in ops.w4a16_cuda_prepack(packed, scales, zeros, 32))
    x = activation((2, 128), torch.float16, "cuda")
    with pytest.raises(ValueError, match="one device"):
        ops.w4a16_linear_cuda_prepacked(x, codes, s_t, z_t, 32, 40, torch.ones(40, dtype=torch.float16))
    with pytest.raises(ValueError, match="group_size"):
        ops.w4a16_linear_cuda_prepacked(x, codes, s_t, z_t, 48, 40, None)


@needs_gpu
def test_every_cuda_kernel_gives_the_same_bits_twice():
    # Split-K included: the splits add their partial tiles in split order, on a lock. Every
    # W4A16 tile height (1, 2, 4 m16 tiles).
    torch.manual_seed(0)
    for m in (1, 7, 20, 64, 300):
        x = activation((m, 4096), torch.bfloat16, "cuda", seed=m)
        packed, scales, zeros = int4_weight(4096, 4096, 128, False, 1, "cuda")
        codes, s_t, z_t = (t.cuda() for t in ops.w4a16_cuda_prepack(packed.cpu(), scales.cpu(), zeros.cpu(), 128))
        for dtype in FLOAT_DTYPES:
            xd = x.to(dtype)
            runs = [ops.w4a16_linear_cuda_prepacked(xd, codes, s_t, z_t, 128, 4096) for _ in range(2)]
            assert torch.equal(*runs), (m, dtype)
        w, sw = int8_weight(4096, 4096, 2, "cuda")
        assert torch.equal(ops.w8a8_linear(x, w, sw), ops.w8a8_linear(x, w, sw))
        assert torch.equal(*(ops.quantize_per_token(x)[0] for _ in range(2)))
