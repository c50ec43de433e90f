"""The native ops (torch.ops.lowbit, CPU and CUDA kernels) against the reference.

Integer results (quantized activations, int4 packing) and the int8 GEMM with its fp32
epilogue match the reference bit for bit; float-accumulated ops match within the fp32
summation-order bound. Every op passes torch.library.opcheck, compiles with
fullgraph=True, and rejects bad arguments with a clear error from the kernel, the
reference and the fake implementation alike.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FLOAT_DTYPES,
    activation,
    assert_linear_close,
    int4_weight,
    int8_values,
    int8_weight,
    require_kernel,
)
from hypothesis import given
from hypothesis import strategies as st
from lowbit import ops, reference
from torch._subclasses.fake_tensor import FakeTensorMode

dtypes = st.sampled_from(FLOAT_DTYPES)
seeds = st.integers(0, 2**31 - 1)
group_sizes = st.sampled_from([32, 64, 128, None])


def leading_shapes():
    return st.sampled_from([(1,), (7,), (33,), (2, 5), (1, 1, 3)])


# --- parity with the reference -------------------------------------------------------------


@given(lead=leading_shapes(), k=st.integers(1, 300), dtype=dtypes, nc=st.booleans(), seed=seeds)
def test_quantize_per_token_matches_reference_bitwise(device, lead, k, dtype, nc, seed):
    x = activation((*lead, k), dtype, device, seed, noncontiguous=nc)
    q, s = ops.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x)
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_quantize_per_token_zero_row_gets_scale_one(device):
    x = torch.zeros(2, 16, device=device)
    x[1] = torch.linspace(-3, 3, 16)
    q, s = ops.quantize_per_token(x)
    assert s[0].item() == 1.0 and torch.all(q[0] == 0)
    assert s[1].item() == pytest.approx(3 / 127) and q[1].abs().max().item() == 127


@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 300), out_dtype=dtypes,
       with_bias=st.booleans(), seed=seeds)
def test_int8_scaled_mm_matches_reference_bitwise(device, m, n, k, out_dtype, with_bias, seed):
    a, b = int8_values((m, k), seed, device), int8_values((n, k), seed + 1, device)
    sa = torch.rand(m, device=device) + 0.01
    sb = torch.rand(n, device=device) + 0.01
    bias = torch.randn(n, device=device).to(out_dtype) if with_bias else None
    out = ops.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    assert torch.equal(out, reference.int8_scaled_mm(a, b, sa, sb, bias, out_dtype))


def test_int8_scaled_mm_accumulates_exactly_at_full_range(device):
    # Every product is 127 * 127 (or -127 * 127): the int32 sum must not lose a unit.
    k = 1000
    a = torch.full((3, k), 127, dtype=torch.int8, device=device)
    a[1] = -127
    b = torch.full((2, k), 127, dtype=torch.int8, device=device)
    b[1, ::2] = -127
    one = torch.ones(3, device=device), torch.ones(2, device=device)
    out = ops.int8_scaled_mm(a, b, *one, None, torch.float32)
    expected = torch.tensor([[k * 16129, 0], [-k * 16129, 0], [k * 16129, 0]], dtype=torch.float32)
    assert torch.equal(out.cpu(), expected)


@given(lead=leading_shapes(), n=st.integers(1, 48), k=st.integers(1, 260), dtype=dtypes,
       nc=st.booleans(), with_bias=st.booleans(), static=st.booleans(), seed=seeds)
def test_w8a8_linear_matches_reference_bitwise(device, lead, n, k, dtype, nc, with_bias, static, seed):
    x = activation((*lead, k), dtype, device, seed, noncontiguous=nc)
    w, sw = int8_weight(n, k, seed, device)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    xs = torch.tensor([0.05], device=device) if static else None
    out = ops.w8a8_linear(x, w, sw, bias, xs)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, reference.w8a8_linear(x, w, sw, bias, xs))


@given(lead=leading_shapes(), n=st.integers(1, 48), k=st.integers(1, 260), dtype=dtypes,
       nc=st.booleans(), with_bias=st.booleans(), seed=seeds)
def test_w8a16_linear_matches_reference(device, lead, n, k, dtype, nc, with_bias, seed):
    require_kernel("lowbit::w8a16_linear", device)
    x = activation((*lead, k), dtype, device, seed, noncontiguous=nc)
    w, sw = int8_weight(n, k, seed, device)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    out = ops.w8a16_linear(x, w, sw, bias)
    ref = reference.w8a16_linear(x, w, sw, bias)
    assert_linear_close(out, ref, x, reference.dequantize_int8(w, sw, torch.float32), bias)


@given(lead=leading_shapes(), n=st.integers(1, 40), groups=st.integers(1, 3), g=group_sizes,
       sym=st.booleans(), dtype=dtypes, nc=st.booleans(), with_bias=st.booleans(), seed=seeds)
def test_w4a16_linear_matches_reference(device, lead, n, groups, g, sym, dtype, nc, with_bias, seed):
    require_kernel("lowbit::w4a16_linear", device)
    k = groups * (g or 2 * (seed % 97 + 1))
    x = activation((*lead, k), dtype, device, seed, noncontiguous=nc)
    packed, scales, zeros = int4_weight(n, k, g, sym, seed, device)
    gs = g or k
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    out = ops.w4a16_linear(x, packed, scales, zeros, gs, bias)
    ref = reference.w4a16_linear(x, packed, scales, zeros, gs, bias)
    assert_linear_close(out, ref, x, reference.dequantize_int4(packed, scales, zeros, gs, torch.float32), bias)


@given(n=st.integers(1, 30), k=st.integers(1, 200), dtype=dtypes, seed=seeds)
def test_dequantize_int8_matches_reference_bitwise(device, n, k, dtype, seed):
    w, s = int8_weight(n, k, seed, device)
    assert torch.equal(ops.dequantize_int8(w, s, dtype), reference.dequantize_int8(w, s, dtype))


@given(n=st.integers(1, 30), groups=st.integers(1, 3), g=group_sizes, sym=st.booleans(), dtype=dtypes,
       seed=seeds)
def test_dequantize_int4_matches_reference_bitwise(device, n, groups, g, sym, dtype, seed):
    k = groups * (g or 2 * (seed % 97 + 1))
    packed, scales, zeros = int4_weight(n, k, g, sym, seed, device)
    out = ops.dequantize_int4(packed, scales, zeros, g or k, dtype)
    assert torch.equal(out, reference.dequantize_int4(packed, scales, zeros, g or k, dtype))


@given(n=st.integers(1, 20), half_k=st.integers(1, 100), seed=seeds)
def test_pack_unpack_int4_match_reference_and_round_trip(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = ops.pack_int4(q)
    assert torch.equal(packed, reference.pack_int4(q))
    assert torch.equal(ops.unpack_int4(packed), q)


# --- opcheck and torch.compile --------------------------------------------------------------


def sample_calls(device="cpu"):
    """(op, args) pairs covering every op, each dtype and both int4 variants."""
    calls = []
    w, sw = int8_weight(12, 64, 1, device)
    for dtype in FLOAT_DTYPES:
        x = activation((5, 64), dtype, device, 2)
        bias = torch.randn(12, device=device).to(dtype)
        calls += [
            (torch.ops.lowbit.quantize_per_token.default, (x,)),
            (torch.ops.lowbit.w8a8_linear.default, (x, w, sw, bias, None)),
            (torch.ops.lowbit.w8a8_linear.default, (x, w, sw, None, torch.tensor([0.03], device=device))),
            (torch.ops.lowbit.w8a16_linear.default, (x, w, sw, bias)),
            (torch.ops.lowbit.dequantize_int8.default, (w, sw, dtype)),
        ]
        for sym in (False, True):
            packed, scales, zeros = int4_weight(12, 64, 32, sym, 3, device)
            calls += [
                (torch.ops.lowbit.w4a16_linear.default, (x, packed, scales, zeros, 32, bias)),
                (torch.ops.lowbit.dequantize_int4.default, (packed, scales, zeros, 32, dtype)),
            ]
            if device == "cpu":
                w4, params = ops.w4a16_prepack(packed, scales, zeros, 32)
                calls.append((torch.ops.lowbit.w4a16_linear_prepacked.default, (x, w4, params, 32, 12, bias)))
        if device == "cpu":
            calls += [
                (torch.ops.lowbit.w8a8_linear_prepacked.default, (x, ops.int8_prepack(w), sw, x.shape[-1], bias, None)),
                (torch.ops.lowbit.w8a16_linear_prepacked.default, (x, ops.w8a16_prepack(w), sw, bias)),
            ]
        a = int8_values((5, 64), 4, device)
        calls.append((torch.ops.lowbit.int8_scaled_mm.default,
                      (a, w, torch.rand(5, device=device), sw, bias, dtype)))
    q = torch.randint(0, 16, (6, 10), dtype=torch.uint8).to(device)
    if device == "cpu":
        packed, scales, zeros = int4_weight(12, 64, 32, False, 3, device)
        w4, params = ops.w4a16_prepack(packed, scales, zeros, 32)
        codes, s_t, z_t = ops.w4a16_cuda_prepack(packed, scales, zeros, 32)
        calls += [(torch.ops.lowbit.int8_prepack.default, (w,)), (torch.ops.lowbit.w8a16_prepack.default, (w,)),
                  (torch.ops.lowbit.w4a16_prepack.default, (packed, scales, zeros, 32)),
                  (torch.ops.lowbit.int8_unpack.default, (ops.int8_prepack(w), 12, 64)),
                  (torch.ops.lowbit.w8a16_unpack.default, (ops.w8a16_prepack(w), 12)),
                  (torch.ops.lowbit.w4a16_unpack.default, (w4, params, 32, 12)),
                  (torch.ops.lowbit.w4a16_cuda_prepack.default, (packed, scales, zeros, 32)),
                  (torch.ops.lowbit.w4a16_cuda_unpack.default, (codes, s_t, z_t, 32, 12, 64))]
    calls += [(torch.ops.lowbit.pack_int4.default, (q,)),
              (torch.ops.lowbit.unpack_int4.default, (reference.pack_int4(q),))]
    return calls


def test_every_op_passes_opcheck(device):
    for op, args in sample_calls(device):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), device.upper()):
            continue  # this op has no kernel for the device in this build
        torch.library.opcheck(op, args)


def test_every_op_compiles_fullgraph_and_matches_eager():
    calls = sample_calls("cpu")

    def run_all(*flat):
        outs, i = [], 0
        for op, args in calls:
            outs.append(op(*flat[i : i + len(args)]))
            i += len(args)
        return outs

    flat = [a for _, args in calls for a in args]
    torch._dynamo.reset()
    compiled = torch.compile(run_all, fullgraph=True, backend="inductor")
    for eager, traced in zip(run_all(*flat), compiled(*flat)):
        for e, t in zip(*(v if isinstance(v, tuple) else (v,) for v in (eager, traced))):
            assert torch.equal(e, t)


# --- bad input -------------------------------------------------------------------------------

IMPLS = {"native": ops, "reference": reference}


def bad_calls():
    """(description, expected exception, callable(impl)) for every op's argument checks."""
    x = torch.randn(4, 64)
    w, sw = int8_weight(8, 64)
    packed, scales, zeros = int4_weight(8, 64, 32, False)
    a = int8_values((4, 64))
    return [
        ("x int8", TypeError, lambda f: f.quantize_per_token(a)),
        ("x without features", ValueError, lambda f: f.quantize_per_token(torch.randn(3, 0))),
        ("a float", TypeError, lambda f: f.int8_scaled_mm(x, w, torch.ones(4), sw, None, torch.float32)),
        ("K mismatch", ValueError, lambda f: f.int8_scaled_mm(a[:, :32], w, torch.ones(4), sw, None, torch.float32)),
        ("a_scale shape", ValueError, lambda f: f.int8_scaled_mm(a, w, torch.ones(5), sw, None, torch.float32)),
        ("out_dtype int", TypeError, lambda f: f.int8_scaled_mm(a, w, torch.ones(4), sw, None, torch.int32)),
        ("bias shape", ValueError, lambda f: f.w8a8_linear(x, w, sw, torch.ones(9))),
        ("w float", TypeError, lambda f: f.w8a16_linear(x, w.float(), sw, None)),
        ("w_scale fp16", TypeError, lambda f: f.w8a16_linear(x, w, sw.half(), None)),
        ("w non-contiguous", ValueError, lambda f: f.w8a16_linear(x[:, :8], w.t(), torch.ones(64), None)),
        ("x K mismatch", ValueError, lambda f: f.w8a8_linear(x[:, :32], w, sw, None)),
        ("x_scale per channel", ValueError, lambda f: f.w8a8_linear(x, w, sw, None, torch.ones(64))),
        ("x int", TypeError, lambda f: f.w4a16_linear(a, packed, scales, zeros, 32, None)),
        ("group size 48", ValueError, lambda f: f.w4a16_linear(x, packed, scales, zeros, 48, None)),
        ("group size 16", ValueError, lambda f: f.dequantize_int4(packed, scales, zeros, 16, torch.float32)),
        ("scales shape", ValueError, lambda f: f.w4a16_linear(x, packed, scales[:, :1], zeros, 32, None)),
        ("zeros dtype", TypeError, lambda f: f.w4a16_linear(x, packed, scales, zeros.int(), 32, None)),
        ("packed int8", TypeError, lambda f: f.dequantize_int4(packed.view(torch.int8), scales, zeros, 32, torch.float32)),
        ("dequant dtype int", TypeError, lambda f: f.dequantize_int8(w, sw, torch.int8)),
        ("pack odd K", ValueError, lambda f: f.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))),
        ("unpack 1-D", ValueError, lambda f: f.unpack_int4(torch.zeros(4, dtype=torch.uint8))),
        ("device mismatch", ValueError, lambda f: f.w8a16_linear(x.to("meta"), w, sw, None)),
    ]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", bad_calls(), ids=lambda c: c[0])
