"""Every CPU instruction-set path (portable, AVX2, AVX-512 VNNI) against the reference.

The paths are forced one by one with lowbit.use_cpu_isa, so each runs on this machine
(paths the CPU lacks are skipped, saying so). Shapes cover one row, row counts that are
not multiples of the 6-row tile or the 48-row chunk, columns that are not multiples of
the 64-column panel, K that is not a multiple of 4 or that spans several k blocks.
"""

from __future__ import annotations

import lowbit
import pytest
import torch
from conftest import FLOAT_DTYPES, activation, assert_linear_close, int4_weight, int8_values, int8_weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit import ops, plan, reference
from lowbit.backends.cpu import best_cpu_isa, set_cpu_isa

ORDER = ["scalar", "avx2", "avx512_vnni", "amx"]
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(ORDER.index(isa) > ORDER.index(best_cpu_isa()),
                                                     reason=f"this CPU has no {isa}")) for isa in ORDER]

rows = st.sampled_from([1, 2, 5, 6, 7, 13, 48, 49, 100])
cols = st.sampled_from([1, 15, 16, 63, 64, 65, 130])
depth = st.sampled_from([1, 3, 4, 31, 256, 257, 700])
seeds = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize("isa", ISAS)
@given(m=rows, n=cols, k=depth, dtype=st.sampled_from(FLOAT_DTYPES), static=st.booleans(),
       with_bias=st.booleans(), seed=seeds)
def test_w8a8_linear_bit_exact_on_every_path(isa, m, n, k, dtype, static, with_bias, seed):
    x = activation((m, k), dtype, seed=seed)
    w, sw = int8_weight(n, k, seed)
    bias = torch.randn(n).to(dtype) if with_bias else None
    xs = (x.float().abs().amax() / 100).reshape(1) if static else None
    expected = reference.w8a8_linear(x, w, sw, bias, xs)
    packed = ops.int8_prepack(w)
    with lowbit.use_cpu_isa(isa):
        assert torch.equal(ops.w8a8_linear(x, w, sw, bias, xs), expected)
        assert torch.equal(ops.w8a8_linear_prepacked(x, packed, sw, x.shape[-1], bias, xs), expected)


@pytest.mark.parametrize("isa", ISAS)
@given(m=rows, n=cols, k=depth, out_dtype=st.sampled_from(FLOAT_DTYPES), seed=seeds)
def test_int8_scaled_mm_bit_exact_on_every_path(isa, m, n, k, out_dtype, seed):
    a, b = int8_values((m, k), seed), int8_values((n, k), seed + 1)
    sa, sb = torch.rand(m) + 0.01, torch.rand(n) + 0.01
    with lowbit.use_cpu_isa(isa):
        out = ops.int8_scaled_mm(a, b, sa, sb, None, out_dtype)
    assert torch.equal(out, reference.int8_scaled_mm(a, b, sa, sb, None, out_dtype))


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_int8_operands_accumulate_exactly(isa):
    # -127 and 127 everywhere, K spanning many k blocks: the +128 weight shift, the row
    # compensation and the AVX2 sign trick must all stay exact.
    k = 4096
    a = torch.full((7, k), -127, dtype=torch.int8)
    a[::2] = 127
    b = torch.full((65, k), 127, dtype=torch.int8)
    b[1::3] = -127
    one_a, one_b = torch.ones(7), torch.ones(65)
    with lowbit.use_cpu_isa(isa):
        out = ops.int8_scaled_mm(a, b, one_a, one_b, None, torch.float32)
    assert torch.equal(out, reference.int8_scaled_mm(a, b, one_a, one_b, None, torch.float32))


@pytest.mark.parametrize("isa", ISAS)
@given(lead=st.sampled_from([(3,), (2, 7), (1, 1, 5)]), k=depth, dtype=st.sampled_from(FLOAT_DTYPES), seed=seeds)
def test_quantize_per_token_and_3d_noncontiguous_inputs(isa, lead, k, dtype, seed):
    x = activation((*lead, k), dtype, seed=seed, noncontiguous=True)
    w, sw = int8_weight(9, k, seed)
    with lowbit.use_cpu_isa(isa):
        q, s = ops.quantize_per_token(x)
        y = ops.w8a8_linear(x, w, sw, None)
    rq, rs = reference.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert torch.equal(y, reference.w8a8_linear(x, w, sw, None))


