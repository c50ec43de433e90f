"""Autotune configuration lists (Ampere, Hopper) and the one pruner every kernel shares.

Each GEMM kernel family has a list per architecture; ``autotuned(kernel, family)`` wraps a
``@triton.jit`` kernel in ``triton.autotune`` with the list of the current device's
architecture and ``prune``, which drops configs that the shape cannot use (tiles larger
than the problem, K blocks that straddle a quantization group or a split-K boundary).

Under ``TRITON_INTERPRET=1`` (CPU tensors) there is nothing to time, and with
``LOWBIT_TRITON_AUTOTUNE=0`` timing is switched off: ``prune`` keeps only the first surviving
config, so the autotuner runs it without benchmarking.

Why these lists:
- int8 GEMM: an int8 ``mma`` consumes k in steps of 32, so BLOCK_K >= 64 keeps two MMAs in
  flight per stage; tiles of 128x128..256x128 give the arithmetic intensity int8 needs on
  A100/H100 (Hopper lowers ``tl.dot`` to ``wgmma``, which wants BLOCK_M >= 64 per warpgroup).
- weight-only GEMM: small M is bound by weight bytes, so the small-M configs have narrow M
  tiles, wide N tiles, deep pipelines (stages) and split-K. Large M wants big tiles, but
  the kernel holds two fp32 tiles (weight_only.py), so 128x128 takes 8 warps and nothing is
  larger: 128x256 and 4-warp 128x128 spilled on sm_80 and sm_90 (kernels/aot.py).
- GEMV (M <= 4): no tensor cores and no BLOCK_M (every row of x is one program's); BLOCK_N x
  BLOCK_K dequantized weights per program.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from lowbit.kernels import interpreting


AUTOTUNE_ENV = "LOWBIT_TRITON_AUTOTUNE"


def autotuning() -> bool:
    """False under the interpreter (nothing to time) or with LOWBIT_TRITON_AUTOTUNE=0: then
    the first config that fits the shape runs untimed (tests on a GPU use this to compile
    one config per shape instead of timing every one)."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


SPLIT_K_MAX_M = 64  # split-K only below this M; above it the output tiles fill the GPU


def _cfg(bm, bn, bk, warps, stages, **extra):
    tile = {"BLOCK_N": bn, "BLOCK_K": bk} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return triton.Config({**tile, **extra}, num_warps=warps, num_stages=stages)


CONFIGS = {
    "int8_mm": {
        "ampere": [
            _cfg(128, 256, 64, 8, 3, GROUP_M=8), _cfg(256, 128, 64, 8, 3, GROUP_M=8),
            _cfg(128, 128, 128, 8, 3, GROUP_M=8), _cfg(128, 128, 64, 4, 4, GROUP_M=8),
            _cfg(64, 128, 64, 4, 4, GROUP_M=8), _cfg(128, 64, 64, 4, 4, GROUP_M=8),
            _cfg(64, 64, 128, 4, 4, GROUP_M=8), _cfg(32, 64, 128, 4, 4, GROUP_M=8),
            _cfg(16, 64, 128, 4, 4, GROUP_M=8),
        ],
        "hopper": [
            _cfg(128, 256, 128, 8, 3, GROUP_M=8), _cfg(256, 128, 128, 8, 3, GROUP_M=8),
            _cfg(128, 128, 128, 8, 4, GROUP_M=8), _cfg(128, 128, 128, 4, 4, GROUP_M=8),
            _cfg(64, 256, 128, 4, 4, GROUP_M=8), _cfg(64, 128, 128, 4, 5, GROUP_M=8),
            _cfg(64, 64, 128, 4, 5, GROUP_M=8), _cfg(32, 64, 128, 4, 5, GROUP_M=8),
            _cfg(16, 64, 128, 4, 5, GROUP_M=8),
        ],
    },
    "wo_gemm": {
        "ampere": [
            _cfg(16, 64, 128, 4, 4, GROUP_M=8), _cfg(16, 128, 64, 4, 4, GROUP_M=8),
            _cfg(16, 256, 64, 8, 3, GROUP_M=8), _cfg(16, 128, 32, 4, 4, GROUP_M=8),
            _cfg(32, 128, 64, 4, 4, GROUP_M=8), _cfg(64, 128, 64, 8, 4, GROUP_M=8),
            _cfg(128, 64, 64, 8, 4, GROUP_M=8), _cfg(128, 128, 64, 8, 3, GROUP_M=8),
            _cfg(128, 128, 32, 8, 4, GROUP_M=8), _cfg(64, 64, 32, 4, 4, GROUP_M=8),
        ],
        "hopper": [
            _cfg(16, 64, 128, 4, 4, GROUP_M=8), _cfg(16, 128, 128, 4, 4, GROUP_M=8),
            _cfg(16, 256, 64, 8, 4, GROUP_M=8), _cfg(16, 128, 32, 4, 5, GROUP_M=8),
            _cfg(32, 128, 64, 4, 4, GROUP_M=8), _cfg(64, 128, 64, 8, 4, GROUP_M=8),
            _cfg(128, 64, 64, 8, 4, GROUP_M=8), _cfg(128, 128, 64, 8, 4, GROUP_M=8),
            _cfg(128, 128, 32, 8, 4, GROUP_M=8), _cfg(64, 64, 32, 4, 4, GROUP_M=8),
        ],
    },
    "wo_gemv": {
        "ampere": [
            _cfg(None, 64, 128, 4, 3), _cfg(None, 128, 64, 4, 3), _cfg(None, 256, 32, 4, 3),
            _cfg(None, 128, 128, 8, 3), _cfg(None, 32, 32, 2, 2),
        ],
        "hopper": [
            _cfg(None, 64, 128, 4, 4), _cfg(None, 128, 64, 4, 4), _cfg(None, 256, 32, 4, 4),
            _cfg(None, 128, 128, 8, 3), _cfg(None, 32, 32, 2, 2),
        ],
    },
}


