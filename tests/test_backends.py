"""The backend registry: availability report, choice, the disable switch, and apply."""

from __future__ import annotations

import dataclasses
import os

import lowbit
import pytest
import torch
from conftest import TRITON_DEVICE, activation, assert_linear_close, reference_output, weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit.backends import DISABLE_ENV, choose_backend, get_backend
from lowbit.formats import Scheme, quantize_weight

SCHEMES = ["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g128-sym", "w4a16-gK"]


def test_the_cpu_class_is_the_one_expected():
    # make test-avx2 runs under an emulated AVX2-only CPU and says so here: lowbit and torch
    # must both see that class, or the run tests the wrong kernels.
    expected = os.environ.get("LOWBIT_EXPECT_ISA")
    if not expected:
        pytest.skip("LOWBIT_EXPECT_ISA not set (make test-avx2 sets it)")
    assert lowbit.best_cpu_isa() == expected
    assert torch.backends.cpu.get_cpu_capability() == expected.upper()
    import onnxruntime  # noqa: F401  (imports under the same emulation)


def test_report_lists_every_backend_with_a_reason():
    report = lowbit.list_backends()
    names = [s.name for s in report]
    assert names == ["cuda", "cpu", "triton", "reference"]
    assert all(s.reason for s in report)
    assert {s.name: s.available for s in report}["reference"] is True
    assert {s.name: s.available for s in report}["cpu"] is True
    assert {s.name: s.available for s in report}["cuda"] == torch.cuda.is_available()
    text = str(report)
    assert "backend" in text.splitlines()[0] and all(n in text for n in names)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cpu_tensors_get_the_native_cpu_backend(scheme):
    assert choose_backend(Scheme.parse(scheme), "cpu").name == "cpu"


def test_disable_variable_moves_the_choice_down_the_list(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "cpu")
    assert choose_backend(Scheme.parse("w8a8"), "cpu").name == "reference"
    assert "disabled" in {s.name: s.reason for s in lowbit.list_backends()}["cpu"]


def test_no_fitting_backend_lists_every_reason(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "cpu,reference")
    with pytest.raises(RuntimeError) as info:
        choose_backend(Scheme.parse("w4a16"), "cpu")
    message = str(info.value)
    assert "w4a16-g128" in message
    for name in ("cuda", "cpu", "reference"):
        assert f"  {name}:" in message


def test_prefer_names_one_backend_and_is_checked():
    assert choose_backend(Scheme.parse("w8a16"), "cpu", prefer="reference").name == "reference"
    with pytest.raises(RuntimeError, match="cuda"):
        choose_backend(Scheme.parse("w8a16"), "cpu", prefer="cuda")
    with pytest.raises(KeyError, match="known"):
        get_backend("tpu")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_apply_matches_the_reference_linear(backend, scheme):
    s = Scheme.parse(scheme)
    w = weight(24, 256, seed=5)
    x, bias = activation((3, 256), seed=6), torch.randn(24)
    act = (x.abs().amax() / 127).reshape(1) if s.static_activations else None
    qw = quantize_weight(w, s, act_scale=act)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    on_device = dataclasses.replace(qw, **{k: v.to(device) for k, v in qw.tensors().items()})
    y = get_backend(backend).apply(x.to(device), get_backend(backend).prepack(on_device), bias.to(device)).cpu()
    ref = reference_output(x, qw, bias)
    if not s.weight_only:  # integer GEMM and the reference's epilogue: bit-exact
        assert torch.equal(y, ref)
    else:  # fp32 sums in another order: within the summation bound
        assert_linear_close(y, ref, x, qw.dequantize(), bias)
    # and the quantized layer approximates the float one
    exact = x @ w.t() + bias
    assert (y - exact).norm() / exact.norm() < (0.2 if s.is_int4 else 0.05)


def test_cli_lists_the_backends(capsys):
    from lowbit.cli import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("backend") and "reference" in out


def test_the_triton_kernel_folder_is_installed_as_lowbit_kernels():
    import lowbit.kernels

    assert lowbit.kernels.__name__ == "lowbit.kernels"


