"""Typed Python entry points to the ``torch.ops.lowbit`` ops, each with its fake impl.

The schemas are declared once, in C++ (csrc/ops.cpp). Each op here has:
  - a typed wrapper that calls ``torch.ops.lowbit.<op>``, which dispatches by device to
    the native CPU (csrc/cpu) or CUDA (csrc/cuda) kernel;
  - a fake implementation right beside it, so torch.compile traces the op (shapes and
    dtypes only, with the same argument checks the kernels and the reference make).
The semantics of every op are those of the same-named function in ``lowbit.reference``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit import _extension, checks

_ops = torch.ops.lowbit
# The prepacked layouts' constants, from the extension that defines them (csrc/cpu/*.h,
# csrc/cuda/w4a16_layout.h).
LAYOUT = _extension.load("_C").layout()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per-token quantization: (q int8[..., K], scale float32[...])."""
    return _ops.quantize_per_token(x)


@torch.library.register_fake("lowbit::quantize_per_token")
def quantize_per_token_fake(x):
    checks.activation(x, "x")
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a @ b^T, int32) * a_scale[m] * b_scale[n] + bias[n]`` as ``out_dtype``."""
    return _ops.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)


@torch.library.register_fake("lowbit::int8_scaled_mm")
def int8_scaled_mm_fake(a, b, a_scale, b_scale, bias, out_dtype):
    checks.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def w8a8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 x int8 linear; activations quantized per token, or with a static ``x_scale``."""
    return _ops.w8a8_linear(x, w, w_scale, bias, x_scale)


def linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
    """The (fake) output of a linear op: x's leading shape, ``n`` features, x's dtype."""
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("lowbit::w8a8_linear")
def w8a8_linear_fake(x, w, w_scale, bias, x_scale=None):
    checks.weight_linear(x, w, w_scale, bias)
    if x_scale is not None:
        checks.per_tensor_scale(x_scale, "x_scale")
    return linear_out(x, w.shape[0])


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (q * s_w)^T + b`` with int8 per-channel weights."""
    return _ops.w8a16_linear(x, w, w_scale, bias)


@torch.library.register_fake("lowbit::w8a16_linear")
def _(x, w, w_scale, bias):
    checks.weight_linear(x, w, w_scale, bias)
    return linear_out(x, w.shape[0])


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w'^T + b`` with group-wise int4 weights (``zeros=None``: symmetric)."""
    return _ops.w4a16_linear(x, packed, scales, zeros, group_size, bias)


@torch.library.register_fake("lowbit::w4a16_linear")
def _(x, packed, scales, zeros, group_size, bias):
    checks.w4a16_linear(x, packed, scales, zeros, group_size, bias)
    return linear_out(x, packed.shape[0])


def dequantize_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * s[n]`` as ``dtype``."""
    return _ops.dequantize_int8(w, scale, dtype)


@torch.library.register_fake("lowbit::dequantize_int8")
def dequantize_int8_fake(w, scale, dtype):
    checks.int8_weight(w, scale)
    checks.float_dtype(dtype, "dtype")
    return w.new_empty(w.shape, dtype=dtype)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(q - z) * s`` per group, as ``dtype``."""
    return _ops.dequantize_int4(packed, scales, zeros, group_size, dtype)


