"""lowbit.save / lowbit.load: bit-exact round trips, and bad files leave the model intact."""

from __future__ import annotations

import json

import lowbit
import pytest
import torch
from conftest import net
from lowbit import CheckpointError, checkpoint
from lowbit.nn import QuantLinear
from safetensors import safe_open
from safetensors.torch import save_file


def quantized(scheme="w4a16-g64", seed=0):
    model = net(seed)
    lowbit.quantize(model, scheme, overrides={"blocks.1.*": "w8a8", "shared": "w8a16"})
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("scheme", ["w4a16-g64", "w4a16-g32-sym", "w8a16"])
def test_round_trip_into_a_float_skeleton_is_bit_exact(tmp_path, scheme):
    model, x = quantized(scheme), torch.randn(2, 3, 128)
    path = tmp_path / "model.safetensors"
    lowbit.save(model, path)
    skeleton = net(seed=123)  # different random float weights
    lowbit.load(skeleton, path)
    saved, loaded = model.state_dict(), skeleton.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(skeleton(x), model(x))
    assert skeleton.shared is skeleton.alias and skeleton.tied_a.store is skeleton.tied_b.store
    assert str(skeleton.blocks[0].mlp[0]) == str(model.blocks[0].mlp[0])


def test_metadata_names_format_version_and_scheme_per_layer(tmp_path):
    path = tmp_path / "m.safetensors"
    lowbit.save(quantized(), path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lowbit" and meta["format_version"] == "1"
    layers = json.loads(meta["layers"])
    assert layers["blocks.0.mlp.0"]["scheme"] == "w4a16-g64" and layers["blocks.1.attn.q"]["scheme"] == "w8a8"
    assert layers["shared"]["scheme"] == "w8a16"


def test_load_picks_the_backend_of_the_target_device(tmp_path):
    path = tmp_path / "m.safetensors"
    lowbit.save(quantized(), path)
    model = lowbit.load(net(), path, backend="reference")
    assert {m.backend.name for m in model.modules() if isinstance(m, QuantLinear)} == {"reference"}
    model = lowbit.load(net(), path, device="meta")
    assert model.blocks[0].mlp[0].device.type == "meta"


def corrupt_cases(path, tmp_path):
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    def resave(name, new_tensors, new_meta):
        p = tmp_path / name
        save_file(new_tensors, str(p), metadata=new_meta)
        return p

    flipped = bytearray(raw)
    flipped[8 + header_len + 100] ^= 0xFF
    bigger = dict(tensors)
    bigger["blocks.0.mlp.0.scales"] = torch.ones(512, 4)
    return {
        "truncated": (write("t", raw[: len(raw) - 1000]), "truncated or corrupt"),
        "garbage header": (write("g", raw[:8] + b"{not json" + raw[17:]), "truncated or corrupt"),
        "flipped data byte": (write("f", bytes(flipped)), "sha256"),
        "not lowbit": (resave("n", tensors, {"format": "pt"}), "not a lowbit checkpoint"),
        "future version": (resave("v", tensors, {**meta, "format_version": "2"}), "version '2'"),
        "wrong scales shape": (resave("s", bigger, {**meta, "sha256": lowbit.checkpoint._digest(bigger)}),
                               "blocks.0.mlp.0"),
    }


@pytest.mark.parametrize("case", ["truncated", "garbage header", "flipped data byte", "not lowbit",
                                  "future version", "wrong scales shape"])
def test_bad_files_raise_and_leave_the_model_untouched(tmp_path, case):
    path = tmp_path / "m.safetensors"
    lowbit.save(quantized(), path)
    bad, message = corrupt_cases(path, tmp_path)[case]
    model = net(seed=7)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(model, bad)
    assert_unchanged(model, before)


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    lowbit.save(quantized(), path)

    class Wider(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net(3)
            self.inner.blocks[0].mlp[0] = torch.nn.Linear(128, 384)

    for model, message in [(Wider().inner, r"blocks\.0\.mlp\.0.*512x128 in the checkpoint"),
                           (torch.nn.Sequential(torch.nn.Linear(128, 128)), "does not exist")]:
        before = snapshot(model)
        with pytest.raises(CheckpointError, match=message):
            lowbit.load(model, path)
        assert_unchanged(model, before)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        lowbit.load(net(), tmp_path / "nope.safetensors")


@pytest.mark.parametrize("shard", ["20KB", "1MB", None])
def test_sharded_directories_round_trip(tmp_path, shard):
    model, x = quantized("w4a16-g64"), torch.randn(2, 3, 128)
    out = lowbit.save(model, tmp_path / "ckpt", max_shard_size=shard)
    files = checkpoint.checkpoint_files(out)
    assert (len(files) > 1) == (shard == "20KB")
    if len(files) > 1:
        index = json.loads((out / checkpoint.INDEX_FILE).read_text())
        assert set(index["weight_map"].values()) == {f.name for f in files}
        for f in files:  # each shard carries its own digest
            with safe_open(str(f), "pt") as h:
                assert h.metadata()["sha256"] == checkpoint._digest({k: h.get_tensor(k) for k in h.keys()})
    skeleton = lowbit.load(net(seed=5), out)
    assert torch.equal(skeleton(x), model(x))
    assert skeleton.tied_a.store is skeleton.tied_b.store


def test_a_model_built_on_meta_is_filled_by_load(tmp_path):
    model, x = quantized("w8a16"), torch.randn(2, 3, 128)
    path = lowbit.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = net()
    lowbit.load(skeleton, path)
    assert not checkpoint.meta_tensors(skeleton)
    assert torch.equal(skeleton(x), model(x))


def test_a_corrupt_shard_is_caught_and_the_model_left_untouched(tmp_path):
    out = lowbit.save(quantized("w4a16-g64"), tmp_path / "ckpt", max_shard_size="20KB")
    last = checkpoint.checkpoint_files(out)[-1]
    raw = bytearray(last.read_bytes())
    raw[-10] ^= 0xFF
    last.write_bytes(bytes(raw))
    model = net(seed=7)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="sha256"):
        lowbit.load(model, out)
    assert_unchanged(model, before)


def test_an_interrupted_save_leaves_no_loadable_checkpoint(tmp_path, monkeypatch):
    real, calls = checkpoint.save_file, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_third)
    with pytest.raises(OSError):
        lowbit.save(quantized("w4a16-g64"), tmp_path / "ckpt", max_shard_size="20KB")
    assert not list((tmp_path / "ckpt").iterdir())  # the staging directory is gone too
    with pytest.raises(FileNotFoundError):
        lowbit.load(net(), tmp_path / "ckpt")
