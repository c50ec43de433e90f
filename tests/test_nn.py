"""The quantized Linear modules: parity, repr, device/dtype moves, state_dict, to_linear."""

from __future__ import annotations

import lowbit
import pytest
import torch
from conftest import activation, assert_linear_close, reference_output
from lowbit.formats import Scheme
from lowbit.nn import QuantLinear, W4A16Linear, W8A8Linear, W8A8StaticLinear, W8A16Linear
from torch import nn

CASES = [(W8A8Linear, "w8a8"), (W8A16Linear, "w8a16"), (W4A16Linear, "w4a16-g64"),
         (W4A16Linear, "w4a16-g128-sym"), (W8A8StaticLinear, "w8a8-static")]


def make(cls, scheme, seed=0, n=48, k=256, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias).to(dtype)
    act = torch.tensor([0.05]) if Scheme.parse(scheme).static_activations else None
    return linear, cls.from_linear(linear, scheme, act_scale=act)


def reference_forward(q, x):
    return reference_output(x, q.canonical(), q.bias)


@pytest.mark.parametrize("cls, scheme", CASES)
@pytest.mark.parametrize("seed", range(3))
def test_forward_matches_the_reference_on_random_layers(cls, scheme, seed):
    _, q = make(cls, scheme, seed, n=17 + 8 * seed, bias=seed != 1)
    for shape in [(1, 256), (5, 256), (2, 3, 256)]:
        x = activation(shape, seed=seed)
        if not q.scheme.weight_only:
            assert torch.equal(q(x), reference_forward(q, x))
        else:
            assert_linear_close(q(x), reference_forward(q, x), x, q.canonical().dequantize(), q.bias)


@pytest.mark.parametrize("cls, scheme", CASES)
def test_repr_shows_scheme_and_backend(cls, scheme):
    _, q = make(cls, scheme)
    text = repr(q)
    assert type(q).__name__ in text and f"scheme={lowbit.Scheme.parse(scheme)}" in text
    assert "backend=cpu" in text and "in_features=256" in text


def test_from_linear_on_the_base_class_picks_the_subclass_and_checks_it():
    linear = nn.Linear(128, 32)
    assert type(lowbit.QuantLinear.from_linear(linear, "w4a16-g32")) is W4A16Linear
    with pytest.raises(ValueError, match="W4A16Linear"):
        W8A8Linear.from_linear(linear, "w4a16")


@pytest.mark.parametrize("cls, scheme", CASES)
def test_state_dict_is_the_canonical_format_and_round_trips(cls, scheme):
    _, q = make(cls, scheme)
    sd = q.state_dict()
    parsed = Scheme.parse(scheme)
    expected = {"qweight", "scales", "bias"} | ({"zeros"} if parsed.is_int4 and not parsed.symmetric else set()) \
        | ({"act_scale"} if parsed.static_activations else set())
    assert set(sd) == expected
    assert sd["qweight"].dtype == (torch.uint8 if "w4" in scheme else torch.int8)
    assert sd["scales"].dtype == torch.float32
    _, other = make(cls, scheme, seed=9)
    other.load_state_dict(sd)
    x = activation((3, 256))
    assert torch.equal(other(x), q(x))


@pytest.mark.parametrize("cls, scheme", CASES)
def test_to_linear_computes_what_the_quantized_layer_computes(cls, scheme):
    linear, q = make(cls, scheme)
    back = q.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.shape == linear.weight.shape
    x = activation((4, 256))
    if not Scheme.parse(scheme).weight_only:  # activations are quantized too: compare to the float layer
        assert ((back(x) - linear(x)).norm() / linear(x).norm()).item() < 0.02
    else:
        torch.testing.assert_close(back(x), q(x), rtol=1e-4, atol=1e-4)


