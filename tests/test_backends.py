"""The backend registry: availability report, choice, the disable switch, and apply."""

from __future__ import annotations

import dataclasses

import lowbit
import pytest
import torch
from conftest import TRITON_DEVICE, activation, assert_linear_close, reference_output, weight
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
