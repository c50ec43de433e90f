"""Integer codes packed into int32 words, as the GPTQ, AWQ and compressed-tensors formats
store them (docs/interop.md).

Every format packs ``32 / bits`` unsigned codes into a little-endian int32 word, the first
code in the lowest bits, along one dimension of a 2-D tensor. For 4-bit codes that is
exactly lowbit's canonical byte layout (the even element in the low nibble) read four
bytes at a time, so packing goes through bytes: ``pack_int4`` / byte views, never a loop
over bit positions. AWQ additionally permutes the eight codes inside each word.
"""

from __future__ import annotations

import torch

from lowbit import reference

# AWQ's GEMM layout: nibble i of a word holds column 8c + AWQ_ORDER[i] of the word's eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit codes are packed here, got {bits}")
    return 32 // bits


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``codes[R, C]`` (values below ``2**bits``) -> int32 ``[R, ceil(C / (32/bits))]``,
    packed along the rows, code c at bit ``(c % per_word) * bits`` of word ``c // per_word``
    (a ragged last word is padded with zero codes)."""
    per = _per_word(bits)
    rows, cols = codes.shape
    pad = -cols % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(rows, pad)], dim=1)
    data = reference.pack_int4(codes) if bits == 4 else codes.contiguous()
    # Through 1-D: a [1, C] tensor may count as contiguous with any row stride.
    return data.reshape(-1).view(torch.int32).reshape(rows, -1)


def unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_rows``: int32 ``[R, W]`` -> uint8 codes ``[R, cols]``."""
    per = _per_word(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"packed codes must be a 2-D int32 tensor, got {words.dtype}{list(words.shape)}")
    if words.shape[1] * per < cols or words.shape[1] * per - cols >= per:
        raise ValueError(f"{words.shape[1]} int32 words per row do not hold {cols} {bits}-bit codes")
    data = words.contiguous().reshape(-1).view(torch.uint8).reshape(words.shape[0], -1)
    codes = reference.unpack_int4(data) if bits == 4 else data
    return codes[:, :cols].contiguous()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``codes[R, C]`` -> int32 ``[ceil(R / (32/bits)), C]``, packed down the columns."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The inverse of ``pack_cols``: int32 ``[W, C]`` -> uint8 codes ``[rows, C]``."""
    return unpack_rows(words.t(), bits, rows).t().contiguous()


def awq_interleave(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``codes[R, C]`` (C % 8 == 0) reordered so that ``pack_rows(.., 4)`` writes AWQ's
    GEMM word layout: position 8c + i takes column 8c + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    return codes.reshape(rows, cols // 8, 8).index_select(2, order).reshape(rows, cols)


def awq_deinterleave(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of ``awq_interleave``."""
    rows, cols = codes.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=codes.device))
    return codes.reshape(rows, cols // 8, 8).index_select(2, inverse).reshape(rows, cols)