def test_dtype_moves_cast_the_bias_only_and_keep_the_format():
    _, q = make(W4A16Linear, "w4a16-g64")
    q = q.to(torch.bfloat16)
    w = q.canonical()
    assert w.qweight.dtype == torch.uint8 and w.scales.dtype == torch.float32 and w.zeros.dtype == torch.uint8
    assert q.bias.dtype == torch.bfloat16
    y = q(activation((2, 256), torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_moving_to_another_device_reprepacks_for_that_devices_backend():
    _, q = make(W8A16Linear, "w8a16")
    assert q.backend.name == "cpu"
    q.to("meta")  # a device with no native kernels: the chooser falls to the reference
    w = q.canonical()
    assert w.qweight.device.type == "meta" and w.scales.device.type == "meta" and q.device.type == "meta"
    assert q.backend.name == "reference" and q.packed.tensors["qweight"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_matches_cpu_result():
    _, q = make(W4A16Linear, "w4a16-g64")
    x = activation((3, 256))
    y = q(x)
    qc = q.to("cuda")
    torch.testing.assert_close(qc(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)


def test_compiled_forward_matches_eager():
    _, q = make(W4A16Linear, "w4a16-g64")
    x = activation((3, 256))
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), q(x))


@pytest.mark.parametrize("scheme, limit", [("w4a16-g128", 1.05), ("w8a16", 1.0), ("w8a8", 1.0)])
def test_a_quantized_model_holds_each_weight_once(scheme, limit):
    from lowbit.bench.memory import live_tensor_bytes

    base = live_tensor_bytes()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(4)]).to(torch.bfloat16)
    lowbit.quantize(model, scheme, progress=False)
    canonical = sum(m.canonical().nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        model(torch.randn(3, 512, dtype=torch.bfloat16))
    held = live_tensor_bytes() - base
    assert held == lowbit.nn.runtime_bytes(model) <= limit * canonical


# --- gradients through the quantized layers ------------------------------------------------------

GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static", "w8a16", "w4a16-g32", "w4a16-g128-sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backpropagation_reaches_the_input_and_the_bias(backend, scheme, dtype):
    torch.manual_seed(1)
    linear = nn.Linear(256, 48)
    act = torch.tensor([0.05]) if Scheme.parse(scheme).static_activations else None
    q = QuantLinear.from_linear(linear, scheme, act_scale=act, backend=backend)
    q.bias.requires_grad_(True)
    x = activation((2, 3, 256), dtype, seed=2).requires_grad_(True)
    grad = torch.randn(2, 3, 48).to(dtype)
    q(x).backward(grad)
    w = q.canonical().dequantize(torch.float32).double()
    expected = grad.double().reshape(-1, 48) @ w  # through the dequantized weight, straight through W8A8's rounding
    scale = expected.abs().max()
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    assert (x.grad.double().reshape(-1, 256) - expected).abs().max() <= GRAD_TOL[dtype] * scale
    torch.testing.assert_close(q.bias.grad.double(), grad.double().reshape(-1, 48).sum(0), rtol=GRAD_TOL[dtype],
                               atol=GRAD_TOL[dtype])


def test_the_quantized_weights_stay_frozen():
    _, q = make(W4A16Linear, "w4a16-g64")
    x = activation((4, 256)).requires_grad_(True)
    q(x).sum().backward()
    assert not any(t.requires_grad for t in q.packed.tensors.values()) and not list(q.parameters())


def test_a_training_step_compiles_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    lowbit.quantize(model, "w4a16-g64", exclude=["0"], progress=False)
    first = model[0]
    x, target = torch.randn(8, 256), torch.randn(8, 64)

    def loss_of(x, target):  # compiled whole; AOTAutograd compiles its backward, lowbit's ops inside
        return nn.functional.mse_loss(model(x), target)

    eager = loss_of(x, target)
    eager.backward()
    grad_eager = first.weight.grad.clone()
    first.weight.grad = None
    torch._dynamo.reset()
    loss = torch.compile(loss_of, fullgraph=True)(x, target)
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager.detach())
    torch.testing.assert_close(first.weight.grad, grad_eager, rtol=1e-4, atol=1e-5)
