"""Argument checks shared by the reference ops and the fake (meta) implementations.

They look only at dtypes, shapes and devices, never at values, so they also run on
fake tensors while torch.compile traces. The C++ kernels repeat the same checks with
TORCH_CHECK_TYPE / TORCH_CHECK_VALUE (csrc/checks.h), which raise the same Python
exception types: TypeError for a wrong dtype, ValueError for a wrong shape, device or
group size.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SIZES = (32, 64, 128)


def float_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dtype}")


def dtype(t: torch.Tensor, expected: torch.dtype, name: str) -> None:
    if t.dtype != expected:
        raise TypeError(f"{name} must be {expected}, got {t.dtype}")


def shape(t: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(name_tensor: dict[str, torch.Tensor | None]) -> None:
    present = {n: t for n, t in name_tensor.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (weights are stored row-major)")


def activation(x: torch.Tensor, name: str) -> None:
    float_dtype(x.dtype, name)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got {tuple(x.shape)}")


def per_tensor_scale(scale: torch.Tensor, name: str) -> None:
    dtype(scale, torch.float32, name)
    if scale.numel() != 1:
        raise ValueError(f"{name} must hold one per-tensor scale, got shape {tuple(scale.shape)}")


def bias(b: torch.Tensor | None, n: int) -> None:
    if b is None:
        return
    float_dtype(b.dtype, "bias")
    shape(b, (n,), "bias")


def _matrix(t: torch.Tensor, expected: torch.dtype, name: str) -> None:
    dtype(t, expected, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {t.dim()}-D")


def int8_weight(w: torch.Tensor, scale: torch.Tensor) -> None:
    _matrix(w, torch.int8, "w")
    contiguous(w, "w")
    dtype(scale, torch.float32, "w_scale")
    shape(scale, (w.shape[0],), "w_scale")
    same_device({"w": w, "w_scale": scale})


def int8_scaled_mm(a, b, a_scale, b_scale, bias_, out_dtype) -> None:
    _matrix(a, torch.int8, "a")
    _matrix(b, torch.int8, "b")
    contiguous(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}")
    dtype(a_scale, torch.float32, "a_scale")
    shape(a_scale, (a.shape[0],), "a_scale")
    dtype(b_scale, torch.float32, "b_scale")
    shape(b_scale, (b.shape[0],), "b_scale")
    bias(bias_, b.shape[0])
    float_dtype(out_dtype, "out_dtype")
    same_device({"a": a, "b": b, "a_scale": a_scale, "b_scale": b_scale, "bias": bias_})


def in_features(x: torch.Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"x has K = {x.shape[-1]} features but the weight has K = {k}")


def weight_linear(x, w, w_scale, bias_) -> None:
    """The arguments of an int8-weight linear op (w8a8_linear, w8a16_linear)."""
    activation(x, "x")
    int8_weight(w, w_scale)
    in_features(x, w.shape[1])
    bias(bias_, w.shape[0])
    same_device({"x": x, "w": w, "bias": bias_})


def int4_values(q: torch.Tensor) -> None:
    _matrix(q, torch.uint8, "q")
    if q.shape[1] % 2:
        raise ValueError(f"int4 packing needs an even K, got K = {q.shape[1]}")


def packed_int4(packed: torch.Tensor) -> None:
    _matrix(packed, torch.uint8, "packed")


def group_size(g: int, k: int) -> None:
    if g != k and g not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} or K = {k}, got {g}")
    if k % g:
        raise ValueError(f"K = {k} is not a multiple of group_size = {g}")


def int4_weight(packed, scales, zeros, g: int) -> None:
    packed_int4(packed)
    contiguous(packed, "packed")
    n, k = packed.shape[0], packed.shape[1] * 2
    group_size(g, k)
    dtype(scales, torch.float32, "scales")
    shape(scales, (n, k // g), "scales")
    contiguous(scales, "scales")
    if zeros is not None:
        dtype(zeros, torch.uint8, "zeros")
        shape(zeros, (n, k // g), "zeros")
        contiguous(zeros, "zeros")
    same_device({"packed": packed, "scales": scales, "zeros": zeros})


def w4a16_linear(x, packed, scales, zeros, g: int, bias_) -> None:
    activation(x, "x")
    int4_weight(packed, scales, zeros, g)
    in_features(x, packed.shape[1] * 2)
    bias(bias_, packed.shape[0])
    same_device({"x": x, "packed": packed, "bias": bias_})


def embedding_ids(ids: torch.Tensor, rows: int) -> None:
    """Token ids for a table of ``rows`` rows: an integer tensor with every id in range."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding ids must be int64 or int32, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"embedding id {bad} is out of range for a table of {rows} rows")
