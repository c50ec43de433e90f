"""The backend registry: availability report, choice, the disable switch, and apply."""

from __future__ import annotations

import dataclasses

import lowbit
import pytest
import torch
from conftest import TRITON_DEVICE, activation, assert_linear_close, reference_output, weight
from hypothesis import given
from hypothesis import strategies as st
from lowbit.backends import DISABLE_ENV, choose_backend, get_backend
from lowbit.formats import Scheme, quantize_weight

SCHEMES = ["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g128-sym", "w4a16-gK"]


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
