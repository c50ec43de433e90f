"""The per-M kernel plan: paths through the ops, lookup, files, dispatch, compile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from lowbit import formats, ops, plan, reference
from lowbit.formats import Scheme
from lowbit.nn import QuantLinear


@pytest.mark.parametrize("m", [1, 7, 9, 33])
def test_every_path_matches_the_reference(m):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 256, generator=g), torch.randn(72, 256, generator=g)
    q, s = formats.quantize_int8_per_channel(w)
    packed = ops.int8_prepack(q)
    ref = reference.w8a8_linear(x, q, s, None)
    for name in plan.runnable_paths("int8"):
        assert torch.equal(ops.w8a8_linear_prepacked(x, packed, s, x.shape[-1], None, None, plan.path_id("int8", name)), ref), name
    p4, s4, z4 = formats.quantize_int4_groupwise(w, 64, False)
    wp, params = ops.w4a16_prepack(p4, s4, z4, 64)
    ref4 = reference.w4a16_linear(x, p4, s4, z4, 64, None)
    wp8 = ops.w8a16_prepack(q)
    ref8 = reference.w8a16_linear(x, q, s, None)
    for name in plan.runnable_paths("weight_only"):
        if name in ("amx", "bf16", "gemv_vnni", "gemv_int_avx2"):
            continue  # bf16 activations only: below
        path = plan.path_id("weight_only", name)
        assert torch.allclose(ops.w4a16_linear_prepacked(x, wp, params, 64, 72, None, path), ref4, atol=1e-4), name
        assert torch.allclose(ops.w8a16_linear_prepacked(x, wp8, s, None, path), ref8, atol=1e-4), name
    xb = x.to(torch.bfloat16)
    for name in {"amx", "bf16", "gemv_vnni", "gemv_int_avx2"} & set(plan.runnable_paths("weight_only")):
        out = ops.w4a16_linear_prepacked(xb, wp, params, 64, 72, None, plan.path_id("weight_only", name))
        assert torch.allclose(out.float(), reference.w4a16_linear(xb, p4, s4, z4, 64, None).float(), rtol=2**-7,
                              atol=0.05), name
        if name == "gemv_int_avx2":
            continue  # int4 weights only
        out8 = ops.w8a16_linear_prepacked(xb, wp8, s, None, plan.path_id("weight_only", name))
        assert torch.allclose(out8.float(), reference.w8a16_linear(xb, q, s, None).float(), rtol=2**-7,
                              atol=0.05), name


def test_bad_paths_are_refused_by_name():
    x = torch.randn(2, 64)
    q, s = formats.quantize_int8_per_channel(torch.randn(64, 64))
    with pytest.raises(ValueError, match="path 9 is not a int8 kernel path"):
        ops.w8a8_linear_prepacked(x, ops.int8_prepack(q), s, x.shape[-1], None, None, 9)
    # An int8 path's id is not a weight-only path: the families never share an id.
    int8_avx2 = plan.path_id("int8", "avx2")
    assert int8_avx2 not in plan.paths_for("weight_only").values()
    with pytest.raises(ValueError, match=f"path {int8_avx2} is not a weight_only kernel path"):
        ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(q), s, None, int8_avx2)
    for p in plan.KERNEL_PATHS:
        if not p.runnable:
            with pytest.raises(ValueError, match="this CPU cannot run it"):
                ops.w8a16_linear_prepacked(x, ops.w8a16_prepack(q), s, None, p.id) if p.family == "weight_only" \
                    else ops.w8a8_linear_prepacked(x, ops.int8_prepack(q), s, 64, None, None, p.id)
    with pytest.raises(ValueError, match="unknown weight_only kernel path"):
        plan.path_id("weight_only", "avx2")


def test_the_path_table_is_the_extensions():
    names = {(p.family, p.name) for p in plan.KERNEL_PATHS}
    assert ("int8", "avx512_vnni") in names and ("weight_only", "gemv_vnni") in names
    assert len({p.id for p in plan.KERNEL_PATHS}) == len(plan.KERNEL_PATHS)  # ids unique across families
    assert set(plan.runnable_paths("int8")) >= {"scalar"}


def test_dispatch_takes_the_bucket_at_or_above_m():
    # The "amx" path refuses fp32 activations, which shows exactly where dispatch takes it.
    if "amx" not in plan.runnable_paths("weight_only"):
        pytest.skip("this CPU has no AMX")
    p = plan.Plan()
    p.entries[plan.key("w8a16", "cpu", 64, 128)] = {b: ("amx" if 16 < b <= 64 else "gemm") for b in plan.BUCKETS}
    with plan.use_plan(p):
        layer = QuantLinear.from_linear(torch.nn.Linear(128, 64), "w8a16")
    gemm, amx = plan.path_id("weight_only", "gemm"), plan.path_id("weight_only", "amx")
    assert layer.packed.paths == ((16, gemm), (64, amx), (2048, gemm))
    for m in (1, 16, 65, 5000):
        layer(torch.randn(m, 128))
    for m in (17, 64):
        with pytest.raises(TypeError, match="bf16 activations"):
            layer(torch.randn(m, 128))
    assert layer(torch.randn(2, 8, 128)).shape == (2, 8, 64)  # M counts every row of a 3-D input:
    with pytest.raises(TypeError, match="bf16 activations"):  # 2 x 8 = 16 rows, then 2 x 9 = 18
        layer(torch.randn(2, 9, 128))


# The GEMV and GEMM paths of the widest vectors this CPU has (AVX-512, else AVX2).
GEMV, GEMM = ("gemv", "gemm") if "gemv" in plan.runnable_paths("weight_only") else ("gemv_avx2", "gemm_avx2")


def _plan(path_small=GEMV, path_large=GEMM):
    p = plan.Plan()
    p.entries[plan.key("w4a16-g64", "cpu", 96, 128)] = {b: (path_small if b <= 16 else path_large)
                                                         for b in plan.BUCKETS}
    return p


def test_layers_dispatch_through_the_plan_and_compile():
    linear = torch.nn.Linear(128, 96)
    with plan.use_plan(_plan()):
        layer = QuantLinear.from_linear(linear, "w4a16-g64")
    assert layer.packed.paths == ((16, plan.path_id("weight_only", GEMV)), (2048, plan.path_id("weight_only", GEMM)))
    with plan.use_plan(None):
        plain = QuantLinear.from_linear(linear, "w4a16-g64")
    assert plain.packed.paths is None
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 16, 17, 300):
        x = torch.randn(m, 128)
        assert torch.allclose(layer(x), plain(x), atol=1e-4)
        assert torch.allclose(compiled(x), plain(x), atol=1e-4)


def test_an_all_auto_entry_dispatches_nothing():
    p = plan.Plan()
    p.entries[plan.key("w8a8", "cpu", 96, 128)] = {b: "auto" for b in plan.BUCKETS}
    p.entries[plan.key("w8a8", "cpu", 64, 128)] = {b: ("auto" if b < 16 else "scalar") for b in plan.BUCKETS}
    assert p.paths(Scheme("w8a8"), "cpu", 96, 128) is None
    assert p.paths(Scheme("w8a8"), "cpu", 64, 128) == ((8, -1), (2048, plan.path_id("int8", "scalar")))


def test_plan_files_round_trip_and_bad_files_fail(tmp_path):
    p = _plan()
    path = p.save(tmp_path / "plan.json")
    q = plan.Plan.load(path)
    assert q.entries == p.entries
    bad = json.loads(path.read_text())
    bad["entries"][next(iter(bad["entries"]))]["1"] = "warp"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown paths"):
        plan.Plan.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not a usable lowbit plan"):
        plan.Plan.load(tmp_path / "junk.json")


def test_the_cached_plan_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_PLAN", str(tmp_path / "p.json"))
    _plan().save()
    with plan.use_plan(None):
        plan._active.clear()  # forget what was loaded: the next lookup reads the file
        assert plan.active_plan() is not None
        layer = QuantLinear.from_linear(torch.nn.Linear(128, 96), "w4a16-g64")
    assert layer.packed.paths is not None


def _every_int8_path(tmp_path, n, k):
    """A plan as a machine that runs every int8 path might have tuned it: bucket i takes
    the i-th path of the table (cyclically), saved to and loaded from a file."""
    names = [p.name for p in plan.KERNEL_PATHS if p.family == "int8"]
    p = plan.Plan()
    p.entries[plan.key("w8a8", "cpu", n, k)] = {b: names[i % len(names)] for i, b in enumerate(plan.BUCKETS)}
    return plan.Plan.load(p.save(tmp_path / "tuned-elsewhere.json")), names


def _check_dispatch(tmp_path, n=48, k=128):
    tuned, names = _every_int8_path(tmp_path, n, k)
    unrunnable = [name for name in names if name not in plan.runnable_paths("int8")]
    linear = torch.nn.Linear(k, n)
    with plan.use_plan(tuned):
        if unrunnable:
            with pytest.warns(RuntimeWarning, match="tuned-elsewhere.json") as caught:
                layer = QuantLinear.from_linear(linear, "w8a8")
            message = str(caught[0].message)
            assert all(f"'{name}'" in message for name in unrunnable)
            assert not any(f"'{name}'" in message.split("(")[0] for name in plan.runnable_paths("int8"))
        else:
            layer = QuantLinear.from_linear(linear, "w8a8")
    ids = dict(layer.packed.paths)
    entry = tuned.entries[plan.key("w8a8", "cpu", n, k)]
    for b, name in entry.items():
        bound = min(bound for bound in ids if bound >= b)
        assert ids[bound] == (plan.AUTO_ID if name in unrunnable else plan.path_id("int8", name)), (b, name)
    with plan.use_plan(None):
        plain = QuantLinear.from_linear(linear, "w8a8")
    for m in (1, 2, 3, 4, 8, 16, 40):
        x = torch.randn(m, k)
        assert torch.equal(layer(x), plain(x)), m  # int8 paths are exact: same bits on every path
    return unrunnable


def test_a_plan_from_another_machine_runs_here(tmp_path):
    # On this CPU: whatever the table says it cannot run is dropped, the rest is kept.
    _check_dispatch(tmp_path)


def test_a_plan_from_another_machine_on_a_smaller_cpu(tmp_path, monkeypatch):
    # Every CPU class: this CPU made to look as if it lacked its two best int8 paths.
    runnable = plan.runnable_paths("int8")
    hidden = set(runnable[-2:]) - {"scalar"}
    monkeypatch.setattr(plan, "KERNEL_PATHS", tuple(
        dataclasses.replace(p, unavailable="hidden by the test") if p.family == "int8" and p.name in hidden else p
        for p in plan.KERNEL_PATHS))
    assert set(_check_dispatch(tmp_path)) >= hidden