def arch() -> str:
    """The config list to use on the current device: "hopper" from sm_90, else "ampere"."""
    if interpreting() or not torch.cuda.is_available():
        return "hopper"
    return "hopper" if torch.cuda.get_device_capability()[0] >= 9 else "ampere"


@functools.cache
def sm_count() -> int:
    if interpreting() or not torch.cuda.is_available():
        return 132  # an H100/H200, so the interpreter makes the same split-K choices
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def fits(config: triton.Config, m: int, n: int, k: int, group_size: int | None = None,
         split_k: int = 1, kp: int | None = None) -> bool:
    """Whether ``config`` can run this shape at all. For the weight-only kernels (a
    ``group_size`` given) K blocks must tile each split's share of the padded K (``kp``)
    and stay inside one quantization group (the kernels scale per K block)."""
    if group_size is None:
        return True
    if split_k > 1 and config.kwargs.get("BLOCK_M", 1) > SPLIT_K_MAX_M:
        return False  # split-K runs only for M <= SPLIT_K_MAX_M (split_k below)
    bk = config.kwargs["BLOCK_K"]
    one_group = group_size >= k
    return (one_group or group_size % bk == 0) and (kp or k) % (bk * split_k) == 0


def useful(config: triton.Config, m: int, n: int, k: int) -> bool:
    """Whether the tile is no larger than needed: BLOCK_M/N/K within the padded shape
    (the smallest tiles of a list are always kept so something survives)."""
    kw = config.kwargs
    return (kw.get("BLOCK_M", 1) <= max(16, triton.next_power_of_2(m)) and kw["BLOCK_N"] <= max(32, triton.next_power_of_2(n))
            and kw["BLOCK_K"] <= max(32, triton.next_power_of_2(k)))


def prune(configs, named_args, **kwargs):
    """The shared early-config pruner: valid for the shape, then not oversized."""
    args = {**named_args, **kwargs}
    m, n, k = args["M"], args["N"], args["K"]
    g, split_k = args.get("G"), args.get("SPLIT_K", 1)
    valid = [c for c in configs if fits(c, m, n, k, g, split_k, args.get("KP"))]
    if not valid:
        raise ValueError(f"no kernel config fits M={m} N={n} K={k} G={g} split_k={split_k}")
    kept = [c for c in valid if useful(c, m, n, k)] or [min(valid, key=_tile_size)]
    return kept if autotuning() else kept[:1]


def _tile_size(c: triton.Config) -> int:
    return c.kwargs.get("BLOCK_M", 1) * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]


# Autotune keys: M is bucketed to a power of two (M_BUCKET, an argument the kernels take
# only for this), so a new batch size does not retune unless its bucket is new.
KEYS = {
    "int8_mm": ["M_BUCKET", "N", "K", "OUT_DTYPE_ID"],
    "wo_gemm": ["M_BUCKET", "N", "K", "G", "SPLIT_K", "BITS"],
    "wo_gemv": ["M_BUCKET", "N", "K", "G", "SPLIT_K", "BITS"],
}


@functools.cache
def autotuned(kernel, family: str, arch_name: str):
    """``kernel`` under ``triton.autotune`` with the family's list for ``arch_name``."""
    return triton.autotune(configs=CONFIGS[family][arch_name], key=KEYS[family],
                           prune_configs_by={"early_config_prune": prune})(kernel)


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def split_k(m: int, n: int, k: int, group_size: int, block_m: int = 16, block_n: int = 128) -> int:
    """Split-K factor for a weight-only GEMM, chosen by shape: when the output tiles alone
    leave SMs idle (small M), split K so that about two waves of programs run; each split's
    K range stays a multiple of 128 so every config's BLOCK_K tiles it."""
    if m > SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    s = 1
    while s < 16 and tiles * s * 2 <= 2 * sm_count() and k % (s * 2 * 128) == 0 and k // (s * 2) >= 512:
        s *= 2
    return s