def test_bad_arguments_raise_clear_errors(impl, case):
    _, exc, call = case
    with pytest.raises(exc):
        call(IMPLS[impl])


@pytest.mark.parametrize("case", [c for c in bad_calls() if c[0] != "device mismatch"], ids=lambda c: c[0])
def test_fake_implementations_raise_the_same_errors(case):
    _, exc, call = case
    with pytest.raises(exc), FakeTensorMode(allow_non_fake_inputs=True):
        call(ops)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_pack_int4_rejects_values_above_15(impl):
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        IMPLS[impl].pack_int4(torch.tensor([[3, 16]], dtype=torch.uint8))


# --- gradients ---------------------------------------------------------------------------------


def linear_calls():
    """Every linear op, as (op, args, the bias's index, the dequantized weight), with an input
    and a bias that require grad."""
    x = activation((2, 3, 64), seed=8).requires_grad_(True)
    bias = torch.randn(12).requires_grad_(True)
    w, sw = int8_weight(12, 64, 1)
    packed, scales, zeros = int4_weight(12, 64, 32, False, 3)
    w4, params = ops.w4a16_prepack(packed, scales, zeros, 32)
    w8_float = reference.dequantize_int8(w, sw, torch.float32)
    w4_float = reference.dequantize_int4(packed, scales, zeros, 32, torch.float32)
    return [
        (torch.ops.lowbit.w8a8_linear.default, (x, w, sw, bias, None), 3, w8_float),
        (torch.ops.lowbit.w8a16_linear.default, (x, w, sw, bias), 3, w8_float),
        (torch.ops.lowbit.w4a16_linear.default, (x, packed, scales, zeros, 32, bias), 5, w4_float),
        (torch.ops.lowbit.w8a8_linear_prepacked.default, (x, ops.int8_prepack(w), sw, 64, bias, None), 4, w8_float),
        (torch.ops.lowbit.w8a16_linear_prepacked.default, (x, ops.w8a16_prepack(w), sw, bias), 3, w8_float),
        (torch.ops.lowbit.w4a16_linear_prepacked.default, (x, w4, params, 32, 12, bias), 5, w4_float),
    ]


def test_linear_ops_pass_opcheck_with_gradients():
    for op, args, _, _ in linear_calls():  # opcheck's autograd test needs inputs that require grad
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(6))
def test_linear_ops_give_the_gradient_of_the_dequantized_product(index):
    op, args, bias_index, w = linear_calls()[index]
    x, bias = args[0], args[bias_index]
    y = op(*args)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected = grad.double().reshape(-1, 12) @ w.double()  # straight through W8A8's activation rounding
    torch.testing.assert_close(x.grad.double().reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), grad.double().reshape(-1, 12).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [1, 2, 4, 5])  # the weight-only ops: linear in x, so finite differences hold
def test_weight_only_ops_pass_gradcheck(index):
    op, args, _, _ = linear_calls()[index]
    x64 = args[0].detach().double().requires_grad_(True)

    def fn(x):  # the op computes in fp32: steps of 1e-2 keep the difference quotients far above its rounding
        return op(x.float(), *args[1:]).double()

    assert torch.autograd.gradcheck(fn, (x64,), eps=1e-2, atol=2e-3, rtol=2e-3)
