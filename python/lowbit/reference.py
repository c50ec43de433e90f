"""Pure-PyTorch reference of every lowbit op: the test oracle and the fallback backend.

Each function here is the executable form of the canonical formats (docs/design.md, "Canonical formats").
Every kernel, on every device, is tested against these functions. They favour
clarity over speed and run on any device torch supports.

Conventions shared by all ops:
  - activations ``x[..., K]`` (float32, bfloat16 or float16); outputs keep x's leading
    shape and dtype unless an ``out_dtype`` is given;
  - weights ``w[N, K]``: int8 as ``int8[N, K]``, int4 packed as ``uint8[N, K/2]`` (even
    k in the low nibble, odd k in the high nibble), scales ``float32``, integer zero
    points ``uint8`` (``None`` means symmetric, i.e. the fixed zero point 8);
  - every product is accumulated in fp32 (int32 for int8 x int8), and the epilogue runs
    in fp32 in the order ``acc * s_x[m] * s_w[n] + b[n]`` before one cast to the output
    dtype.
"""

from __future__ import annotations

import torch

from lowbit import checks

INT8_MAX = 127
INT4_SYMMETRIC_ZERO = 8


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (all-zero row, group or token) becomes 1 so nothing divides by zero."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 symmetric per-token quantization: ``s = max|x|/127``, ``q = clamp(round(x/s))``.

    Returns ``q`` (int8, x's shape) and ``s`` (float32, x's shape without the last dim).
    """
    checks.activation(x, "x")
    xf = x.float()
    scale = _safe_scale(xf.abs().amax(dim=-1) / INT8_MAX)
    q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 symmetric quantization with one given (calibrated) scale, clamped to +-127."""
    checks.activation(x, "x")
    checks.per_tensor_scale(scale, "x_scale")
    q = torch.clamp(torch.round(x.float() / scale.float()), -INT8_MAX, INT8_MAX)
    return q.to(torch.int8)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a @ b^T, exact int32) * a_scale[m] * b_scale[n] + bias[n]`` as ``out_dtype``.

    a: int8[M, K] activations, b: int8[N, K] weights, a_scale: float32[M], b_scale:
    float32[N]. The int32 accumulator is computed exactly.
    """
    checks.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)
    # A float64 product is exact here (|acc| <= K * 127^2 < 2^53) and exists on every
    # device, unlike an int32 matmul.
    acc = (a.double() @ b.double().t()).to(torch.int32)
    y = acc.float() * a_scale.unsqueeze(1) * b_scale.unsqueeze(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear: int8 activations (dynamic per token, or static with ``x_scale``)."""
    checks.weight_linear(x, w, w_scale, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x_scale is None:
        qx, sx = quantize_per_token(x2)
    else:
        qx = quantize_per_tensor(x2, x_scale)
        sx = x_scale.float().reshape(1).expand(x2.shape[0])
    y = int8_scaled_mm(qx, w, sx, w_scale, bias, x.dtype)
    return y.reshape(*lead, w.shape[0])


def dequantize_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w' = q * s[n]`` computed in fp32, returned as ``dtype``."""
    checks.int8_weight(w, scale)
    checks.float_dtype(dtype, "dtype")
    return (w.float() * scale.unsqueeze(1)).to(dtype)


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y = x @ (q * s_w)^T + b`` with fp32 accumulation, cast to x's dtype."""
    checks.weight_linear(x, w, w_scale, bias)
    y = x.float() @ dequantize_int8(w, w_scale, torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8[N, K] with values 0..15 -> uint8[N, K/2]: even k low nibble, odd k high."""
    checks.int4_values(q)
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"int4 values must lie in [0, 15], found {int(q.max())}")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8[N, K/2] -> uint8[N, K] with values 0..15 (inverse of ``pack_int4``)."""
    checks.packed_int4(packed)
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``w'[n, k] = (q[n, k] - z[n, k/G]) * s[n, k/G]`` in fp32, returned as ``dtype``."""
    checks.int4_weight(packed, scales, zeros, group_size)
    checks.float_dtype(dtype, "dtype")
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = k // group_size
    if zeros is None:
        z = torch.full((n, groups), float(INT4_SYMMETRIC_ZERO), device=q.device)
    else:
        z = zeros.float()
    w = (q.reshape(n, groups, group_size) - z.unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y = x @ w'^T + b`` with w' the dequantized int4 weight, fp32 accumulation."""
    checks.w4a16_linear(x, packed, scales, zeros, group_size, bias)
    w = dequantize_int4(packed, scales, zeros, group_size, torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def embedding_int8(ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an int8 table quantized per row: ``q[id] * s[id]`` in fp32, as
    ``dtype``; output shape ``ids.shape + (D,)``."""
    checks.embedding_ids(ids, w.shape[0])
    flat = ids.reshape(-1)
    rows = dequantize_int8(w.index_select(0, flat), scale.index_select(0, flat), dtype)
    return rows.reshape(*ids.shape, w.shape[1])


def embedding_int4(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of a group-wise int4 table: ``(q - z) * s`` per group in fp32, as
    ``dtype``; output shape ``ids.shape + (D,)``."""
    checks.embedding_ids(ids, packed.shape[0])
    flat = ids.reshape(-1)
    rows = dequantize_int4(packed.index_select(0, flat), scales.index_select(0, flat),
                           None if zeros is None else zeros.index_select(0, flat), group_size, dtype)
    return rows.reshape(*ids.shape, packed.shape[1] * 2)