def test_nan_activation_row_gives_nan_outputs_only_in_that_row():
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    w, sw = int8_weight(8, 64)
    y = ops.w8a8_linear(x, w, sw, None)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_forcing_a_path_is_checked_and_restored():
    before = lowbit.cpu_isa()
    with pytest.raises(ValueError, match="unknown CPU path"):
        set_cpu_isa("neon")
    with lowbit.use_cpu_isa("scalar"):
        assert lowbit.cpu_isa() == "scalar"
    assert lowbit.cpu_isa() == before


def test_prepacked_weights_of_another_shape_are_refused():
    w, sw = int8_weight(70, 128)
    packed = ops.int8_prepack(w)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="int8_prepack"):
        ops.w8a8_linear_prepacked(x, packed, sw[:60], x.shape[-1], None)
    with pytest.raises(ValueError, match="int8_prepack"):
        ops.w8a8_linear_prepacked(torch.randn(2, 132), packed, sw, 132, None)
    with pytest.raises(TypeError, match="packed"):
        ops.w8a8_linear_prepacked(x, packed.view(torch.int8), sw, x.shape[-1], None)
    with pytest.raises(ValueError, match="K <= 65536"):
        ops.int8_prepack(torch.zeros(1, 65540, dtype=torch.int8))


@pytest.mark.parametrize("isa", ISAS)
@given(m=rows, n=cols, groups=st.sampled_from([1, 3, 5]), g=st.sampled_from([32, 64, 128, None]),
       sym=st.booleans(), dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(), seed=seeds)
def test_w4a16_on_every_path(isa, m, n, groups, g, sym, dtype, with_bias, seed):
    k = groups * (g or 2 * (seed % 150 + 1))
    gs = g or k
    x = activation((m, k), dtype, seed=seed)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    bias = torch.randn(n).to(dtype) if with_bias else None
    expected = reference.w4a16_linear(x, packed, scales, zeros, gs, bias)
    w_full = reference.dequantize_int4(packed, scales, zeros, gs, torch.float32)
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    with lowbit.use_cpu_isa(isa):
        assert_linear_close(ops.w4a16_linear(x, packed, scales, zeros, gs, bias), expected, x, w_full, bias)
        assert_linear_close(ops.w4a16_linear_prepacked(x, w, params, gs, n, bias), expected, x, w_full, bias)


# The kernels on weights decoded to bf16: AMX tiles and AVX512-BF16 (vdpbf16ps).
DECODED = [pytest.param(name, marks=pytest.mark.skipif(name not in plan.runnable_paths("weight_only"),
                                                       reason=f"this CPU cannot run path {name}"))
           for name in ("amx", "bf16")]


@pytest.mark.parametrize("path", DECODED)
@given(lead=st.sampled_from([(1,), (2,), (7,), (8,), (15,), (16,), (17,), (33,), (100,), (2, 19), (3, 1, 16), (4, 3)]),
       n=cols, groups=st.sampled_from([1, 2, 5]), g=st.sampled_from([32, 64, 128, None]), sym=st.booleans(),
       with_bias=st.booleans(), nc=st.booleans(), seed=seeds)
def test_w4a16_decoded_bf16_paths(path, lead, n, groups, g, sym, with_bias, nc, seed):
    # Forced at every M (the automatic choice takes them from wo::kAmxMinRowsInt4 /
    # kBf16MinRowsInt4 rows on); for AMX up to 16 rows the block-by-block kernel, beyond it
    # the decoded-panel one; AVX512-BF16 in tiles of 6 rows with every tail.
    k = groups * (g or 32 * (seed % 9 + 1))
    gs = g or k  # G = K only when K is a multiple of 32 (blocks of k end at multiples of 32)
    x = activation((*lead, k), torch.bfloat16, seed=seed, noncontiguous=nc)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    expected = reference.w4a16_linear(x, packed, scales, zeros, gs, bias)
    w_full = reference.dequantize_int4(packed, scales, zeros, gs, torch.float32)
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    out = ops.w4a16_linear_prepacked(x, w, params, gs, n, bias, plan.path_id("weight_only", path))
    assert_linear_close(out, expected, x, w_full, bias)


