"""Memory-bound Triton kernels: int8 activation quantization and int4/int8 dequantization.

quantize: one program per row of x[M, K]. When the row fits one block (K <= 16384) it is
read once, reduced to max|x|, scaled, rounded and stored from registers; longer rows take
two passes over K (the second mostly from L2). ``s = max|x| / 127`` and ``x / s`` use
correctly rounded division (``div_rn``) and round-half-to-even (the 1.5 * 2^23 trick:
adding and subtracting it rounds an fp32 of magnitude < 2^22 to an integer in the
current, nearest-even, mode), so the codes equal ``lowbit.reference`` exactly. A static
(per-tensor) scale is read from memory instead of computed.

dequantize: 2-D tiles of [BLOCK_R rows, BLOCK_C columns], contiguous along K so loads and
stores are 16-byte vectors. int4 tiles read packed bytes, split the two nibbles, apply the
group's zero point and scale in fp32, and interleave (``tl.join``) back into k order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from lowbit import checks
from lowbit.kernels import as_rows

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23
ONE_PASS_MAX_K = 16384


@triton.jit
def _round_half_even(v):
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_xm,
                          STATIC: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    cols = tl.arange(0, BLOCK_K)
    if STATIC:
        s = tl.load(static_scale_ptr)
    elif ONE_PASS:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        s = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
    else:
        amax = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    s = tl.where(s == 0.0, 1.0, s)
    if not STATIC:
        tl.store(scale_ptr + row, s)
    if ONE_PASS:
        if STATIC:
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.clamp(_round_half_even(tl.math.div_rn(x, s)), -127.0, 127.0)
        tl.store(q_row + cols, q.to(tl.int8), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(_round_half_even(tl.math.div_rn(x, s)), -127.0, 127.0)
            tl.store(q_row + k0 + cols, q.to(tl.int8), mask=k0 + cols < K)


def _launch_quantize(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None,
                     static_scale: torch.Tensor | None) -> None:
    rows, k = x2.shape
    if rows == 0:
        return
    one_pass = k <= ONE_PASS_MAX_K
    block_k = triton.next_power_of_2(k) if one_pass else 4096
    warps = max(1, min(16, block_k // 1024))
    wrap_triton(_quantize_rows_kernel)[(rows,)](
        x2, q, scale if scale is not None else q, static_scale if static_scale is not None else q, k,
        x2.stride(0), STATIC=static_scale is not None, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=warps)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per-token quantization (``lowbit.reference.quantize_per_token``)."""
    checks.activation(x, "x")
    x2 = as_rows(x)
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _launch_quantize(x2, q, scale, None)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 quantization with one given scale (``lowbit.reference.quantize_per_tensor``)."""
    checks.activation(x, "x")
    checks.per_tensor_scale(scale, "x_scale")
    checks.same_device({"x": x, "x_scale": scale})
    x2 = as_rows(x)
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    _launch_quantize(x2, q, None, scale.reshape(1))
    return q.reshape(x.shape)


@triton.jit
def _dequantize_int8_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    tl.store(out_ptr + offs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_int4_kernel(packed_ptr, s_ptr, z_ptr, out_ptr, N, K, G,
                            HAS_ZEROS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # BLOCK_C packed bytes per row of the tile = 2 * BLOCK_C output columns.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    half_k = K // 2
    mask = (rows[:, None] < N) & (cols[None, :] < half_k)
    b = tl.load(packed_ptr + rows[:, None].to(tl.int64) * half_k + cols[None, :], mask=mask, other=0).to(tl.int32)
    # Both nibbles of a byte (k = 2c, 2c + 1) lie in one group: G is even.
    gidx = rows[:, None].to(tl.int64) * (K // G) + (2 * cols[None, :]) // G
    s = tl.load(s_ptr + gidx, mask=mask, other=0.0)
    if HAS_ZEROS:
        z = tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.int32)
    else:
        z = 8
    lo = ((b & 0xF) - z).to(tl.float32) * s
    hi = ((b >> 4) - z).to(tl.float32) * s
    w = tl.reshape(tl.join(lo, hi), (BLOCK_R, 2 * BLOCK_C))
    out_cols = 2 * tl.program_id(1) * BLOCK_C + tl.arange(0, 2 * BLOCK_C)
    out_mask = (rows[:, None] < N) & (out_cols[None, :] < K)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + out_cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=out_mask)


DEQUANT_BLOCK_R, DEQUANT_BLOCK_C = 8, 256


def dequantize_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * s[n]`` as ``dtype`` (``lowbit.reference.dequantize_int8``)."""
    checks.int8_weight(w, scale)
    checks.float_dtype(dtype, "dtype")
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    if out.numel():
        grid = (triton.cdiv(n, DEQUANT_BLOCK_R), triton.cdiv(k, DEQUANT_BLOCK_C))
        wrap_triton(_dequantize_int8_kernel)[grid](w, scale, out, n, k, BLOCK_R=DEQUANT_BLOCK_R, BLOCK_C=DEQUANT_BLOCK_C)
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``(q - z) * s`` per group as ``dtype`` (``lowbit.reference.dequantize_int4``)."""
    checks.int4_weight(packed, scales, zeros, group_size)
    checks.float_dtype(dtype, "dtype")
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if out.numel():
        grid = (triton.cdiv(n, DEQUANT_BLOCK_R), triton.cdiv(k // 2, DEQUANT_BLOCK_C // 2))
        wrap_triton(_dequantize_int4_kernel)[grid](packed, scales, zeros if zeros is not None else packed, out, n, k, group_size,
                                      HAS_ZEROS=zeros is not None, BLOCK_R=DEQUANT_BLOCK_R,
                                      BLOCK_C=DEQUANT_BLOCK_C // 2)
    return out
