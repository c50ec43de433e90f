"""LoRA on a quantized base: adapters train, the base stays frozen, gradients reach the
layers before; merging, the adapters' state; peft's own LoRA over lowbit layers; and the
same adapters under DDP (two gloo ranks) as in one process on the same global batch."""

from __future__ import annotations

import lowbit
import pytest
import torch
from conftest import init_rank, run_ranks
from lowbit import lora
from lowbit.nn import QuantLinear
from torch import nn


def quantized_tiny(seed=0, scheme="w4a16-g32"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    lowbit.quantize(model, scheme, progress=False)
    return model


def batch(step, rows=8):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(rows, 64, generator=g), torch.randn(rows, 32, generator=g)


def train(model, step_fn, steps=20, lr=0.02):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss = step_fn(step)
        opt.step()
    return loss


@pytest.mark.parametrize("scheme", ["w4a16-g32", "w8a16", "w8a8"])
def test_adapters_train_over_a_frozen_quantized_base(scheme):
    model = quantized_tiny(scheme=scheme)
    before = {n: m.canonical().qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert lora.add_lora(model, r=4, alpha=8) == ["0", "2"]
    x, t = batch(0)
    assert torch.equal(model(x), quantized_tiny(scheme=scheme)(x))  # B starts at zero: the base model
    first = nn.functional.mse_loss(model(x), t).item()

    def step(i):
        loss = nn.functional.mse_loss(model(x), t)
        loss.backward()
        return loss

    assert train(model, step).item() < 0.5 * first
    assert sorted(lora.adapter_state_dict(model)) == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    for name, q in before.items():
        assert torch.equal(model.get_submodule(name).base.canonical().qweight, q)  # frozen


def test_merge_gives_a_float_model_computing_the_same():
    model = quantized_tiny()
    lora.add_lora(model, r=4, alpha=8, dropout=0.1)
    x, t = batch(1)

    def step(i):
        loss = nn.functional.mse_loss(model(x), t)
        loss.backward()
        return loss

    train(model, step, steps=5)
    model.eval()  # dropout off
    y = model(x)
    lora.merge_lora(model)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], QuantLinear)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_gradients_reach_a_float_layer_before_the_adapted_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    lowbit.quantize(model, "w4a16-g32", exclude=["0"], progress=False)
    lora.add_lora(model, target=["2", "4"])
    model[0].weight.requires_grad_(True)
    x, t = batch(2)
    nn.functional.mse_loss(model(x), t).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def float_tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


@pytest.mark.parametrize("scheme", ["w4a16-g32", "w8a8"])
def test_residual_init_starts_at_the_quantization_errors_truncated_svd(scheme):
    reference = float_tiny()
    model = quantized_tiny(scheme=scheme)
    bases = {n: model.get_submodule(n).canonical().effective() for n in ("0", "2")}
    lora.add_lora(model, r=4, alpha=8, reference=reference)
    for name, base in bases.items():
        w = reference.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd((w - base).double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        delta = model.get_submodule(name).delta_weight().double()
        torch.testing.assert_close(delta, best, rtol=1e-4, atol=1e-6)
        assert (w - base - delta).norm() < (w - base).norm()  # nearer the float weight
    x, _ = batch(3)
    float_out = reference(x)
    assert (model(x) - float_out).norm() < (quantized_tiny(scheme=scheme)(x) - float_out).norm()


def test_residual_init_refuses_a_reference_that_does_not_fit():
    with pytest.raises(ValueError, match="no nn.Linear named '2'"):
        lora.add_lora(quantized_tiny(), reference=nn.Sequential(float_tiny()[0]))
    wrong_shape = float_tiny()
    wrong_shape[2] = nn.Linear(128, 16)
    with pytest.raises(ValueError, match="layer '2': reference weight has shape"):
        lora.add_lora(quantized_tiny(), reference=wrong_shape)
    with pytest.raises(ValueError, match="layer '0': the reference weight is not the one"):
        lora.add_lora(quantized_tiny(), reference=float_tiny(seed=1))
    bad = float_tiny()
    with torch.no_grad():
        bad[0].weight[3, 5] = float("nan")
    model = quantized_tiny()
    with pytest.raises(ValueError, match="layer '0': reference weight has NaN"):
        lora.add_lora(model, reference=bad)
    assert isinstance(model[0], QuantLinear) and all(p.requires_grad for p in model.parameters())  # untouched


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rank"):
        lora.LoRALinear(quantized_tiny()[0], r=0)
    with pytest.raises(ValueError, match="no quantized layer matches"):
        lora.add_lora(quantized_tiny(), target=["nope*"])


def test_peft_puts_its_lora_over_lowbit_layers():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    lowbit.quantize(model, "w4a16-g32", progress=False)
    config = lora.peft_config(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["1", "3"]))
    adapted = peft.get_peft_model(model, config)
    assert type(adapted.base_model.model[1]).__name__ == "PeftQuantLinear"
    ids, t = torch.randint(0, 16, (8,)), batch(3)[1]
    first = nn.functional.mse_loss(adapted(ids), t).item()

    def step(i):
        loss = nn.functional.mse_loss(adapted(ids), t)
        loss.backward()
        return loss

    assert train(adapted, step).item() < first
    state = peft.get_peft_model_state_dict(adapted)
    assert any("lora_A" in k for k in state) and not any("qweight" in k for k in state)
    y = adapted(ids)
    adapted.merge_adapter()  # requantizes base + adapter: close, not exact
    assert (adapted(ids) - y).abs().max() < 0.25 * y.abs().max()
    assert isinstance(adapted.base_model.model[1].base_layer, QuantLinear)


def _lora_ddp_worker(rank, world, init_file, out):
    init_rank(rank, world, init_file)
    model = quantized_tiny()
    lora.add_lora(model, r=4, alpha=8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def step(i):
        x, t = batch(i, 8 * world)
        nn.functional.mse_loss(ddp(x.chunk(world)[rank]), t.chunk(world)[rank]).backward()

    train(model, step, steps=4)
    if rank == 0:
        torch.save(lora.adapter_state_dict(model), out)
    torch.distributed.destroy_process_group()


def test_lora_under_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    run_ranks(_lora_ddp_worker, 2, tmp_path, str(tmp_path / "ddp.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = quantized_tiny()
        lora.add_lora(model, r=4, alpha=8)

        def step(i):  # the two shards' gradients, averaged, as DDP's all-reduce does
            x, t = batch(i, 16)
            for xs, ts in zip(x.chunk(2), t.chunk(2)):
                (nn.functional.mse_loss(model(xs), ts) / 2).backward()

        train(model, step, steps=4)
    finally:
        torch.set_num_threads(threads)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for key, value in lora.adapter_state_dict(model).items():
        assert torch.equal(ddp_state[key], value), key