@pytest.mark.parametrize("path", DECODED)
@given(lead=st.sampled_from([(1,), (3,), (8,), (16,), (17,), (50,), (2, 19)]), n=cols, k=st.sampled_from([32, 64, 96, 256, 704]),
       with_bias=st.booleans(), nc=st.booleans(), seed=seeds)
def test_w8a16_decoded_bf16_paths(path, lead, n, k, with_bias, nc, seed):
    x = activation((*lead, k), torch.bfloat16, seed=seed, noncontiguous=nc)
    w, sw = int8_weight(n, k, seed)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    expected = reference.w8a16_linear(x, w, sw, bias)
    w_full = reference.dequantize_int8(w, sw, torch.float32)
    out = ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(w), sw, bias, plan.path_id("weight_only", path))
    assert_linear_close(out, expected, x, w_full, bias)


@pytest.mark.parametrize("path", DECODED)
@pytest.mark.parametrize("g", [128, None])
@pytest.mark.parametrize("m", [5, 40, 300])
def test_decoded_paths_with_k_past_one_chunk(path, m, g):
    # K beyond one chunk of k (wo::kAmxChunkK = 2048) and rows beyond one row chunk (256):
    # chunk boundaries inside and at the end of groups, partial last chunks of both.
    path_id = plan.path_id("weight_only", path)
    k, n = 4352, 72
    x = activation((m, k), torch.bfloat16, seed=m)
    packed, scales, zeros = int4_weight(n, k, g, False, m)
    gs = g or k
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    assert_linear_close(ops.w4a16_linear_prepacked(x, w, params, gs, n, None, path_id),
                        reference.w4a16_linear(x, packed, scales, zeros, gs, None), x,
                        reference.dequantize_int4(packed, scales, zeros, gs, torch.float32))
    q, sw = int8_weight(n, 4160, m)
    x8 = activation((m, 4160), torch.bfloat16, seed=m + 1)
    assert_linear_close(ops.w8a16_linear_prepacked(x8, ops.w8a16_prepack(q), sw, None, path_id),
                        reference.w8a16_linear(x8, q, sw, None), x8, reference.dequantize_int8(q, sw, torch.float32))


@pytest.mark.skipif("bf16" not in plan.runnable_paths("weight_only") or best_cpu_isa() == "amx",
                    reason="the automatic choice takes AVX512-BF16 on CPUs with it and without AMX")
def test_bf16_rows_take_the_avx512_bf16_kernel_by_default():
    # From wo::kBf16MinRowsInt4 / Int8 rows, bf16 activations are the vdpbf16ps kernel's, bit
    # for bit; fewer rows, fp32 activations, or another ISA in force stay off it.
    bf16 = plan.path_id("weight_only", "bf16")
    packed, scales, zeros = int4_weight(130, 512, 128, False, seed=1)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 128)
    q, sw = int8_weight(130, 512, seed=2)
    w8 = ops.w8a16_prepack(q)
    for m in (6, 8, 100):
        x = activation((m, 512), torch.bfloat16, seed=m)
        assert torch.equal(ops.w4a16_linear_prepacked(x, w, params, 128, 130, None),
                           ops.w4a16_linear_prepacked(x, w, params, 128, 130, None, bf16))
    for m in (9, 100):
        x = activation((m, 512), torch.bfloat16, seed=m)
        assert torch.equal(ops.w8a16_linear_prepacked(x, w8, sw, None), ops.w8a16_linear_prepacked(x, w8, sw, None, bf16))
    x = activation((8, 512), torch.bfloat16, seed=3)
    assert torch.equal(ops.w8a16_linear_prepacked(x, w8, sw, None), ops.w8a16_linear_prepacked(x, w8, sw, None, GEMV))
    x = activation((100, 512), torch.bfloat16, seed=4)
    assert torch.equal(ops.w4a16_linear_prepacked(x.float(), w, params, 128, 130, None),
                       ops.w4a16_linear_prepacked(x.float(), w, params, 128, 130, None, GEMM))
    with lowbit.use_cpu_isa("scalar"):
        assert torch.equal(ops.w4a16_linear_prepacked(x, w, params, 128, 130, None),
                           ops.w4a16_linear_prepacked(x, w, params, 128, 130, None, plan.path_id("weight_only", "scalar")))


