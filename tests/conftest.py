"""Shared test helpers: random inputs drawn fresh each run, and the devices to test on."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. The variable
# is read when a kernel is defined, so it is set before anything imports lowbit.kernels.
TRITON_INTERPRETED = not torch.cuda.is_available()
if TRITON_INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
from hypothesis import settings

import lowbit  # noqa: F401  (registers the ops)
from lowbit import formats

settings.register_profile("lowbit", deadline=None, max_examples=25, derandomize=False)
settings.load_profile("lowbit")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def activation(shape, dtype=torch.float32, device="cpu", seed=0, noncontiguous=False) -> torch.Tensor:
    """Random activations with a few outlier channels, as real activations have.

    ``noncontiguous`` returns a strided view (every other element of a wider tensor).
    """
    g = make_generator(seed)
    x = torch.randn(*shape, generator=g)
    x[..., :: max(1, shape[-1] // 7)] *= 8
    x = x.to(dtype).to(device)
    if noncontiguous:
        x = torch.stack((x, torch.zeros_like(x)), dim=-1)[..., 0]
    return x


def weight(n, k, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = make_generator(seed + 1)
    return (torch.randn(n, k, generator=g) / k**0.5).to(dtype)


def int8_weight(n, k, seed=0, device="cpu"):
    q, s = formats.quantize_int8_per_channel(weight(n, k, seed=seed))
    return q.to(device), s.to(device)


def int4_weight(n, k, group_size, symmetric, seed=0, device="cpu"):
    packed, scales, zeros = formats.quantize_int4_groupwise(weight(n, k, seed=seed), group_size, symmetric)
    return packed.to(device), scales.to(device), (None if zeros is None else zeros.to(device))


def int8_values(shape, seed=0, device="cpu") -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=make_generator(seed), dtype=torch.int8).to(device)


def pytest_generate_tests(metafunc):
    # A parameter rather than a fixture, so hypothesis tests can take it too.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)
