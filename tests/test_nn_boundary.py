"""The public modules at their boundary: any input gives the right answer or a clear error.

Hypothesis drives every quantized module (every scheme) on every backend that runs here —
the C++ kernels, the reference and, on CPU tensors, the Triton kernels in the interpreter
— with inputs of the wrong K, dtype, device or rank, non-contiguous views, and empty
batches. Each call must either equal the reference (within the kernels' error bound) or
raise a ValueError / TypeError that names the layer; never a silently wrong answer,
another exception type, or a crash.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, assert_linear_close, assert_same_rounding, reference_output
from hypothesis import given, settings
from hypothesis import strategies as st
from lowbit.formats import Scheme
from lowbit.nn import QuantLinear

SCHEMES = ["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g64-sym"]
BACKENDS = ["cpu", "reference"] + (["triton"] if TRITON_DEVICE == "cpu" else [])
IN_FEATURES, OUT_FEATURES = 64, 24

_layers: dict[tuple[str, str], QuantLinear] = {}


def layer(scheme: str, backend: str) -> QuantLinear:
    if (scheme, backend) not in _layers:
        torch.manual_seed(0)
        linear = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
        act = torch.tensor([0.04]) if Scheme.parse(scheme).static_activations else None
        _layers[scheme, backend] = QuantLinear.from_linear(linear, scheme, act_scale=act, backend=backend,
                                                           name="blocks.0.proj")
    return _layers[scheme, backend]


inputs = st.fixed_dictionaries({
    "lead": st.sampled_from([(), (0,), (1,), (3,), (2, 0), (2, 3)]),
    "k": st.sampled_from([IN_FEATURES, IN_FEATURES - 1, IN_FEATURES + 1, 1, 2 * IN_FEATURES]),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32,
                              torch.int8]),
    "device": st.sampled_from(["cpu", "meta"]),
    "strided": st.booleans(),
    "scalar": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def make_input(spec) -> torch.Tensor:
    if spec["scalar"]:
        return torch.tensor(1.5, dtype=torch.float32)
    shape = (*spec["lead"], spec["k"])
    x = torch.randn((*shape[:-1], 2 * shape[-1]), generator=torch.Generator().manual_seed(spec["seed"]))
    x = x[..., ::2] if spec["strided"] else x[..., : shape[-1]].contiguous()
    return x.to(spec["dtype"]).to(spec["device"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=30)
@given(spec=inputs)
def test_any_input_gives_the_right_answer_or_a_clear_error(scheme, backend, spec):
    q = layer(scheme, backend)
    x = make_input(spec)
    valid = (x.dim() >= 1 and x.shape[-1] == IN_FEATURES and x.device.type == "cpu"
             and x.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if not valid:
        with pytest.raises((ValueError, TypeError), match="blocks.0.proj"):
            q(x)
        return
    y = q(x)
    ref = reference_output(x, q.canonical(), q.bias)
    assert y.shape == (*x.shape[:-1], OUT_FEATURES) and y.dtype == x.dtype and y.device == x.device
    if x.numel():
        w = q.canonical().dequantize()
        if q.scheme.weight_only:
            assert_linear_close(y, ref, x, w, q.bias)
        else:  # the int8 product is exact and the epilogue rounds as the reference's does
            assert_same_rounding(y, ref, triton=backend == "triton")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_errors_name_the_layer_and_both_numbers(scheme):
    q = layer(scheme, "cpu")
    with pytest.raises(ValueError, match=r"'blocks.0.proj'.*100 features.*in_features=64"):
        q(torch.randn(2, 100))
    with pytest.raises(TypeError, match=r"'blocks.0.proj'.*torch.float64"):
        q(torch.randn(2, IN_FEATURES, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'blocks.0.proj'.*on meta.*on cpu"):
        q(torch.randn(2, IN_FEATURES, device="meta"))
    assert q(torch.randn(0, IN_FEATURES)).shape == (0, OUT_FEATURES)
