"""Every Triton kernel and autotune config compiles for sm_80 and sm_90 without spills.

Runs ``python -m lowbit.kernels.aot`` in a subprocess: the compiler needs the kernels as
real ``@triton.jit`` functions, and this test process defines them in interpreter mode
(conftest sets TRITON_INTERPRET=1 when there is no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_every_kernel_and_config_compiles_for_ampere_and_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lowbit.kernels.aot"], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = lines[-1]
    assert summary.endswith("0 with problems"), summary
    compiled = int(summary.split()[0])
    rows = [line for line in lines if line.strip().startswith(("80 ", "90 "))]
    assert len(rows) == compiled > 100
    # the GEMMs got tensor-core instructions on both targets
    gemms = [line for line in rows if "int8_mm" in line or "wo_gemm" in line]
    assert gemms and all(" yes " in line for line in gemms)
    assert {line.split()[0] for line in gemms} == {"80", "90"}


DEMO = '''
import triton
import triton.language as tl
from lowbit.kernels.rounding import add_rn, mul_rn


@triton.jit
def contracted(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a, b, c = tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)
    tl.store(out_ptr + i, a * b + c)  # the compiler makes this one fma: one rounding, not two


@triton.jit
def rounded(a_ptr, b_ptr, c_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a, b, c = tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)
    tl.store(out_ptr + i, add_rn(mul_rn(a, b), c))
'''

CHECK = '''
import sys
sys.path.insert(0, sys.argv[1])
from lowbit.kernels import aot
pointers = (("a_ptr", "*fp32"), ("b_ptr", "*fp32"), ("c_ptr", "*fp32"), ("out_ptr", "*fp32"))
for name in ("contracted", "rounded"):
    r = aot.compile_spec(aot.Spec(name, "aot_demo." + name, 80, pointers, (("BLOCK", 256),), exact=True))
    print(name, r.fmas, repr(r.problem()))
'''


def test_the_aot_check_catches_a_contracted_multiply_add_in_an_exact_kernel(tmp_path):
    (tmp_path / "aot_demo.py").write_text(DEMO)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "contracted fp32 multiply-adds" in got["contracted"] and not got["contracted"].startswith("contracted 0")
    assert got["rounded"].endswith("''"), got["rounded"]