GEMV_VNNI = plan.path_id("weight_only", "gemv_vnni")  # the integer GEMV
GEMV = plan.path_id("weight_only", "gemv")  # the FMA GEMV
GEMM = plan.path_id("weight_only", "gemm")  # the FMA GEMM on dequantized blocks
needs_avx512 = pytest.mark.skipif(best_cpu_isa() not in ("avx512_vnni", "amx"), reason="needs AVX-512 VNNI")


def block_fixed_error(x, w_full, chunk):
    """The integer GEMV's documented error beyond fp32 summation (csrc/cpu/wo_gemm.h): each
    chunk of k of a row (int4: the group, or 4096 k of a longer one; int8: 1024 k) is held
    as integers times 2^e, with e = max(top - 22, -149) for the chunk's largest magnitude
    below 2^top, so each x is off by at most 2^(e - 1); bound: sum over chunks of
    2^(e - 1) sum_k |w|."""
    k = x.shape[-1]
    xs = x.float().reshape(-1, k)
    extra = torch.zeros(xs.shape[0], w_full.shape[0])
    for k0 in range(0, k, chunk):
        amax = xs[:, k0:k0 + chunk].abs().amax(dim=1)
        top = torch.frexp(amax).exponent
        half_unit = torch.ldexp(torch.ones_like(amax), torch.clamp(top - 22, min=-149) - 1)
        extra += half_unit[:, None] * w_full[:, k0:k0 + chunk].abs().sum(dim=1)[None, :]
    return extra


def spread_bf16(shape, spread, seed, nc):
    """bf16 activations, each scaled by e^(spread N(0, 1)): spread 4 puts magnitudes over
    ~2^30 within a chunk, so that the small ones fall below the chunk's fixed-point step."""
    x = activation(shape, torch.float32, seed=seed)
    x = (x * torch.exp(spread * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))).bfloat16()
    return torch.stack((x, torch.zeros_like(x)), dim=-1)[..., 0] if nc else x


INTEGER_GEMVS = [pytest.param("gemv_vnni", marks=needs_avx512),
                 pytest.param("gemv_int_avx2", marks=pytest.mark.skipif(
                     "gemv_int_avx2" not in plan.runnable_paths("weight_only"), reason="needs AVX2"))]


@pytest.mark.parametrize("path", INTEGER_GEMVS)
@given(lead=st.sampled_from([(1,), (2,), (3,), (7,), (2, 3), (1, 1, 5)]), n=cols, groups=st.sampled_from([1, 2, 5]),
       g=st.sampled_from([32, 64, 128, None]), sym=st.booleans(), spread=st.sampled_from([0.0, 4.0]),
       with_bias=st.booleans(), nc=st.booleans(), seed=seeds)
def test_w4a16_integer_gemv_paths(path, lead, n, groups, g, sym, spread, with_bias, nc, seed):
    # The integer GEMVs (AVX-512 vpdpbusd, AVX2 vpmaddubsw) forced at every M: the same
    # digits and error bound. K = G x groups; G = K covers K = 2 mod 4 (a lone last k pair).
    k = groups * (g or 2 * (seed % 150 + 1))
    gs = g or k
    x = spread_bf16((*lead, k), spread, seed, nc)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    expected = reference.w4a16_linear(x, packed, scales, zeros, gs, bias)
    w_full = reference.dequantize_int4(packed, scales, zeros, gs, torch.float32)
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    out = ops.w4a16_linear_prepacked(x, w, params, gs, n, bias, plan.path_id("weight_only", path))
    assert_linear_close(out, expected, x, w_full, bias, extra=block_fixed_error(x, w_full, min(gs, 4096)))


