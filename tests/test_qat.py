"""Quantization-aware training: fake quantization with straight-through gradients, the
conversion to real layers (same codes and scales, the reference's output bit for bit), and
the same result under DDP (two gloo ranks) as in one process on the same global batch."""

from __future__ import annotations

import copy

import lowbit
import pytest
import torch
from conftest import init_rank, run_ranks
from lowbit import qat
from lowbit.nn import QuantLinear
from torch import nn

SCHEMES = ["w4a16-g32", "w4a16-g64-sym", "w8a16", "w8a8"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


def batch(step, rows=8):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 64, generator=g), torch.randn(rows, 32, generator=g)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prepare_trains_through_fake_quantization_and_convert_keeps_it(scheme):
    model = tiny()
    assert qat.prepare(model, scheme) == ["0", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, t = batch(0)
    first = None
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first  # the float weights learn through the rounding
    y = model(x)
    weight = model[0].weight.detach().clone()
    on_reference = qat.convert(copy.deepcopy(model), backend="reference")
    on_cpu = qat.convert(copy.deepcopy(model))
    assert isinstance(on_cpu[0], QuantLinear) and on_cpu[0].backend.name == "cpu"
    assert torch.equal(on_reference(x), y)  # the fake forward is the reference's arithmetic
    torch.testing.assert_close(on_cpu(x), y, rtol=1e-5, atol=1e-5)
    expected = lowbit.quantize_weight(weight, lowbit.Scheme.parse(scheme))
    got = on_cpu[0].canonical()
    assert all(torch.equal(getattr(got, n), t) for n, t in expected.tensors().items())  # same codes, scales


def test_the_input_gets_the_straight_through_gradient():
    model = tiny()
    qat.prepare(model, "w8a8")
    x = batch(1)[0].requires_grad_(True)
    model[0](x).sum().backward()
    w = lowbit.formats.fake_quantize(model[0].weight.detach(), lowbit.Scheme("w8a8"))
    torch.testing.assert_close(x.grad, torch.ones(8, 128) @ w)
    assert model[0].weight.grad is not None


def test_static_schemes_are_refused():
    with pytest.raises(ValueError, match="dynamic"):
        qat.prepare(tiny(), "w8a8-static")


def _train(model, step_fn, steps=4):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        step_fn(step)
        opt.step()


def _qat_ddp_worker(rank, world, init_file, out):
    init_rank(rank, world, init_file)
    model = tiny()
    qat.prepare(model, "w4a16-g32")
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def step(i):
        x, t = batch(i, 8 * world)
        nn.functional.mse_loss(ddp(x.chunk(world)[rank]), t.chunk(world)[rank]).backward()

    _train(model, step)
    if rank == 0:
        qat.convert(model)
        torch.save(model.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_qat_under_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    run_ranks(_qat_ddp_worker, 2, tmp_path, str(tmp_path / "ddp.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny()
        qat.prepare(model, "w4a16-g32")

        def step(i):  # the two shards' gradients, averaged, as DDP's all-reduce does
            x, t = batch(i, 16)
            for xs, ts in zip(x.chunk(2), t.chunk(2)):
                (nn.functional.mse_loss(model(xs), ts) / 2).backward()

        _train(model, step)
        qat.convert(model)
    finally:
        torch.set_num_threads(threads)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(ddp_state[key], value), key