# --- the one copy: every backend's unpack is the exact inverse of its prepack ---------------------


def _cuda_layout_round_trip(qw):
    """The CUDA backend's W4A16 layout, built and taken apart on the CPU (no GPU needed)."""
    codes, scales, zeros = lowbit.ops.w4a16_cuda_prepack(qw.qweight, qw.scales, qw.zeros, qw.group_size)
    return lowbit.ops.w4a16_cuda_unpack(codes, scales, zeros, qw.group_size, qw.out_features, qw.in_features)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@given(scheme=st.sampled_from(["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g64-sym", "w4a16-g128",
                               "w4a16-gK", "w4a16-gK-sym"]),
       n=st.sampled_from([1, 5, 63, 64, 65, 130]), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_unpack_is_the_exact_inverse_of_prepack(backend, scheme, n, groups, seed):
    s = Scheme.parse(scheme)
    k = groups * (s.group_size or 2 * (seed % 40 + 1)) if s.is_int4 else 1 + seed % 300
    w = weight(n, k, seed=seed)
    act = torch.tensor([0.03]) if s.static_activations else None
    qw = quantize_weight(w, s, act_scale=act, input_scale=torch.rand(k) + 0.5 if seed % 2 else None)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    b = get_backend(backend)
    back = b.unpack(b.prepack(qw.to(device))).to("cpu")
    for name, t in qw.tensors().items():
        assert torch.equal(getattr(back, name), t), name
    assert (back.zeros is None) == (qw.zeros is None)
    assert (back.scheme, back.group_size, back.out_features, back.in_features) == \
        (qw.scheme, qw.group_size, qw.out_features, qw.in_features)
    if s.is_int4:  # and the CUDA backend's layout, whose prepack and unpack run on the CPU
        packed, scales, zeros = _cuda_layout_round_trip(qw)
        assert torch.equal(packed, qw.qweight) and torch.equal(scales, qw.scales)
        assert torch.equal(zeros, qw.zeros) if qw.zeros is not None else bool((zeros == 8).all())


def test_unpack_ops_refuse_layouts_of_another_shape():
    q, _ = lowbit.formats.quantize_int8_per_channel(weight(70, 100))
    with pytest.raises(ValueError, match="int8_prepack"):
        lowbit.ops.int8_unpack(lowbit.ops.int8_prepack(q), 130, 100)
    with pytest.raises(ValueError, match="w8a16_prepack"):
        lowbit.ops.w8a16_unpack(lowbit.ops.w8a16_prepack(q), 130)
    packed, scales, zeros = lowbit.formats.quantize_int4_groupwise(weight(70, 128), 64, False)
    w, params = lowbit.ops.w4a16_prepack(packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="params"):
        lowbit.ops.w4a16_unpack(w, params, 32, 70)
    codes, s_t, z_t = lowbit.ops.w4a16_cuda_prepack(packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="w4a16_cuda_prepack"):
        lowbit.ops.w4a16_cuda_unpack(codes, s_t, z_t, 64, 70, 256)


# --- the chooser and the GPU: compute capability, the targets in the binary, shapes -------------

needs_cuda_build = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("lowbit::w8a8_linear", "CUDA"),
    reason="this build has no CUDA kernels (no nvcc)")


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a faked GPU")


@needs_cuda_build
@pytest.mark.parametrize("capability, how", [((7, 5), None), ((8, 0), "sm_80"), ((8, 6), "sm_80"), ((8, 9), "sm_80"),
                                             ((9, 0), "sm_90a"), ((10, 0), "compute_90"), ((12, 0), "compute_90")])