@needs_avx512
@pytest.mark.parametrize("g", [128, None])
def test_gemv_vnni_with_k_past_one_chunk_and_special_rows(g):
    # K = 8194 > 2 x 4096: a group of K has three chunks of k (the last one a lone pair);
    # a zero row gives the bias; rows holding NaN or Inf take the FMA GEMV (path gemv) and
    # come out as it computes them, bit for bit, beside rows that take the integer one.
    k, n = 8194 if g is None else 8192, 72
    gs = g or k
    x = activation((5, k), torch.bfloat16, seed=k)
    x[1] = 0
    x[2, 7] = float("nan")
    x[3, 100] = float("inf")
    packed, scales, zeros = int4_weight(n, k, g, False, seed=3)
    bias = torch.randn(n).to(torch.bfloat16)
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    out = ops.w4a16_linear_prepacked(x, w, params, gs, n, bias, GEMV_VNNI)
    fma = ops.w4a16_linear_prepacked(x, w, params, gs, n, bias, GEMV)
    w_full = reference.dequantize_int4(packed, scales, zeros, gs, torch.float32)
    finite = [0, 1, 4]
    assert_linear_close(out[finite], reference.w4a16_linear(x[finite], packed, scales, zeros, gs, bias), x[finite],
                        w_full, bias, extra=block_fixed_error(x[finite], w_full, min(gs, 4096)))
    assert torch.equal(out[1], bias)
    torch.testing.assert_close(out[2:4], fma[2:4], rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[2]).all()


@needs_avx512
@given(lead=st.sampled_from([(1,), (2,), (5,), (2, 3)]), n=cols, k=st.sampled_from([1, 3, 4, 31, 700, 1024, 2051]),
       spread=st.sampled_from([0.0, 4.0]), with_bias=st.booleans(), nc=st.booleans(), seed=seeds)
def test_w8a16_gemv_vnni_path(lead, n, k, spread, with_bias, nc, seed):
    # K past one chunk of 1024 k, K not a multiple of 4 (a last step of 1-3 rows). A zero
    # row gives the bias; a NaN row goes to the FMA GEMV.
    x = spread_bf16((*lead, k), spread, seed, nc)
    w, sw = int8_weight(n, k, seed)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    out = ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(w), sw, bias, GEMV_VNNI)
    w_full = reference.dequantize_int8(w, sw, torch.float32)
    assert_linear_close(out, reference.w8a16_linear(x, w, sw, bias), x, w_full, bias,
                        extra=block_fixed_error(x, w_full, 1024))
    special = x.reshape(-1, k)[:1].repeat(3, 1)
    special[0] = 0
    special[1, k // 2] = float("nan")
    out = ops.w8a16_linear_prepacked(special, ops.w8a16_prepack(w), sw, bias, GEMV_VNNI)
    assert torch.equal(out[0], bias if with_bias else torch.zeros(n, dtype=torch.bfloat16))
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[2], ops.w8a16_linear_prepacked(special[2:], ops.w8a16_prepack(w), sw, bias, GEMV_VNNI)[0])


@needs_avx512
def test_few_bf16_rows_take_gemv_vnni_by_default():
    # The automatic choice (wo::kVnniMaxRows, kVnniMaxRowsInt8): bf16 activations at M <= 5
    # (int8 weights: M = 1; on AMX CPUs AMX takes over from 3 rows) are the integer GEMV's,
    # bit for bit; fp32 ones stay on the FMA GEMV.
    packed, scales, zeros = int4_weight(130, 512, 128, False, seed=1)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 128)
    for m in (1, 2) if best_cpu_isa() == "amx" else (1, 2, 3, 5):
        x = activation((m, 512), torch.bfloat16, seed=m)
        auto = ops.w4a16_linear_prepacked(x, w, params, 128, 130, None)
        assert torch.equal(auto, ops.w4a16_linear_prepacked(x, w, params, 128, 130, None, GEMV_VNNI))
    xf = activation((1, 512), torch.float32, seed=5)
    assert torch.equal(ops.w4a16_linear_prepacked(xf, w, params, 128, 130, None),
                       ops.w4a16_linear_prepacked(xf, w, params, 128, 130, None, GEMV))
    q, sw = int8_weight(130, 512, seed=2)
    w8 = ops.w8a16_prepack(q)
    x = activation((1, 512), torch.bfloat16, seed=3)
    assert torch.equal(ops.w8a16_linear_prepacked(x, w8, sw, None), ops.w8a16_linear_prepacked(x, w8, sw, None, GEMV_VNNI))


