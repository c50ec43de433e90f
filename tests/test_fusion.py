"""lowbit.fusion: fused sibling projections equal the separate layers bit for bit, in any
calling order, through the state dict, checkpoints, unfuse, device-less moves and
torch.compile; members that cannot fuse stay apart with a reason."""

import copy

import lowbit
import pytest
import torch
from lowbit.fusion import RowSlice
from torch import nn

SCHEMES = ["w8a8", "w8a16", "w4a16-g32", "w4a16-g64-sym", "w4a16-g128"]


class Attention(nn.Module):
    """q/k/v of different widths (grouped-query) reading one input, as decoders call them."""

    def __init__(self, d=128, kv=32, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(d + 2 * kv, d, bias=bias)

    def forward(self, x):
        return self.o_proj(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1))


class Block(nn.Module):
    def __init__(self, d=128, bias=False):
        super().__init__()
        self.attn = Attention(d, bias=bias)
        self.gate_proj = nn.Linear(d, 96, bias=bias)
        self.up_proj = nn.Linear(d, 96, bias=bias)
        self.down_proj = nn.Linear(96, d, bias=bias)

    def forward(self, x):
        h = x + self.attn(x)
        return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _pair(scheme, dtype=torch.bfloat16, bias=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(Block(bias=bias), Block(bias=bias)).to(dtype)
    apart, fused = copy.deepcopy(model), copy.deepcopy(model)
    lowbit.quantize(apart, scheme, fuse=False, progress=False)
    report = lowbit.quantize(fused, scheme, progress=False)
    return apart, fused, report


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_model_equals_separate_layers(scheme, dtype):
    apart, fused, report = _pair(scheme, dtype, bias=scheme == "w8a16")
    members = [n for n, m in fused.named_modules()
               if isinstance(m, lowbit.QuantLinear) and isinstance(m.store, RowSlice)]
    assert len(members) == 2 * 5  # q, k, v, gate, up in each block
    notes = {r.name: r.reason for r in report}
    assert "fused with q_proj+k_proj+v_proj" in notes["0.attn.k_proj"]
    assert "fused with gate_proj+up_proj" in notes["1.up_proj"]
    assert "fused" not in notes["0.attn.o_proj"]
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 128), (3, 128), (2, 5, 128), (17, 128)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        with torch.no_grad():
            assert torch.equal(fused(x), apart(x)), shape
    x = torch.randn(4, 256, generator=gen).to(dtype)[:, ::2]  # non-contiguous
    with torch.no_grad():
        assert torch.equal(fused(x), apart(x))


def test_each_member_in_any_order_and_on_a_modified_input():
    apart, fused, _ = _pair("w4a16-g32")
    a, f = apart[0].attn, fused[0].attn
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        for order in (["v_proj", "q_proj", "k_proj"], ["k_proj", "k_proj", "q_proj", "v_proj", "v_proj"]):
            for name in order:
                assert torch.equal(getattr(f, name)(x), getattr(a, name)(x)), name
        # The same tensor written in place between two members: the second sees the new values.
        y = x.clone()
        f.q_proj(y)
        y.mul_(2)
        assert torch.equal(f.k_proj(y), a.k_proj(y))
        # Another tensor with the same values, and a lone member called alone.
        assert torch.equal(f.v_proj(x.clone()), a.v_proj(x))
        assert torch.equal(f.q_proj(x), a.q_proj(x))


def test_one_kernel_call_per_group(monkeypatch):
    _, fused, _ = _pair("w8a16")
    group = fused[0].attn.q_proj.store.group
    calls = []
    apply = group.whole.backend.apply
    # The backend object is shared by every layer: count the calls on the group's weight.
    monkeypatch.setattr(group.whole.backend, "apply",
                        lambda x, packed, bias: calls.append(packed is group.whole.packed) or apply(x, packed, bias))
    with torch.no_grad():
        fused[0].attn(torch.randn(1, 128, dtype=torch.bfloat16))
    assert calls.count(True) == 1 and calls.count(False) == 1  # the group, o_proj
    assert group._input is None  # nothing held once every member has its rows


