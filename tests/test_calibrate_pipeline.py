"""Calibration through ``lowbit.quantize`` on small transformers: each method against
round-to-nearest, folding where the graph allows, layer-wise vs whole-model, memory,
the ways batches are given, and bad calibration data."""

from __future__ import annotations

import copy

import lowbit
import pytest
import torch
from lowbit.calibrate import GPTQ, SmoothQuant, find_blocks
from lowbit.nn import QuantLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

D, VOCAB, SEQ = 128, 96, 16


class Block(nn.Module):
    """A transformer block, pre-LayerNorm (``post_ln=False``: LayerNorm outputs feed only
    the Linear layers) or post-LayerNorm (LayerNorm outputs also feed the residual)."""

    def __init__(self, post_ln: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        with torch.no_grad():  # a few outlier channels, as trained transformers have
            for ln in (self.ln1, self.ln2):
                ln.weight[:: D // 4] = 12.0

    def attention(self, h, mask):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / D**0.5 + mask
        return self.proj(torch.softmax(scores, dim=-1) @ v)

    def forward(self, x, mask):
        if self.post_ln:
            x = self.ln1(x + self.attention(x, mask))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))
        x = x + self.attention(self.ln1(x), mask)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, post_ln=False, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Block(post_ln, seed=i + 1) for i in range(layers)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), device=ids.device).triu(1)
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.head(self.norm(x))


def batches(count=8, seed=0, shape=(2, SEQ)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, shape, generator=g) for _ in range(count)]


def error(model, reference, data):
    with torch.no_grad():
        return sum((model(b) - reference(b)).pow(2).mean().item() for b in data)


def quantized(model, scheme, **kw):
    m = copy.deepcopy(model)
    report = lowbit.quantize(m, scheme, progress=False, **kw)
    return m, report


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("scheme", ["w4a16-g32", "w4a16-gK-sym"])
def test_weight_calibration_beats_round_to_nearest(method, scheme):
    model = TinyLM()
    cal, held_out = batches(8), batches(4, seed=1)
    rtn, _ = quantized(model, scheme)
    cal_model, report = quantized(model, scheme, method=method, calibration=cal)
    assert report.calibration is not None and report.calibration.sequential
    assert error(cal_model, model, held_out) < 0.8 * error(rtn, model, held_out)


def test_smoothquant_folds_into_layernorm_and_beats_static_w8a8():
    model = TinyLM()
    cal, held_out = batches(8), batches(4, seed=1)
    static, _ = quantized(model, "w8a8-static", calibration=cal)
    smooth, report = quantized(model, "w8a8-static", method=SmoothQuant(alpha=0.5), calibration=cal)
    folds = report.calibration.folds
    assert "layers.0.ln1 -> layers.0.qkv" in folds and "layers.1.ln2 -> layers.1.fc1" in folds
    assert smooth.layers[0].qkv.input_scale is None and smooth.layers[0].fc1.input_scale is None
    assert smooth.layers[0].proj.input_scale is not None  # its input comes from no foldable module
    assert not torch.equal(smooth.layers[0].ln1.weight, model.layers[0].ln1.weight)
    assert error(smooth, model, held_out) < 0.7 * error(static, model, held_out)


def test_smoothquant_auto_picks_an_alpha_per_group_and_does_at_least_as_well():
    model = TinyLM()
    cal, held_out = batches(8), batches(4, seed=1)
    fixed, _ = quantized(model, "w8a8-static", method=SmoothQuant(0.5), calibration=cal)
    auto, report = quantized(model, "w8a8-static", method=SmoothQuant("auto", grid=10), calibration=cal)
    alphas = report.calibration.alphas
    assert len(alphas) == 9  # a group per input: qkv, proj, fc1, fc2 per block, and the head
    assert "SmoothQuant alpha per group" in str(report.calibration)
    plain, _ = quantized(model, "w8a8-static", calibration=cal)
    # On this tiny model (128 calibration tokens) the search lands near the best fixed alpha;
    # on MiniLM it beats every fixed one (bench/RESULTS.md, "Calibration").
    assert error(auto, model, held_out) < 1.15 * error(fixed, model, held_out)
    assert error(auto, model, held_out) < 0.7 * error(plain, model, held_out)
    with pytest.raises(ValueError, match="'auto'"):
        SmoothQuant("best")
    with pytest.raises(ValueError, match="grid"):
        SmoothQuant("auto", grid=0)