@needs_avx512
def test_gemv_vnni_refuses_other_activation_dtypes():
    packed, scales, zeros = int4_weight(64, 128, 64, False)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 64)
    q, sw = int8_weight(64, 128)
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(TypeError, match="bf16 activations"):
            ops.w4a16_linear_prepacked(torch.randn(2, 128).to(dtype), w, params, 64, 64, None, GEMV_VNNI)
        with pytest.raises(TypeError, match="bf16 activations"):
            ops.w8a16_linear_prepacked(torch.randn(2, 128).to(dtype), ops.w8a16_prepack(q), sw, None, GEMV_VNNI)


WEIGHT_ONLY_PATHS = plan.paths_for("weight_only")


@pytest.mark.parametrize("path", WEIGHT_ONLY_PATHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [3, 20])
def test_weight_only_outputs_round_as_torch_does(path, dtype, m):
    # One-hot activation rows make every output a single product (q - z) s (+ bias) that each
    # kernel computes exactly as the reference does, so the output must equal the fp32 value
    # converted by torch bit for bit: this checks each path's rounding to the output dtype
    # (nearest even), the bias and the partial last panel (N = 70); a NaN row stays NaN.
    # Scales 1 + 2^-8, 1 + 3 * 2^-8 (and 2^-11 for fp16) put (q - z) s exactly halfway
    # between two bf16 (fp16) values whenever |q - z| is a power of two: ties to even.
    if path in ("amx", "bf16") and (dtype != torch.bfloat16 or path not in plan.runnable_paths("weight_only")):
        pytest.skip(f"path {path} takes bf16 activations on a CPU that has it")
    if path in ("gemv_vnni", "gemv_int_avx2") and dtype != torch.bfloat16:
        pytest.skip("the integer GEMVs take bf16 activations")
    if path != "auto" and path not in plan.runnable_paths("weight_only"):
        pytest.skip(f"this CPU cannot run path {path}")
    n, k, g = 70, 256, 64
    packed, scales, zeros = int4_weight(n, k, g, False, seed=m)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11])
    scales = ties[torch.randint(0, 4, scales.shape)]
    w, params = ops.w4a16_prepack(packed, scales, zeros, g)
    cols = torch.randperm(k)[:m]
    x = torch.zeros(m, k, dtype=dtype)
    x[torch.arange(m), cols] = 1
    x[m - 1, cols[m - 1]] = float("nan")
    bias = torch.randn(n).to(dtype)
    w_full = reference.dequantize_int4(packed, scales, zeros, g, torch.float32)
    expected = (w_full[:, cols].T + bias.float()).to(dtype)
    out = ops.w4a16_linear_prepacked(x, w, params, g, n, bias, WEIGHT_ONLY_PATHS[path])
    assert torch.equal(out[: m - 1], expected[: m - 1])
    assert torch.isnan(out[m - 1]).all()


@pytest.mark.parametrize("path", DECODED)
def test_decoded_paths_refuse_other_activation_dtypes_and_group_sizes(path):
    path_id = plan.path_id("weight_only", path)
    packed, scales, zeros = int4_weight(64, 48, None, False)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=f"path {path} needs a group size .* multiple of 32"):
        ops.w4a16_linear_prepacked(torch.randn(4, 48).bfloat16(), w, params, 48, 64, None, path_id)
    packed, scales, zeros = int4_weight(64, 128, 64, False)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 64)
    with pytest.raises(TypeError, match=f"path {path} multiplies bf16 activations"):
        ops.w4a16_linear_prepacked(torch.randn(4, 128), w, params, 64, 64, None, path_id)
    q = torch.zeros(64, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.w8a16_linear_prepacked(torch.randn(4, 40).bfloat16(), ops.w8a16_prepack(q), torch.ones(64), None,
                                   path_id)


@pytest.mark.parametrize("isa", ISAS)
@given(m=rows, n=cols, k=depth, dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(), seed=seeds)
def test_w8a16_on_every_path(isa, m, n, k, dtype, with_bias, seed):
    x = activation((m, k), dtype, seed=seed, noncontiguous=True)
    w, sw = int8_weight(n, k, seed)
    bias = torch.randn(n).to(dtype) if with_bias else None
    expected = reference.w8a16_linear(x, w, sw, bias)
    w_full = reference.dequantize_int8(w, sw, torch.float32)
    with lowbit.use_cpu_isa(isa):
        assert_linear_close(ops.w8a16_linear(x, w, sw, bias), expected, x, w_full, bias)
        assert_linear_close(ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(w), sw, bias), expected, x, w_full, bias)


