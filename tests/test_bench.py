"""``lowbit.bench``: shapes, the runner on a tiny shape, tuning, outputs."""

from __future__ import annotations

import json
import math

import lowbit
import pytest
import torch
from lowbit import bench, plan

ISAS = ("scalar", "avx2", "avx512_vnni", "amx")
# The instructions each CPU path's ceilings are measured with (csrc/cpu/peak.cpp).
PROBES = {"scalar": ("pmaddwd xmm", "mulps+addps xmm"),
          "avx2": ("vpmaddubsw+vpmaddwd ymm", "vfmadd231ps ymm"),
          "avx512_vnni": ("vpdpbusd zmm", "vfmadd231ps zmm"),
          "amx": ("vpdpbusd zmm", "vfmadd231ps zmm")}


def test_shape_sets_csv_and_inline(tmp_path):
    assert bench.parse_shapes("llama3-8b")[1] == (4096, 14336)
    f = tmp_path / "s.csv"
    f.write_text("k,n\n256,512\n512,256\n")
    assert bench.parse_shapes(str(f)) == [(256, 512), (512, 256)]
    assert bench.parse_shapes("64x32,128x64") == [(64, 32), (128, 64)]
    with pytest.raises(ValueError, match="not a set"):
        bench.parse_shapes("gpt-9")
    (tmp_path / "bad.csv").write_text("k,n\n12\n")
    with pytest.raises(ValueError, match="expected rows"):
        bench.parse_shapes(str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def result():
    return bench.run(["w8a8", "w4a16-g64"], [(128, 192)], [1, 16], paths=["all"], progress=False)


def test_run_times_every_backend_and_baseline(result):
    impls = {(r.scheme, r.impl) for r in result.rows}
    for scheme, name in [("w8a8", "lowbit:cpu"), ("w8a8", "lowbit:reference"), ("w8a8", "torch:fbgemm"),
                         ("w8a8", "torch:bf16"), ("w4a16-g64", "torch:int4pack"), ("w4a16-g64", "torch:fp32")]:
        assert (scheme, name) in impls
    for p in plan.runnable_paths("int8"):
        if p != "scalar":
            assert ("w8a8", f"lowbit:cpu[{p}]") in impls
    assert all(r.seconds > 0 and r.tflops > 0 and r.m in (1, 16) for r in result.rows)
    # The memory ceiling: a read of the packed weights' bytes, beside the small-M rows only.
    reads = [r for r in result.rows if r.impl == bench.READ]
    assert {(r.scheme, r.m) for r in reads} == {(s, m) for s in ("w8a8", "w4a16-g64") for m in (1, 16)}
    assert all(r.weight_bytes == next(o.weight_bytes for o in result.rows if o.scheme == r.scheme) for r in reads)
    wide = bench.run(["w8a16"], [(128, 192)], [bench.READ_MAX_M + 1], impls=["cpu"], rounds=1, progress=False)
    assert {r.impl for r in wide.rows} == {"lowbit:cpu", bench.BASELINE}


def test_outputs_table_json_plot_crossover(result, tmp_path):
    text = result.table()
    assert "w4a16-g64  K=128 N=192" in text and "beats bf16 at M" in text
    # One speedup column per torch baseline of the scheme; each baseline is 1.00x against itself.
    for scheme, quant in (("w8a8", "fbgemm"), ("w4a16-g64", "int4pack")):
        section = text.split(f"{scheme}  K=128")[1].split("\n\n")[0]
        header = next(line for line in section.splitlines() if line.lstrip().startswith("M "))
        assert header.split()[3:9] == ["vs", "bf16", "vs", "fp32", "vs", quant]
        row = next(line for line in section.splitlines() if f"torch:{quant} " in line)
        assert row.split()[5] == "1.00x"
    result.write_json(tmp_path / "r.json")
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["rows"] and payload["crossover"] and "int8_ops" in payload["ceilings"]
    result.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    cross = result.crossover()
    base = {(r.scheme, r.m): r.seconds for r in result.rows if r.impl == bench.BASELINE}
    for (scheme, _, _, impl), ms in cross.items():
        for r in result.rows:
            if r.scheme == scheme and r.impl == impl:
                assert (r.m in ms) == (r.seconds < base[(scheme, r.m)])


@pytest.mark.parametrize("isa", ISAS)
def test_ceilings_are_measured_on_every_cpu_path(isa):
    if ISAS.index(isa) > ISAS.index(lowbit.best_cpu_isa()):
        pytest.skip(f"this CPU has no {isa} path")
    with lowbit.use_cpu_isa(isa):
        (int8, int8_name), (fma, fma_name) = lowbit._C.cpu_peak("int8", 0.02), lowbit._C.cpu_peak("fma", 0.02)
    assert math.isfinite(int8) and int8 > 1e8 and math.isfinite(fma) and fma > 1e8
    int8_expected, fma_expected = PROBES[isa]
    if isa == "avx2" and "avx_vnni" in open("/proc/cpuinfo").read():
        int8_expected = "vpdpbusd ymm (AVX-VNNI)"
    assert (int8_name, fma_name) == (int8_expected, fma_expected)
    with pytest.raises(ValueError, match="'int8' or 'fma'"):
        lowbit._C.cpu_peak("vnni")


def test_no_column_is_nan(result):
    assert "nan" not in result.table()
    payload = result.to_json()
    numbers = [v for v in payload["ceilings"].values() if isinstance(v, float)]
    numbers += [v for b in payload["bounds"] for v in b.values() if isinstance(v, float)]
    numbers += [v for r in payload["rows"] for v in r.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)


def test_bounds_are_the_baseline_over_the_larger_floor(result):
    bounds = result.bounds()
    if result.meta["isa"] == "amx":  # the vector probe does not measure AMX's tile rate
        assert bounds == []
        return
    rows = {(r.scheme, r.m, r.impl): r.seconds for r in result.rows}
    lowbit_w8a8 = {(r.m, r.impl) for r in result.rows if r.scheme == "w8a8" and r.impl.startswith("lowbit:")}
    assert {(b.m, b.impl) for b in bounds} == lowbit_w8a8  # W8A8 only: weight-only has no fbgemm
    for b in bounds:
        base = rows["w8a8", b.m, bench.INT8_BASELINE]
        compute = 2 * b.m * b.n * b.k / result.ceilings.int8_ops
        assert b.measured == pytest.approx(base / rows["w8a8", b.m, b.impl])
        assert b.read == pytest.approx(base / rows["w8a8", b.m, bench.READ])
        assert b.compute == pytest.approx(base / compute)
        assert b.bound == pytest.approx(min(b.read, b.compute))
    assert "bounds: speedup over torch:fbgemm" in result.table()
    assert len(result.to_json()["bounds"]) == len(bounds)


def test_tune_picks_the_fastest_measured_path():
    p = bench.tune(["w4a16-g64"], [(128, 192)], [1, 32], progress=False)
    entry = p.entries[plan.key("w4a16-g64", "cpu", 192, 128)]
    timings = p.timings[plan.key("w4a16-g64", "cpu", 192, 128)]
    for m in (1, 32):
        best = min(timings[m].values())
        assert timings[m][entry[m]] <= 1.03 * best
    with pytest.raises(ValueError, match="buckets"):
        bench.tune(["w8a8"], [(128, 192)], [3], progress=False)


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown kernel paths"):
        bench.run(["w8a8"], [(128, 64)], [1], paths=["gemv"], progress=False)
    with pytest.raises(ValueError, match="cannot parse scheme"):
        bench.run(["w3a3"], [(128, 64)], [1], progress=False)
    with pytest.raises(ValueError, match="group size"):
        bench.run(["w4a16-g128"], [(192, 64)], [1], progress=False)
    torch.manual_seed(0)


def test_another_cpu_class_is_measured_by_forcing_lowbits_path(capsys):
    if ISAS.index(lowbit.best_cpu_isa()) < ISAS.index("avx2"):
        pytest.skip("this CPU has no avx2 path")
    from lowbit import cli

    assert cli.main(["bench", "--schemes", "w4a16-g64", "--shapes", "128x64", "--m", "1,8", "--impls", "cpu,int4pack",
                     "--rounds", "1", "--isa", "avx2"]) == 0
    out = capsys.readouterr().out
    assert "lowbit ran avx2" in out and "torch's kernels" in out
    assert "int8 vpmaddubsw+vpmaddwd ymm" in out or "int8 vpdpbusd ymm (AVX-VNNI)" in out
    assert lowbit.cpu_isa() == lowbit.best_cpu_isa()  # restored