def test_a_fold_that_would_change_the_residual_is_refused():
    model = TinyLM(post_ln=True)
    smooth, report = quantized(model, "w8a8", method="smoothquant", calibration=batches(4))
    # fc1 reads ln1's output, which also feeds the residual: the scale stays on the layer.
    assert not any("fc1" in f for f in report.calibration.folds)
    assert smooth.layers[0].fc1.input_scale is not None
    assert torch.equal(smooth.layers[0].ln1.weight, model.layers[0].ln1.weight)
    dyn, _ = quantized(model, "w8a8")
    held_out = batches(4, seed=1)
    assert error(smooth, model, held_out) < error(dyn, model, held_out)


def test_static_scales_are_the_observed_input_ranges():
    model = TinyLM()
    cal = batches(4)
    amax = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), a[0].abs().max().item())))
        for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in cal:
            model(b)
    for h in hooks:
        h.remove()
    q, report = quantized(model, "w8a8-static", calibration=cal)
    assert report.calibration.observer == "minmax"
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert m.act_scale.item() == pytest.approx(amax[name] / 127, rel=1e-6), name


def test_every_observer_calibrates_static_w8a8():
    model = TinyLM()
    for observer in lowbit.calibrate.OBSERVERS:
        q, report = quantized(model, "w8a8-static", observer=observer, calibration=batches(2))
        assert report.calibration.observer == observer
        assert error(q, model, batches(2, seed=1)) < 1.0


def test_layerwise_with_float_propagation_equals_whole_model():
    model = TinyLM()
    cal = batches(4)
    whole, r1 = quantized(model, "w4a16-g32", method="gptq", calibration=cal, sequential=False)
    layer, r2 = quantized(model, "w4a16-g32", method="gptq", calibration=cal, propagate="float")
    assert not r1.calibration.sequential and r2.calibration.sequential
    for (n1, a), (n2, b) in zip(whole.named_modules(), layer.named_modules()):
        if isinstance(a, QuantLinear):
            assert n1 == n2
            mismatch = (a.canonical().qweight != b.canonical().qweight).float().mean().item()
            assert mismatch < 1e-3, n1  # equal up to float summation order
    quant, _ = quantized(model, "w4a16-g32", method="gptq", calibration=cal)
    held_out = batches(4, seed=1)
    assert error(quant, model, held_out) < 1.5 * error(whole, model, held_out)


def test_layerwise_memory_stays_within_one_block():
    # A realistic amount of calibration data for the width (16k tokens of 128 channels):
    # with too few tokens the K x K Hessians, not the activations, dominate.
    model = TinyLM(layers=4)
    _, report = quantized(model, "w4a16-g32", method="gptq", calibration=batches(16, shape=(8, 128)))
    c = report.calibration
    assert c.sequential and c.blocks == "layers"
    assert 0 < c.peak_state_bytes < 2 * (c.block_weight_bytes + c.block_activation_bytes)
    block_bytes = sum(p.numel() * 4 for p in model.layers[0].parameters())
    assert c.block_weight_bytes == block_bytes
    assert "peak calibration state" in str(report)