@torch.library.register_fake("lowbit::dequantize_int4")
def dequantize_int4_fake(packed, scales, zeros, group_size, dtype):
    checks.int4_weight(packed, scales, zeros, group_size)
    checks.float_dtype(dtype, "dtype")
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def embedding_int8(ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an int8 table quantized per row, dequantized, as ``dtype``."""
    return _ops.embedding_int8(ids, w, scale, dtype)


@torch.library.register_fake("lowbit::embedding_int8")
def embedding_int8_fake(ids, w, scale, dtype):
    checks.int8_weight(w, scale)
    checks.float_dtype(dtype, "dtype")
    return w.new_empty((*ids.shape, w.shape[1]), dtype=dtype)


def embedding_int4(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of a group-wise int4 table, dequantized, as ``dtype``."""
    return _ops.embedding_int4(ids, packed, scales, zeros, group_size, dtype)


@torch.library.register_fake("lowbit::embedding_int4")
def embedding_int4_fake(ids, packed, scales, zeros, group_size, dtype):
    checks.int4_weight(packed, scales, zeros, group_size)
    checks.float_dtype(dtype, "dtype")
    return packed.new_empty((*ids.shape, packed.shape[1] * 2), dtype=dtype)


def int8_prepack(w: torch.Tensor) -> torch.Tensor:
    """int8[N, K] weights -> the CPU GEMM's blocked layout (uint8, shifted by 128)."""
    return _ops.int8_prepack(w)


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _int8_packed_shape(n: int, k: int) -> tuple[int, int, int, int]:
    panel, group_k = LAYOUT["cpu_panel"], LAYOUT["int8_group_k"]
    return (_round_up(n, panel) // panel, _round_up(k, LAYOUT["int8_align_k"]) // group_k, panel, group_k)


def _wo_panels(n: int) -> int:
    return _round_up(n, LAYOUT["wo_panel"]) // LAYOUT["wo_panel"]


@torch.library.register_fake("lowbit::int8_prepack")
def _(w):
    checks.int8_weight(w, w.new_empty((w.shape[0],), dtype=torch.float32))
    return w.new_empty(_int8_packed_shape(*w.shape), dtype=torch.uint8)


def int8_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The exact inverse of ``int8_prepack``: the int8[N, K] weight."""
    return _ops.int8_unpack(packed, out_features, in_features)


@torch.library.register_fake("lowbit::int8_unpack")
def _(packed, out_features, in_features):
    checks.dtype(packed, torch.uint8, "packed")
    checks.shape(packed, _int8_packed_shape(out_features, in_features), "packed")
    return packed.new_empty((out_features, in_features), dtype=torch.int8)


def w8a8_linear_prepacked(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    path: int = -1,
) -> torch.Tensor:
    """``w8a8_linear`` on weights from ``int8_prepack`` of an [N, ``in_features``] weight;
    ``path`` fixes the kernel path (an int8 id of ``lowbit.plan.KERNEL_PATHS``; -1: the
    kernel chooses)."""
    return _ops.w8a8_linear_prepacked(x, packed, w_scale, in_features, bias, x_scale, path)


@torch.library.register_fake("lowbit::w8a8_linear_prepacked")
def _(x, packed, w_scale, in_features, bias, x_scale=None, path=-1):
    checks.activation(x, "x")
    n, k = w_scale.shape[0], x.shape[-1]
    checks.in_features(x, in_features)
    checks.dtype(packed, torch.uint8, "packed")
    checks.shape(packed, _int8_packed_shape(n, k), "packed")
    checks.bias(bias, n)
    if x_scale is not None:
        checks.per_tensor_scale(x_scale, "x_scale")
    return linear_out(x, n)


def w4a16_prepack(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int4 weights -> the CPU weight-only GEMM's panels and per-group params
    (uint8: per panel and group, 64 fp32 scales then 64 uint8 zero points)."""
    return _ops.w4a16_prepack(packed, scales, zeros, group_size)


@torch.library.register_fake("lowbit::w4a16_prepack")
def _(packed, scales, zeros, group_size):
    checks.int4_weight(packed, scales, zeros, group_size)
    n, k = packed.shape[0], packed.shape[1] * 2
    panels, panel = _wo_panels(n), LAYOUT["wo_panel"]
    return (packed.new_empty((panels, k // 2, panel)),
            packed.new_empty((panels, k // group_size, LAYOUT["wo_int4_group_bytes"])))


def w4a16_unpack(
    w: torch.Tensor, params: torch.Tensor, group_size: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of ``w4a16_prepack``: (packed, scales, zeros); symmetric weights
    come back with zero point 8 stored."""
    return _ops.w4a16_unpack(w, params, group_size, out_features)


@torch.library.register_fake("lowbit::w4a16_unpack")
def _(w, params, group_size, out_features):
    checks.dtype(w, torch.uint8, "w")
    k = w.shape[1] * 2
    checks.group_size(group_size, k)
    checks.shape(w, (_wo_panels(out_features), k // 2, LAYOUT["wo_panel"]), "w")
    return (w.new_empty((out_features, k // 2)), w.new_empty((out_features, k // group_size), dtype=torch.float32),
            w.new_empty((out_features, k // group_size)))


def w4a16_linear_prepacked(
    x: torch.Tensor,
    w: torch.Tensor,
    params: torch.Tensor,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None = None,
    path: int = -1,
) -> torch.Tensor:
    """``w4a16_linear`` on weights from ``w4a16_prepack``; ``path`` fixes the kernel path
    (a weight_only id of ``lowbit.plan.KERNEL_PATHS``; -1: the kernel chooses)."""
    return _ops.w4a16_linear_prepacked(x, w, params, group_size, out_features, bias, path)


def _check_wo_prepacked(x, w, wdtype, n, rows, bias):
    checks.activation(x, "x")
    checks.dtype(w, wdtype, "w")
    checks.shape(w, (_wo_panels(n), rows, LAYOUT["wo_panel"]), "w")
    checks.bias(bias, n)


@torch.library.register_fake("lowbit::w4a16_linear_prepacked")
def _(x, w, params, group_size, out_features, bias, path=-1):
    _check_wo_prepacked(x, w, torch.uint8, out_features, x.shape[-1] // 2, bias)
    checks.group_size(group_size, x.shape[-1])
    checks.dtype(params, torch.uint8, "params")
    checks.shape(params, (w.shape[0], x.shape[-1] // group_size, LAYOUT["wo_int4_group_bytes"]), "params")
    return linear_out(x, out_features)


def w8a16_prepack(w: torch.Tensor) -> torch.Tensor:
    """int8[N, K] weights -> the CPU weight-only GEMM's panels."""
    return _ops.w8a16_prepack(w)


@torch.library.register_fake("lowbit::w8a16_prepack")
def _(w):
    checks.int8_weight(w, w.new_empty((w.shape[0],), dtype=torch.float32))
    return w.new_empty((_wo_panels(w.shape[0]), w.shape[1], LAYOUT["wo_panel"]))


def w8a16_unpack(w: torch.Tensor, out_features: int) -> torch.Tensor:
    """The exact inverse of ``w8a16_prepack``: the int8[N, K] weight."""
    return _ops.w8a16_unpack(w, out_features)


@torch.library.register_fake("lowbit::w8a16_unpack")
def _(w, out_features):
    checks.dtype(w, torch.int8, "w")
    checks.shape(w, (_wo_panels(out_features), w.shape[1], LAYOUT["wo_panel"]), "w")
    return w.new_empty((out_features, w.shape[1]))


def w8a16_linear_prepacked(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, path: int = -1
) -> torch.Tensor:
    """``w8a16_linear`` on weights from ``w8a16_prepack``; ``path`` as for w4a16."""
    return _ops.w8a16_linear_prepacked(x, w, w_scale, bias, path)


@torch.library.register_fake("lowbit::w8a16_linear_prepacked")
def _(x, w, w_scale, bias, path=-1):
    _check_wo_prepacked(x, w, torch.int8, w_scale.shape[0], x.shape[-1], bias)
    checks.dtype(w_scale, torch.float32, "w_scale")
    return linear_out(x, w_scale.shape[0])


def w4a16_cuda_prepack(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical int4 weights (CPU tensors) -> the CUDA W4A16 GEMM's (codes, scales, zeros)."""
    return _ops.w4a16_cuda_prepack(packed, scales, zeros, group_size)


@torch.library.register_fake("lowbit::w4a16_cuda_prepack")
def _(packed, scales, zeros, group_size):
    checks.int4_weight(packed, scales, zeros, group_size)
    n, k = packed.shape[0], packed.shape[1] * 2
    np_, kp = _round_up(n, LAYOUT["cuda_w4a16_block_n"]), _round_up(k, LAYOUT["cuda_w4a16_block_k"])
    groups = -(-kp // group_size)
    return (packed.new_empty((kp // 16 * (np_ // 64) * 512,)), scales.new_empty((groups, np_)),
            packed.new_empty((groups, np_)))


def w4a16_cuda_unpack(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, out_features: int,
    in_features: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of ``w4a16_cuda_prepack`` (CPU tensors): (packed, scales, zeros)."""
    return _ops.w4a16_cuda_unpack(codes, scales, zeros, group_size, out_features, in_features)


@torch.library.register_fake("lowbit::w4a16_cuda_unpack")
def _(codes, scales, zeros, group_size, out_features, in_features):
    checks.group_size(group_size, in_features)
    groups = in_features // group_size
    return (codes.new_empty((out_features, in_features // 2)), scales.new_empty((out_features, groups)),
            codes.new_empty((out_features, groups)))


def w4a16_linear_cuda_prepacked(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w4a16_linear`` on the CUDA GEMM, weights from ``w4a16_cuda_prepack`` (tensor cores for
    fp16/bf16 x, CUDA-core FMAs for fp32 x)."""
    return _ops.w4a16_linear_cuda_prepacked(x, codes, scales, zeros, group_size, out_features, bias)


@torch.library.register_fake("lowbit::w4a16_linear_cuda_prepacked")
def _(x, codes, scales, zeros, group_size, out_features, bias):
    checks.activation(x, "x")
    checks.dtype(codes, torch.uint8, "codes")
    checks.dtype(scales, torch.float32, "scales")
    checks.dtype(zeros, torch.uint8, "zeros")
    checks.bias(bias, out_features)
    return linear_out(x, out_features)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8[N, K] values 0..15 -> uint8[N, K/2] (even k in the low nibble)."""
    return _ops.pack_int4(q)


@torch.library.register_fake("lowbit::pack_int4")
def _(q):
    checks.int4_values(q)
    return q.new_empty((q.shape[0], q.shape[1] // 2))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8[N, K/2] -> uint8[N, K] values 0..15."""
    return _ops.unpack_int4(packed)


@torch.library.register_fake("lowbit::unpack_int4")
def _(packed):
    checks.packed_int4(packed)
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2))


# --- gradients ---------------------------------------------------------------------------------
# Every linear op computes y = x @ W'^T + b with W' the dequantized weight, so the input's
# gradient is grad @ W' (straight through the activation quantization of W8A8) and the
# bias's is grad summed over the rows; the quantized weights and scales are frozen and get
# none. W' is rebuilt in the backward pass from the saved quantized tensors by the kernels of
# the layout they are in (unpack, dequantize), in the gradient's dtype, and never kept; the
# input itself is not saved, only its shape.


def register_linear_autograd(op: str, dequantize: Callable[[list, int, torch.dtype], torch.Tensor],
                             bias_index: int) -> None:
    """Register the gradient of linear op ``op`` (qualified name). ``dequantize(inputs, k,
    dtype)`` rebuilds W' [N, K] from the op's inputs (the activation's slot holds None) and
    the activation's K; ``bias_index`` is the bias's position among the inputs. Used for the
    ``lowbit`` ops here and the ``lowbit_triton`` ones."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) and i != 0 else None for i, t in enumerate(inputs)))
        ctx.constants = [None if isinstance(t, torch.Tensor) else t for t in inputs]
        ctx.x_shape = inputs[0].shape

    def backward(ctx, grad):
        inputs = [c if s is None else s for s, c in zip(ctx.saved_tensors, ctx.constants)]
        bias = inputs[bias_index]
        grads = [None] * len(inputs)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grads[0] = (rows @ dequantize(inputs, ctx.x_shape[-1], grad.dtype)).reshape(ctx.x_shape)
        if bias is not None and ctx.needs_input_grad[bias_index]:
            grads[bias_index] = rows.sum(0).to(bias.dtype)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _cuda_w4a16_weight(i: list, k: int, dtype: torch.dtype) -> torch.Tensor:
    # The CUDA layout comes apart on the CPU (w4a16_cuda_unpack); W' is built on the GPU.
    parts = w4a16_cuda_unpack(i[1].cpu(), i[2].cpu(), i[3].cpu(), i[4], i[5], k)
    return dequantize_int4(*(t.to(i[1].device) for t in parts), i[4], dtype)


register_linear_autograd("lowbit::w8a8_linear", lambda i, k, dt: dequantize_int8(i[1], i[2], dt), 3)
register_linear_autograd("lowbit::w8a16_linear", lambda i, k, dt: dequantize_int8(i[1], i[2], dt), 3)
register_linear_autograd("lowbit::w4a16_linear", lambda i, k, dt: dequantize_int4(i[1], i[2], i[3], i[4], dt), 5)
register_linear_autograd("lowbit::w8a8_linear_prepacked",
                         lambda i, k, dt: dequantize_int8(int8_unpack(i[1], i[2].shape[0], k), i[2], dt), 4)
register_linear_autograd("lowbit::w8a16_linear_prepacked",
                         lambda i, k, dt: dequantize_int8(w8a16_unpack(i[1], i[2].shape[0]), i[2], dt), 3)
register_linear_autograd("lowbit::w4a16_linear_prepacked",
                         lambda i, k, dt: dequantize_int4(*w4a16_unpack(i[1], i[2], i[3], i[4]), i[3], dt), 5)
register_linear_autograd("lowbit::w4a16_linear_cuda_prepacked", _cuda_w4a16_weight, 6)
