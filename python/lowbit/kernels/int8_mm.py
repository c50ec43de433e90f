"""Triton int8 scaled matmul: ``(a @ b^T, int32) * a_scale[m] * b_scale[n] + bias[n]``.

Algorithm: one program per [BLOCK_M, BLOCK_N] output tile (programs ordered in groups of
GROUP_M tile rows so neighbouring programs share B tiles in L2). The K loop loads an
[BLOCK_M, BLOCK_K] tile of a and a [BLOCK_N, BLOCK_K] tile of b — both K-major, the
"TN" layout the int8 tensor-core instructions consume directly (``mma.sync`` m16n8k32 on
Ampere, ``wgmma`` on Hopper, both chosen by the Triton compiler) — and accumulates in
int32, exactly. The epilogue runs in fp32 in the reference's order (acc * a_scale *
b_scale + bias), each step rounded once (never contracted into an FMA), and casts once to
the output dtype.

Layout: a int8[M, K] with any row stride and unit K stride; b int8[N, K] contiguous (the
canonical weight layout, so W8A8 needs no prepack here); a_scale float32[M] or one scale
broadcast with stride 0 (static activation quantization); b_scale float32[N].
Limits: K tails are masked (any K); int32 accumulation is exact for K < 2^17.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from lowbit import checks
from lowbit.kernels import configs
from lowbit.kernels.rounding import add_rn, mul_rn

OUT_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M tile rows are walked column by column."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def int8_mm_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_as,
                   stride_om, M_BUCKET, OUT_DTYPE_ID: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows past M / N read row 0 (always valid) instead of masking: their results are
    # never stored, and unmasked loads keep the K loop free of row predicates.
    a_rows = tl.where(rm < M, rm, 0).to(tl.int64)
    b_rows = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + b_rows[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + a_rows * stride_as)
    b_scale = tl.load(b_scale_ptr + b_rows)
    # Each multiply and the add round once, as the reference computes them (no fused
    # multiply-add: lowbit.kernels.rounding).
    y = mul_rn(mul_rn(acc.to(tl.float32), a_scale[:, None]), b_scale[None, :])
    if HAS_BIAS:
        y = add_rn(y, tl.load(bias_ptr + b_rows).to(tl.float32)[None, :])
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype,
                   config: triton.Config | None = None) -> torch.Tensor:
    """``lowbit.reference.int8_scaled_mm`` on the Triton kernel. ``a_scale`` may also hold
    one element (a static per-tensor scale). ``config`` fixes the tile config (tests);
    by default the autotuner picks it per shape."""
    static = a_scale.numel() == 1 and a.shape[0] != 1
    checks.int8_scaled_mm(a, b, a_scale.expand(a.shape[0]) if static else a_scale, b_scale, bias, out_dtype)
    m, k = a.shape
    n = b.shape[0]
    if a.stride(1) != 1:
        a = a.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    args = (a, b, a_scale, b_scale, bias if bias is not None else b_scale, out, m, n, k, a.stride(0),
            0 if static else 1, out.stride(0), configs.m_bucket(m))
    meta = dict(OUT_DTYPE_ID=OUT_DTYPE_IDS[out_dtype], HAS_BIAS=bias is not None)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    if config is not None:
        wrap_triton(int8_mm_kernel)[grid(config.kwargs)](*args, **meta, **config.all_kwargs())
    else:
        wrap_triton(configs.autotuned(int8_mm_kernel, "int8_mm", configs.arch()))[grid](*args, **meta)
    return out