def test_the_cuda_backend_runs_where_the_binary_has_code_for_the_gpu(monkeypatch, capability, how):
    from lowbit.backends.cuda import cuda_targets

    assert cuda_targets() == ["sm_80", "sm_90a", "compute_90"]  # the default build: PTX of the newest target too
    fake_gpu(monkeypatch, capability)
    ok, why = get_backend("cuda").can_implement(Scheme.parse("w4a16-g128"), torch.device("cuda"), (4096, 4096))
    status = {s.name: s for s in lowbit.list_backends()}["cuda"]
    assert ok == (how is not None) == status.available
    if how is None:
        assert "compute capability 8.0" in why and "sm_75" in why and "sm_75" in status.reason
        choice = lowbit.backends.choose(Scheme.parse("w4a16-g128"), "cuda", shape=(4096, 4096))
        assert choice.backend.name == "reference"  # Triton refuses it too, saying why
        assert any(r.startswith("cuda:") for r in choice.refusals) and any(r.startswith("triton:") for r in choice.refusals)
    else:
        assert how in status.reason


def test_the_binary_targets_decide_which_gpus_run(monkeypatch):
    from lowbit.backends.cuda import runs_on_capability

    ampere_only = ["sm_80", "sm_86"]
    assert runs_on_capability((8, 9), ampere_only)[0]  # same major, newer minor: the sm_86 code runs
    ok, why = runs_on_capability((9, 0), ampere_only)
    assert not ok and "TORCH_CUDA_ARCH_LIST=9.0" in why
    assert not runs_on_capability((10, 0), ["sm_90a", "compute_90a"])[0]  # arch-specific code and PTX: sm_90 only
    assert runs_on_capability((10, 0), ["compute_86"])[0]


@needs_cuda_build
def test_an_int8_layer_beyond_the_k_limit_falls_to_the_next_backend(monkeypatch):
    from lowbit.backends.cuda import INT8_MAX_K

    fake_gpu(monkeypatch, (9, 0))
    choice = lowbit.backends.choose(Scheme.parse("w8a8"), "cuda", shape=(8, INT8_MAX_K + 64))
    assert choice.backend.name == "reference" and any("K <= 131072" in r for r in choice.refusals)
    assert lowbit.backends.choose(Scheme.parse("w8a8"), "cuda", shape=(8, 4096)).backend.name == "cuda"


def test_a_cpu_int8_layer_beyond_its_k_limit_is_reported_on_the_reference():
    model = torch.nn.Sequential(torch.nn.Linear(70000, 2))
    report = lowbit.quantize(model, "w8a8", min_numel=1, progress=False)
    row = report.quantized[0]
    assert row.backend == "reference" and "not cpu: the int8 GEMM takes K <= 65536, got K = 70000" in row.reason
    x = torch.randn(1, 70000)
    assert torch.equal(model(x), reference_output(x, model[0].canonical(), model[0].bias))


def _cuda_archs():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "cmake" / "cuda_archs.py"
    spec = importlib.util.spec_from_file_location("cuda_archs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, targets", [
    ("", ["sm_80", "sm_90a", "compute_90"]),
    ("8.0;9.0a", ["sm_80", "sm_90a", "compute_90"]),
    ("8.6+PTX", ["sm_86", "compute_86"]),
    ("8.0 8.6", ["sm_80", "sm_86", "compute_86"]),
    ("8.0,8.9", ["sm_80", "sm_89", "compute_89"]),
    ("Ampere", ["sm_80", "sm_86", "compute_86"]),
    ("Turing;Hopper", ["sm_90", "compute_90"]),
    ("9.0a;10.0a", ["sm_90a", "sm_100a", "compute_100"]),
    ("12.0", ["sm_120", "compute_120"]),
])
def test_every_form_of_the_arch_list_torch_accepts(text, targets):
    flags, got, _ = _cuda_archs().parse(text)
    assert got == targets
    assert all(f.startswith("-gencode=arch=compute_") and ",code=" in f for f in flags)
    assert "-gencode=arch=compute_86,code=compute_86" in flags if "compute_86" in targets else True


@pytest.mark.parametrize("text, message", [("7.5", "8.0 or newer"), ("banana", "not X.Y"), ("8.0;sm_90", "not X.Y")])
def test_arch_lists_lowbit_cannot_build_are_refused(text, message):
    archs = _cuda_archs()
    with pytest.raises(archs.ArchError, match=message):
        archs.parse(text)