def test_state_dict_checkpoint_and_unfuse(tmp_path):
    apart, fused, _ = _pair("w4a16-g32")
    sa, sf = apart.state_dict(), fused.state_dict()
    assert sa.keys() == sf.keys()
    assert all(torch.equal(sa[k], sf[k]) for k in sa)
    # The members hold no copy: the stacked weight is the only one.
    assert fused[0].attn.k_proj.packed.tensors == {}
    lowbit.save(fused, tmp_path / "ckpt")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = apart(x)
        # Into an unfused skeleton, and into a fused model (its members get their own weights).
        assert torch.equal(lowbit.load(copy.deepcopy(apart), tmp_path / "ckpt")(x), expected)
        assert torch.equal(lowbit.load(copy.deepcopy(fused), tmp_path / "ckpt")(x), expected)
        assert lowbit.unfuse(fused) == 10
        assert not any(isinstance(m.store, RowSlice) for m in fused.modules() if isinstance(m, lowbit.QuantLinear))
        assert torch.equal(fused(x), expected)


def test_biases_follow_casts_edits_and_copies():
    apart, fused, _ = _pair("w8a16", torch.float32, bias=True)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in (apart, fused):
            m.to(torch.bfloat16)  # casts the members' biases; the group reads them at each call
        assert torch.equal(fused(x), apart(x))
        for m in (apart, fused):
            m[0].attn.k_proj.bias.add_(1.0)
            m[1].up_proj.bias.mul_(-2.0)
        assert torch.equal(fused(x), apart(x))
        copied = copy.deepcopy(fused)
        copied[0].attn.v_proj.bias.zero_()
        assert torch.equal(fused(x), apart(x))  # the copy's group is its own
        apart[0].attn.v_proj.bias.zero_()
        assert torch.equal(copied(x), apart(x))
        # Back to float layers: the members' rows and biases.
        lowbit.dequantize(copied)
        lowbit.dequantize(apart)
        x = x.to(copied[0].attn.q_proj.weight.dtype)
        assert type(copied[0].attn.q_proj) is nn.Linear and torch.equal(copied(x), apart(x))


def test_members_that_cannot_fuse_stay_apart():
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    model.attn.k_proj = nn.Linear(128, 32, bias=True).to(torch.bfloat16)  # bias on one member only
    report = lowbit.quantize(model, "w8a16", overrides={"up_proj": "w4a16-g32"}, progress=False)
    notes = {r.name: r.reason for r in report}
    assert "not fused" in notes["attn.q_proj"] and "bias" in notes["attn.q_proj"]
    assert "not fused" in notes["gate_proj"] and "scheme" in notes["gate_proj"]
    assert not any(isinstance(m.store, RowSlice) for m in model.modules() if isinstance(m, lowbit.QuantLinear))
    # fuse=False and custom groups.
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    lowbit.quantize(model, "w8a16", fuse=[("gate_proj", "up_proj")], progress=False)
    assert isinstance(model.up_proj.store, RowSlice) and not isinstance(model.attn.q_proj.store, RowSlice)


def test_compiled_fused_model_equals_compiled_separate_layers():
    # One graph (fullgraph), no recompilation on the next input, and the same bits as the
    # unfused model compiled alike (inductor rounds the float ops between layers its own way).
    apart, fused, _ = _pair("w8a8")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 128, generator=gen).to(torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(apart, fullgraph=True)
        expected = [compiled(x) for x in xs]
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = torch.compile(fused, fullgraph=True)
            for x, y in zip(xs, expected):
                assert torch.equal(compiled(x), y)


def test_llama_generate_fused_equals_unfused(tmp_path):
    pytest.importorskip("transformers")
    from lowbit.bench import generate

    tiny = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    model = generate.load(generate.build_llama(tmp_path / "tiny", tiny))
    apart, fused = copy.deepcopy(model), copy.deepcopy(model)
    lowbit.quantize(apart, "w4a16-g32", fuse=False, progress=False)
    lowbit.quantize(fused, "w4a16-g32", progress=False)
    assert isinstance(fused.model.layers[0].self_attn.v_proj.store, RowSlice)
    ids = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, apart(ids).logits)
        kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(fused.generate(ids, **kwargs), apart.generate(ids, **kwargs))
