"""Single-rounding fp32 multiply and add for exact epilogues.

An epilogue that must equal the reference bit for bit (``acc * a_scale * b_scale + bias``,
two roundings for the last multiply and add) must not be contracted into one fused
multiply-add, which Triton's compiler does by default. A multiply or add with an explicit
rounding mode (PTX ``mul.rn.f32`` / ``add.rn.f32``) is never contracted, so these helpers
emit exactly those; ``python -m lowbit.kernels.aot`` checks the PTX of every exact kernel for
``fma``. In Triton's interpreter (CPU tensors, numpy) each operation already rounds once,
and inline assembly does not run, so there they are the plain operators.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels import interpreting

INTERPRETED: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def mul_rn(a, b):
    if INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def add_rn(a, b):
    if INTERPRETED:
        return a + b
    else:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