def test_weight_only_prepacked_weights_of_another_shape_are_refused():
    packed, scales, zeros = int4_weight(70, 128, 64, False)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 64)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="prepacked weight"):
        ops.w4a16_linear_prepacked(x, w, params, 64, 200, None)
    with pytest.raises(ValueError, match="params"):
        ops.w4a16_linear_prepacked(x, w, params, 32, 70, None)
    w8, s8 = int8_weight(70, 128)
    with pytest.raises(ValueError, match="x has K = 64 features but the weight has K = 128"):
        ops.w8a16_linear_prepacked(torch.randn(2, 64), ops.w8a16_prepack(w8), s8, None)


AVX2_WEIGHT_ONLY = [pytest.param(name, marks=pytest.mark.skipif(name not in plan.runnable_paths("weight_only"),
                                                                 reason=f"this CPU cannot run path {name}"))
                    for name in ("gemv_avx2", "gemm_avx2")]


@pytest.mark.parametrize("path", AVX2_WEIGHT_ONLY)
@given(m=rows, n=cols, groups=st.sampled_from([1, 3]), g=st.sampled_from([32, 128, None]), sym=st.booleans(),
       dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(), seed=seeds)
def test_avx2_weight_only_paths_at_any_rows(path, m, n, groups, g, sym, dtype, with_bias, seed):
    # Either AVX2 kernel forced at every row count (the automatic choice takes the GEMV up to
    # 8 rows only): int4 and int8 panels, tails of the 64-column panel and of the 2-row tiles.
    k = groups * (g or 2 * (seed % 150 + 1))
    gs = g or k
    x = activation((m, k), dtype, seed=seed, noncontiguous=True)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed)
    bias = torch.randn(n).to(dtype) if with_bias else None
    path_id = plan.path_id("weight_only", path)
    w, params = ops.w4a16_prepack(packed, scales, zeros, gs)
    assert_linear_close(ops.w4a16_linear_prepacked(x, w, params, gs, n, bias, path_id),
                        reference.w4a16_linear(x, packed, scales, zeros, gs, bias), x,
                        reference.dequantize_int4(packed, scales, zeros, gs, torch.float32), bias)
    w8, s8 = int8_weight(n, k, seed)
    assert_linear_close(ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(w8), s8, bias, path_id),
                        reference.w8a16_linear(x, w8, s8, bias), x, reference.dequantize_int8(w8, s8, torch.float32),
                        bias)


@pytest.mark.skipif("gemv_int_avx2" not in plan.runnable_paths("weight_only"), reason="needs AVX2")
def test_gemv_int_avx2_special_rows_and_refusals():
    packed, scales, zeros = int4_weight(70, 256, 128, False, 5)
    w, params = ops.w4a16_prepack(packed, scales, zeros, 128)
    path = plan.path_id("weight_only", "gemv_int_avx2")
    x = activation((3, 256), torch.float32, seed=5).bfloat16()
    x[1, 7] = float("nan")  # this row has no block floating-point form: the FMA GEMV takes it
    x[2] = 0  # an all-zero row: exponent at its floor, zero output
    out = ops.w4a16_linear_prepacked(x, w, params, 128, 70, None, path)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any() and (out[2] == 0).all()
    assert torch.equal(out[0], ops.w4a16_linear_prepacked(x[:1], w, params, 128, 70, None, path)[0])
    with pytest.raises(TypeError, match="bf16 activations"):
        ops.w4a16_linear_prepacked(x.float(), w, params, 128, 70, None, path)
    q8, s8 = int8_weight(70, 256, 5)
    with pytest.raises(ValueError, match="int4 weights in groups"):
        ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(q8), s8, None, path)
    with lowbit.use_cpu_isa("avx2"):  # the automatic choice takes it for one bf16 row
        auto = ops.w4a16_linear_prepacked(x[:1], w, params, 128, 70, None)
    assert torch.equal(auto, out[:1])