class WithInputProjection(TinyLM):
    """A Linear layer before the blocks as well as the head after them."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(D, D)

    def forward(self, ids):
        x = self.proj_in(self.embed(ids))
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), device=ids.device).triu(1)
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.head(self.norm(x))


def test_layers_before_and_after_the_blocks_are_calibrated_too():
    model = WithInputProjection()
    cal, held_out = batches(8), batches(4, seed=1)
    q, report = quantized(model, "w4a16-g32", method="gptq", calibration=cal)
    assert isinstance(q.proj_in, QuantLinear) and isinstance(q.head, QuantLinear)
    assert report.calibration.sequential
    rtn, _ = quantized(model, "w4a16-g32")
    assert error(q, model, held_out) < 0.8 * error(rtn, model, held_out)


def test_blocks_are_found_or_given():
    model = TinyLM()
    name, blocks = find_blocks(model)
    assert name == "layers" and len(blocks) == 2
    report = lowbit.quantize(model, "w4a16-g32", method=GPTQ(act_order=True), calibration=batches(2),
                             blocks=[model.layers[0]], progress=False)
    assert report.calibration.blocks == "layers.0"
    lone = nn.Sequential(nn.Linear(D, D))
    with pytest.raises(ValueError, match="blocks"):
        lowbit.quantize(lone, "w4a16-g32", method="gptq", calibration=[torch.randn(2, D)], sequential=True,
                        progress=False)
    with pytest.raises(ValueError, match="no such submodule"):
        quantized(TinyLM(), "w4a16", method="gptq", calibration=batches(1), blocks="decoder.layers")


def test_batches_as_tuples_dicts_and_a_custom_forward():
    class TwoArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x, y):
            return self.b(self.a(x) + y)

    class DictIn(TwoArgs):
        def forward(self, feats):
            return super().forward(feats["x"], feats["y"])

    x, y = torch.randn(4, D), torch.randn(4, D)
    _, r = quantized(TwoArgs(), "w8a8-static", calibration=[(x, y)])
    assert len(r.quantized) == 2
    _, r = quantized(DictIn(), "w8a8-static", calibration=[{"x": x, "y": y}])
    assert len(r.quantized) == 2
    seen = []

    def forward(model, batch):
        seen.append(batch)
        return model(batch[0], y=batch[1])

    _, r = quantized(TwoArgs(), "w4a16-g32", method="awq", calibration=[[x, y]], calibration_forward=forward)
    assert len(r.quantized) == 2 and seen


def test_bad_calibration_data_is_refused_and_model_kept():
    model = TinyLM()
    with pytest.raises(ValueError, match="empty"):
        lowbit.quantize(copy.deepcopy(model), "w4a16", method="gptq", calibration=[], progress=False)
    with pytest.raises(ValueError, match="calibration"):
        lowbit.quantize(copy.deepcopy(model), "w4a16", method="gptq", progress=False)
    with pytest.raises(ValueError, match="activation scale"):
        lowbit.quantize(copy.deepcopy(model), "w8a8-static", progress=False)

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)
            self.lin2 = nn.Linear(D, D)

        def forward(self, x):
            return self.lin2(self.lin(x))

    net = Emb()
    before = copy.deepcopy(net.state_dict())
    bad = [torch.randn(2, D), torch.full((2, D), float("nan"))]
    with pytest.raises(ValueError, match="batch 1.*NaN"):
        lowbit.quantize(net, "w8a8", method="smoothquant", calibration=bad, progress=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.lin, nn.Linear)


def test_methods_and_schemes_must_fit():
    with pytest.raises(ValueError, match="awq.*does not apply to w8a8"):
        lowbit.quantize(TinyLM(), "w8a8", method="awq", calibration=batches(1), progress=False)
    with pytest.raises(ValueError, match="smoothquant.*does not apply to w4a16"):
        lowbit.quantize(TinyLM(), "w4a16", method="smoothquant", calibration=batches(1), progress=False)
    with pytest.raises(ValueError, match="unknown calibration method"):
        lowbit.quantize(TinyLM(), "w4a16", method="hqq", calibration=batches(1), progress=False)
    with pytest.raises(ValueError, match="propagate"):
        lowbit.quantize(TinyLM(), "w4a16", method="gptq", calibration=batches(1), propagate="both", progress=False)


def test_input_scales_survive_a_checkpoint(tmp_path):
    model = TinyLM(post_ln=True)
    q, _ = quantized(model, "w4a16-g32", method="awq", calibration=batches(2))
    assert q.layers[0].fc1.input_scale is not None
    lowbit.save(q, tmp_path / "m.safetensors")
    fresh = lowbit.load(TinyLM(post_ln=True), tmp_path / "m.safetensors")
    assert torch.equal(fresh.layers[0].fc1.input_scale, q.layers[0].fc1.input_scale)
    b = batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(fresh(b), q(b))
        # to_linear folds the input scale back into the float weight
        lin = q.layers[0].fc1.to_linear()
        h = torch.randn(3, D)
        assert torch.allclose(lin(h), q.layers[0].fc1(h), rtol=1e-3, atol=1e-3)


def test_training_mode_is_restored():
    model = TinyLM().train()
    lowbit.quantize(model, "w4a16", method="gptq", calibration=batches(1), progress=False)
    assert model.training


class DeviceSpy(TorchDispatchMode):
    """Records every op whose output lies on a device other than ``device``."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device, self.elsewhere = torch.device(device), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.elsewhere.append((str(func), str(t.device)))
        return out


