"""The Triton kernels as ``torch.ops.lowbit_triton`` ops.

Registered with ``torch.library.triton_op``: the launchers call their kernels through
``wrap_triton``, so on a GPU torch.compile (Inductor) sees into the kernels instead of
treating each op as opaque. Each op also has an explicit fake implementation — the same
function as the ``lowbit.ops`` op of the same semantics, so shapes are computed in one
place: ``triton_op`` would otherwise trace its body with fake tensors, which works on a GPU but not under TRITON_INTERPRET=1, where
the interpreter reads data pointers. With the explicit fakes, fake-tensor tracing (Dynamo,
``opcheck``'s fake test) works in the interpreter too; the functionalized (AOT) trace still
decomposes the op into its kernels, which only a GPU can run (tests/test_triton_kernels.py
checks that on CUDA and says so when it is skipped).

The semantics of every op are those of the same-named function in ``lowbit.reference``;
``weight_only_linear`` runs W4A16 and W8A16 on weights from ``weight_only.prepack_*``.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from lowbit import checks
from lowbit import ops as lowbit_ops
from lowbit.kernels import int8_mm, quantize, weight_only


@triton_op("lowbit_triton::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize.quantize_per_token(x)


quantize_per_token.register_fake(lowbit_ops.quantize_per_token_fake)


@triton_op("lowbit_triton::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantize.quantize_per_tensor(x, scale)


@quantize_per_tensor.register_fake
def _(x, scale):
    checks.activation(x, "x")
    checks.per_tensor_scale(scale, "x_scale")
    return torch.empty_like(x, dtype=torch.int8)


@triton_op("lowbit_triton::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return int8_mm.int8_scaled_mm(a, b, a_scale, b_scale, bias, out_dtype)


int8_scaled_mm.register_fake(lowbit_ops.int8_scaled_mm_fake)


@triton_op("lowbit_triton::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                x_scale: torch.Tensor | None) -> torch.Tensor:
    checks.weight_linear(x, w, w_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x_scale is None:
        qx, sx = quantize.quantize_per_token(x2)
    else:
        qx, sx = quantize.quantize_per_tensor(x2, x_scale), x_scale.reshape(1)
    y = int8_mm.int8_scaled_mm(qx, w, sx, w_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


w8a8_linear.register_fake(lowbit_ops.w8a8_linear_fake)


@triton_op("lowbit_triton::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, group_size: int, bits: int, out_features: int,
                       in_features: int) -> torch.Tensor:
    packed = weight_only.Packed(codes, scales, zeros, group_size, bits, out_features, in_features)
    return weight_only.linear(x, packed, bias)


@weight_only_linear.register_fake
def _(x, codes, scales, zeros, bias, group_size, bits, out_features, in_features):
    checks.activation(x, "x")
    checks.in_features(x, in_features)
    checks.bias(bias, out_features)
    return lowbit_ops.linear_out(x, out_features)


@triton_op("lowbit_triton::dequantize_int8", mutates_args=())
def dequantize_int8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return quantize.dequantize_int8(w, scale, dtype)


dequantize_int8.register_fake(lowbit_ops.dequantize_int8_fake)


@triton_op("lowbit_triton::dequantize_int4", mutates_args=())
def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    return quantize.dequantize_int4(packed, scales, zeros, group_size, dtype)


dequantize_int4.register_fake(lowbit_ops.dequantize_int4_fake)


# The gradients: those of the lowbit ops of the same semantics (lowbit.ops), W' rebuilt from
# the Triton layouts.
def _weight_only_weight(i: list, k: int, dtype: torch.dtype) -> torch.Tensor:
    packed = weight_only.Packed(i[1], i[2], i[3], i[5], i[6], i[7], i[8])
    qweight, scales, zeros = weight_only.unpack(packed)
    if packed.bits == 4:
        return lowbit_ops.dequantize_int4(qweight, scales, zeros, packed.group_size, dtype)
    return lowbit_ops.dequantize_int8(qweight, scales, dtype)


lowbit_ops.register_linear_autograd("lowbit_triton::w8a8_linear",
                                    lambda i, k, dt: lowbit_ops.dequantize_int8(i[1], i[2], dt), 3)
lowbit_ops.register_linear_autograd("lowbit_triton::weight_only_linear", _weight_only_weight, 4)
