"""Triton weight-only linear layers: W4A16 (group-wise int4) and W8A16 (per-channel int8).

Prepacked layout (``prepack_int4`` / ``prepack_int8``, once per layer):
  - int4 codes as int32[K/8, N]: word (k/8, n) holds the eight codes k..k+7 of column n,
    code k + j in bits 4j..4j+3. This is the canonical uint8[N, K/2] buffer read as
    int32[N, K/8] and transposed, so consecutive n are consecutive words: a program's
    loads along N are coalesced 16-byte vectors (4 words per thread).
  - int8 codes as int8[K, N] (transposed for the same reason).
  - scales float32[K/G, N] and integer zero points uint8[K/G, N] (absent: symmetric, z = 8);
    W8A16 is the case G = K, z = 0.

Algorithm: each K block of BLOCK_K lies inside one group (BLOCK_K divides G), so the
block's codes minus the zero point are small integers, exact in fp16/bf16; the kernel
multiplies x by them on the tensor cores with fp32 accumulation and scales the block's
partial sum by the group's scale in fp32: acc += (x @ (q - z)) * s. This is more accurate
than dequantizing w' = (q - z) * s to 16 bits (w' is never rounded), and the per-block scale
costs one FMA per output per BLOCK_K products — but it holds two fp32 tiles (the block's
product and the sum), which bounds the tile size (kernels/aot.py checks for spills). With
one group per row (G = K, so every W8A16 layer) the products accumulate in place and the
scale is applied once at the end.
  - ``wo_gemm_kernel``: tiles of [BLOCK_M, BLOCK_N] on ``tl.dot``; for small M the launcher
    splits K (``SPLIT_K`` programs per tile, chosen by shape in ``configs.split_k``): each
    split stores its fp32 partial tile in a slice of its own of a [SPLIT_K, M, N] buffer,
    and ``_split_k_epilogue_kernel`` sums the slices in split order, adds the bias and
    casts — the same bits on every run (no atomics, whose order varies).
  - ``wo_gemv_kernel`` (M <= 4): no tensor cores (an MMA would be at least 3/4 padding);
    each program unpacks a [BLOCK_K, BLOCK_N] weight tile once and reuses it for every row
    of x with fp32 multiply-adds and a reduction over K.
fp32 activations use IEEE fp32 dots (never TF32). Under TRITON_INTERPRET=1 bf16 dots are
wrong in the interpreter, so there the launcher upcasts bf16 to fp32 before the dot.
Limits: none on the shape. M and N tails are masked; K is padded at prepack with zero codes
to a multiple of 32 (the smallest BLOCK_K) when it is not one — possible only for G = K, as
every other G is a multiple of 32 — and x is read masked past K, so padding adds 0.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from lowbit import checks
from lowbit.kernels import as_rows, configs
from lowbit.kernels.int8_mm import _tile_ids

GEMV_MAX_M = 4
K_MULTIPLE = 32  # the smallest BLOCK_K of the config lists


@dataclasses.dataclass
class Packed:
    """A weight in the Triton layout (module docstring)."""

    codes: torch.Tensor  # int32[KP/8, N] (bits = 4) or int8[KP, N] (bits = 8); KP = K rounded up to 32
    scales: torch.Tensor  # float32[K/G, N]
    zeros: torch.Tensor | None  # uint8[K/G, N]; None: symmetric
    group_size: int
    bits: int
    out_features: int
    in_features: int


def _pad_k(w: torch.Tensor) -> torch.Tensor:
    """w[N, C] with zero columns appended so that C covers K rounded up to K_MULTIPLE
    (C counts bytes: K/2 for packed int4, K for int8)."""
    per_k = 2 if w.dtype == torch.uint8 else 1
    k = w.shape[1] * per_k
    pad = (-k) % K_MULTIPLE
    return torch.nn.functional.pad(w, (0, pad // per_k)) if pad else w


def prepack_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> Packed:
    checks.int4_weight(packed, scales, zeros, group_size)
    n, k = packed.shape[0], packed.shape[1] * 2
    codes = _pad_k(packed).view(torch.int32).t().contiguous()
    z = zeros.t().contiguous() if zeros is not None else None
    return Packed(codes, scales.t().contiguous(), z, group_size, 4, n, k)


def prepack_int8(w: torch.Tensor, scale: torch.Tensor) -> Packed:
    checks.int8_weight(w, scale)
    n, k = w.shape
    return Packed(_pad_k(w).t().contiguous(), scale.reshape(1, n).contiguous(), None, k, 8, n, k)


def unpack(p: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The exact inverse of ``prepack_int4`` / ``prepack_int8``: the canonical (weight,
    scales, zeros)."""
    if p.bits == 4:
        packed = p.codes.t().contiguous().view(torch.uint8)[:, : p.in_features // 2].contiguous()
        zeros = None if p.zeros is None else p.zeros.t().contiguous()
        return packed, p.scales.t().contiguous(), zeros
    return p.codes.t()[:, : p.in_features].contiguous(), p.scales.reshape(p.out_features).clone(), None


@triton.jit
def _codes_minus_zero(w_ptr, z_ptr, k0, g, n_cols, N, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(q - z) for rows k0..k0+BLOCK_K of the packed weight, as int32[BLOCK_K, BLOCK_N]."""
    if BITS == 4:
        words_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(w_ptr + words_k.to(tl.int64)[:, None] * N + n_cols[None, :])
        shifts = tl.arange(0, 8) * 4
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
    else:
        rows = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + rows.to(tl.int64)[:, None] * N + n_cols[None, :]).to(tl.int32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + g * N + n_cols).to(tl.int32)
        q = q - z[None, :]
    elif BITS == 4:
        q = q - 8
    return q


@triton.jit
def _store_tile(acc, rows, rn, n_cols, M, N, bias_ptr, out_ptr, acc_ptr, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """The epilogue: bias and one cast into out, or (split K) the partial tile into this
    split's slice of acc_ptr ([SPLIT_K, M, N] fp32)."""
    mask = (rows[:, None] < M) & (rn[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + rn[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n_cols).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + tl.program_id(1).to(tl.int64) * M * N + offs, acc, mask=mask)


@triton.jit
def wo_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, acc_ptr, M, N, K, KP, G, stride_xm, M_BUCKET,
                   BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, ONE_GROUP: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_len = KP // SPLIT_K
    k_begin = tl.program_id(1) * k_len
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row/column 0 (valid memory) and are never stored.
    x_rows = tl.where(rm < M, rm, 0).to(tl.int64)
    n_cols = tl.where(rn < N, rn, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        g = k0 // G
        if EVEN_K:
            x = tl.load(x_ptr + x_rows[:, None] * stride_xm + (k0 + rk)[None, :])
        else:
            x = tl.load(x_ptr + x_rows[:, None] * stride_xm + (k0 + rk)[None, :], mask=(k0 + rk)[None, :] < K,
                        other=0.0)
        q = _codes_minus_zero(w_ptr, z_ptr, k0, g, n_cols, N, BITS, HAS_ZEROS, BLOCK_K, BLOCK_N)
        if DOT_FP32:
            x = x.to(tl.float32)
        if ONE_GROUP:
            # One scale per column: accumulate in place (one accumulator tile, not two)
            # and scale once after the loop.
            if DOT_FP32:
                acc = tl.dot(x, q.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, q.to(x.dtype), acc)
        else:
            s = tl.load(s_ptr + g * N + n_cols)
            if DOT_FP32:
                part = tl.dot(x, q.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, q.to(x.dtype))
            acc += part * s[None, :]
    if ONE_GROUP:
        acc *= tl.load(s_ptr + n_cols)[None, :]
    _store_tile(acc, rm, rn, n_cols, M, N, bias_ptr, out_ptr, acc_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def wo_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, acc_ptr, M, N, K, KP, G, stride_xm, M_BUCKET,
                   BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                   EVEN_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k_len = KP // SPLIT_K
    k_begin = tl.program_id(1) * k_len
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, ROWS)
    n_cols = tl.where(rn < N, rn, 0)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        g = k0 // G
        q = _codes_minus_zero(w_ptr, z_ptr, k0, g, n_cols, N, BITS, HAS_ZEROS, BLOCK_K, BLOCK_N).to(tl.float32)
        s = tl.load(s_ptr + g * N + n_cols)
        for r in tl.static_range(ROWS):
            # A tensor mask, never a scalar comparison joined to one: the interpreter of
            # Triton 3.9 refuses a mask that is not boolean, and `tensor & (r < M)` is not.
            live = tl.full((BLOCK_K,), r, tl.int32) < M
            if EVEN_K:
                xr = tl.load(x_ptr + r * stride_xm + k0 + rk, mask=live, other=0.0)
            else:
                xr = tl.load(x_ptr + r * stride_xm + k0 + rk, mask=(k0 + rk < K) & live, other=0.0)
            xr = xr.to(tl.float32)
            part = tl.sum(xr[:, None] * q, axis=0) * s
            acc = tl.where(rows[:, None] == r, acc + part[None, :], acc)
    _store_tile(acc, rows, rn, n_cols, M, N, bias_ptr, out_ptr, acc_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _split_k_epilogue_kernel(acc_ptr, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT_K):  # in split order: deterministic
        y += tl.load(acc_ptr + split * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_x(x: torch.Tensor, w: Packed, bias: torch.Tensor | None) -> None:
    checks.activation(x, "x")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has K = {x.shape[-1]} features but the weight has K = {w.in_features}")
    checks.bias(bias, w.out_features)
    checks.same_device({"x": x, "weight": w.codes, "bias": bias})


def linear(x: torch.Tensor, w: Packed, bias: torch.Tensor | None = None, config: triton.Config | None = None,
           variant: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x @ w'^T + bias`` in x's dtype (``lowbit.reference.w4a16_linear`` / ``w8a16_linear``).

    ``variant`` ("gemv" or "gemm"), ``split_k`` and ``config`` override the choices by shape
    and the autotuner (tests and benchmarks use them to reach every code path)."""
    _check_x(x, w, bias)
    n, k = w.out_features, w.in_features
    x2 = as_rows(x)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    variant = variant or ("gemv" if m <= GEMV_MAX_M else "gemm")
    if variant == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV variant takes at most {GEMV_MAX_M} rows, got M = {m}")
    kp = w.codes.shape[0] * (8 if w.bits == 4 else 1)
    s = split_k if split_k is not None else configs.split_k(m, n, kp, w.group_size)
    if kp % (s * K_MULTIPLE):
        raise ValueError(f"split_k = {s} does not divide K = {kp} into multiples of {K_MULTIPLE}")
    acc = torch.empty((s, m, n), dtype=torch.float32, device=x.device) if s > 1 else out
    args = (x2, w.codes, w.scales, w.zeros if w.zeros is not None else w.scales,
            bias if bias is not None else w.scales, out, acc, m, n, k, kp, w.group_size, x2.stride(0),
            configs.m_bucket(m))
    meta = dict(BITS=w.bits, HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=s, EVEN_K=k == kp)
    if variant == "gemv":
        kernel, family = wo_gemv_kernel, "wo_gemv"
        meta["ROWS"] = triton.next_power_of_2(m)

        def grid(cfg):
            return (triton.cdiv(n, cfg["BLOCK_N"]), s)
    else:
        kernel, family = wo_gemm_kernel, "wo_gemm"
        meta["ONE_GROUP"] = w.group_size >= k
        meta["DOT_FP32"] = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and configs.interpreting())

        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), s)

    if config is not None:
        if not configs.fits(config, m, n, k, w.group_size, s, kp):
            raise ValueError(f"config {config} does not fit K = {k}, G = {w.group_size}, split_k = {s}")
        wrap_triton(kernel)[grid(config.kwargs)](*args, **meta, **config.all_kwargs())
    else:
        wrap_triton(configs.autotuned(kernel, family, configs.arch()))[grid](*args, **meta)
    if s > 1:
        block = 1024
        wrap_triton(_split_k_epilogue_kernel)[(triton.cdiv(m * n, block),)](
            acc, bias if bias is not None else acc, out, m, n, HAS_BIAS=bias is not None, SPLIT_K=s, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)