@pytest.mark.parametrize("scheme, kw", [
    ("w4a16-g32", {"method": "gptq"}),
    ("w8a16", {"method": GPTQ(act_order=True), "sequential": False}),
    ("w4a16-g32", {"method": "awq"}),
    ("w8a8-static", {"method": SmoothQuant(0.5), "observer": "minmax"}),
    ("w8a8", {"method": SmoothQuant("auto", grid=4)}),
    *[("w8a8-static", {"observer": name}) for name in sorted(lowbit.calibrate.OBSERVERS)],
    ("w4a16-g32", {"method": "gptq", "calibration_device": "cpu"}),
])
def test_calibration_allocates_only_on_the_activations_device(scheme, kw):
    # The default device is meta, so any tensor made without saying where lands there and
    # is caught: on a GPU it would have landed on the CPU, beside activations on the GPU.
    model = TinyLM()
    cal = batches(2)
    with torch.device("meta"), DeviceSpy("cpu") as spy:
        report = lowbit.quantize(model, scheme, calibration=cal, progress=False, **kw)
    assert not spy.elsewhere, spy.elsewhere[:5]
    assert len(report.quantized) == 9


def test_the_device_spy_catches_an_allocation_without_a_device():
    with torch.device("meta"), DeviceSpy("cpu") as spy:
        torch.zeros(3)
    assert spy.elsewhere


def _gptq_ddp_worker(rank, world, init_file, out):
    from conftest import init_rank

    init_rank(rank, world, init_file)
    model = TinyLM()
    shard = batches(4)[rank::world]  # each rank calibrates on its share of the data
    # propagate="float": every block sees the float model's activations, so what differs
    # between the runs is the all-reduced Hessians alone, not errors carried block to block.
    lowbit.quantize(model, "w4a16-g32", method="gptq", calibration=shard, propagate="float", progress=False)
    if rank == 0:
        codes = {n: m.canonical().tensors() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        with torch.no_grad():
            torch.save({"codes": codes, "logits": model(batches(2, seed=9)[0])}, out)
    torch.distributed.destroy_process_group()


def test_gptq_under_two_ranks_equals_one_process_on_all_the_data(tmp_path):
    from conftest import run_ranks

    run_ranks(_gptq_ddp_worker, 2, tmp_path, str(tmp_path / "ddp.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = TinyLM()
        lowbit.quantize(model, "w4a16-g32", method="gptq", calibration=batches(4), propagate="float", progress=False)
    finally:
        torch.set_num_threads(threads)
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, q in model.named_modules():
        if isinstance(q, QuantLinear):
            # The Hessians' sums differ only in order (two ranks' halves, then all-reduced):
            # a code differs only where the float difference tips a rounding.
            a, b = (lowbit.reference.unpack_int4(t["qweight"]).int() for t in (q.canonical().tensors(),
                                                                                ddp["codes"][name]))
            mismatch = (a != b).float().mean().item()
            assert mismatch < 1e-2, (name, mismatch)
    with torch.no_grad():
        logits = model(batches(2, seed=9)[0])
    assert (logits - ddp["logits"]).norm() / logits.norm() < 1e-2


def test_awq_refuses_to_run_distributed(tmp_path):
    from conftest import run_ranks

    with pytest.raises(Exception, match="calibrate on one rank"):
        run_ranks(_awq_ddp_worker, 2, tmp_path)


def _awq_ddp_worker(rank, world, init_file):
    from conftest import init_rank

    init_rank(rank, world, init_file)
    try:
        lowbit.quantize(TinyLM(), "w4a16-g32", method="awq", calibration=batches(2), progress=False)
    finally:
        torch.distributed.destroy_process_group()
