"""Memory of quantized models: what a model holds, what loading and streaming quantization
peak at. Not part of ``make test`` (the 3B run takes minutes and 6 GB of disk).

    python bench/memory_use.py table                      # live bytes per scheme, 8 bf16 4096x4096 layers
    python bench/memory_use.py layer                      # peak while quantizing one layer
    python bench/memory_use.py make-llama DIR --size 3b   # a random-initialised Llama in bf16, shard by shard
    python bench/memory_use.py load DIR                   # peak RSS of lowbit.load_pretrained(DIR)
    python bench/memory_use.py stream SRC OUT [--method gptq --sequences 128 --length 128]
    python bench/memory_use.py compare SRC OUT            # logits: streamed output vs quantized in memory

Each measurement runs in a child process of its own with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``), so that freed large blocks leave the resident set at once and
the sampled peak (``lowbit.calibrate.rss.RssPeak``, every 2 ms) is the peak of live memory.
The Llama directories use the tokenizer of all-MiniLM-L6-v2 (vocabulary 30522, so that
text goes in and comes out) and hold random weights (the text is noise; the memory and
the numerics are what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "tiny": (256, 512, 2, 4, 2),
    "1b": (2048, 5632, 20, 16, 4),
    "3b": (3072, 8192, 28, 24, 8),
}
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}


def _child(args: list[str]) -> dict:
    """Run this script's subcommand in a fresh process; it prints one JSON line last."""
    env = {**os.environ, **CHILD_ENV}
    out = subprocess.run([sys.executable, __file__, *args, "--child"], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    from lowbit.calibrate.rss import RssPeak

    return RssPeak._rss()


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


# --- the table: bytes held after quantize and one forward -------------------------------------------


def table_child(scheme: str) -> dict:
    import lowbit
    from lowbit.bench.memory import live_tensor_bytes

    torch.manual_seed(0)
    layers = [torch.nn.Linear(4096, 4096, bias=False).to(torch.bfloat16) for _ in range(8)]
    model = torch.nn.Sequential(*layers)
    del layers
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = live_tensor_bytes() - float_bytes
    if scheme != "bf16":
        lowbit.quantize(model, scheme, progress=False)
    with torch.no_grad():
        model(torch.randn(1, 4096, dtype=torch.bfloat16))
    held = live_tensor_bytes() - base
    canonical = sum(m.canonical().nbytes() for m in model.modules() if isinstance(m, lowbit.QuantLinear))
    return {"scheme": scheme, "held": held, "canonical": canonical or float_bytes}


def table() -> None:
    print("| scheme | bytes held after quantize + forward | canonical (weights, scales, zeros) | ratio |")
    print("|---|---|---|---|")
    for scheme in ["bf16", "w4a16-g128", "w8a16", "w8a8"]:
        r = _child(["table-child", scheme])
        print(f"| {scheme} | {r['held'] / 2**20:.1f} MB | {r['canonical'] / 2**20:.1f} MB | "
              f"{r['held'] / r['canonical']:.3f} |")


def layer_child() -> dict:
    """Peak growth of the resident set while one bf16 4096 x 4096 weight is quantized and
    prepacked (after one warm-up quantization, so that one-time initialisation is out)."""
    import lowbit
    from lowbit.calibrate.rss import RssPeak

    w = torch.randn(4096, 4096).to(torch.bfloat16)
    rows = {}
    for scheme in ["w4a16-g128", "w8a16", "w8a8"]:
        for _ in range(2):
            with RssPeak() as peak:
                qw = lowbit.quantize_weight(w, lowbit.Scheme.parse(scheme))
                store = lowbit.nn.WeightStore.build(qw)
                canonical = qw.nbytes()
                del qw
            runtime = store.packed.nbytes()
            del store
        rows[scheme] = {"peak": peak.delta, "canonical": canonical, "runtime": runtime}
    return {"float": w.numel() * w.element_size(), "rows": rows}


def layer() -> None:
    r = _child(["layer-child"])
    print(f"quantizing one bf16 4096x4096 weight ({r['float'] / 2**20:.0f} MB, held before and after): peak growth")
    for scheme, row in r["rows"].items():
        print(f"  {scheme}: {row['peak'] / 2**20:.1f} MB (canonical {row['canonical'] / 2**20:.1f} MB + runtime "
              f"{row['runtime'] / 2**20:.1f} MB = {(row['canonical'] + row['runtime']) / 2**20:.1f} MB)")


# --- a random Llama on disk, written shard by shard ---------------------------------------------------


def make_llama(out: Path, size: str, shard_bytes: int = 2 * 2**30) -> None:
    import transformers
    from safetensors.torch import save_file

    from lowbit import demo
    from lowbit.checkpoint import empty_weights

    hidden, inter, layers, heads, kv = SIZES[size]
    tok_dir = Path(demo.default_model_dir())
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                                      bos_token_id=101, eos_token_id=102, pad_token_id=0,
                                      architectures=["LlamaForCausalLM"])
    with empty_weights():
        model = transformers.LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(tok_dir / name, out / name)
    gen = torch.Generator().manual_seed(0)
    shards, shard, size_now, total = [], {}, 0, 0
    params = 0
    for key, p in model.state_dict().items():
        t = torch.ones(p.shape) if key.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        params += t.numel()
        if shard and size_now + t.numel() * 2 > shard_bytes:
            shards.append(shard)
            save_file(shard, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            shard, size_now = {}, 0
        shard[key] = t
        size_now += t.numel() * 2
        total += t.numel() * 2
    shards.append(shard)
    save_file(shard, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
    weight_map = {}
    for i, keys in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i + 1}.safetensors").rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    print(f"{out}: {params / 1e9:.2f}B parameters, {_gb(total)} in {len(shards)} bf16 shards")


# --- peaks ------------------------------------------------------------------------------------------


def load_child(directory: str) -> dict:
    """load_pretrained's two steps, measured apart: building the model class on meta (a
    fixed cost of transformers' code, whatever the model's size) and loading into it."""
    import lowbit
    from lowbit import checkpoint, pretrained
    from lowbit.calibrate.rss import RssPeak

    base = _rss()
    t0 = time.perf_counter()
    model = pretrained.build_empty(directory)
    built = _rss() - base
    with RssPeak() as peak:
        checkpoint.load(model, directory)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
    return {"checkpoint": size, "build": built, "load_peak": peak.peak - base - built, "after": _rss() - base,
            "seconds": seconds, "layers": sum(isinstance(m, lowbit.QuantLinear) for m in model.modules())}


def load(directory: str) -> None:
    r = _child(["load-child", directory])
    print(f"load_pretrained({directory}): checkpoint {_gb(r['checkpoint'])}; over the process after "
          f"`import torch, lowbit`: building the transformers model on meta {_gb(r['build'])}, then loading peaks "
          f"at {_gb(r['load_peak'])} more ({r['load_peak'] / r['checkpoint']:.2f}x the checkpoint); "
          f"{_gb(r['after'])} resident after in all ({r['after'] / r['checkpoint']:.2f}x); {r['seconds']:.1f} s, "
          f"{r['layers']} quantized layers")


def _calibration(directory: str, sequences: int, length: int) -> list:
    import transformers
    from pydoc_data.topics import topics

    tok = transformers.AutoTokenizer.from_pretrained(directory)
    text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    return [ids[i * length:(i + 1) * length].unsqueeze(0) for i in range(sequences)]


def stream_child(source: str, out: str, method: str, sequences: int, length: int) -> dict:
    import lowbit
    from lowbit.calibrate.rss import RssPeak
    from safetensors import safe_open

    from lowbit.checkpoint import checkpoint_files

    t0 = time.perf_counter()
    for file in checkpoint_files(source):  # a plain read of the shards, for the time comparison
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                f.get_tensor(key).float().sum()  # touch the data: safetensors maps the file lazily
    read_seconds = time.perf_counter() - t0
    calibration = _calibration(source, sequences, length) if method != "rtn" else None
    base = _rss()
    t0 = time.perf_counter()
    with RssPeak() as peak:
        report = lowbit.quantize_pretrained(source, out, "w4a16-g128", method=method, calibration=calibration,
                                            exclude=["lm_head"], progress=False)
    seconds = time.perf_counter() - t0
    float_size = sum(f.stat().st_size for f in checkpoint_files(source))
    out_size = sum(f.stat().st_size for f in checkpoint_files(out))
    summary = report.calibration
    return {"float": float_size, "quantized": out_size, "peak": peak.peak - base, "seconds": seconds,
            "read_seconds": read_seconds, "layers": len(report.quantized),
            "calibration_state": summary.peak_state_bytes if summary else 0,
            "block_activations": summary.block_activation_bytes if summary else 0}


def stream(source: str, out: str, method: str, sequences: int, length: int) -> None:
    r = _child(["stream-child", source, out, "--method", method, "--sequences", str(sequences),
                "--length", str(length)])
    print(f"quantize_pretrained {method} w4a16-g128 (lm_head kept bf16): float {_gb(r['float'])} -> "
          f"{_gb(r['quantized'])}; peak RSS {_gb(r['peak'])} ({r['peak'] / r['float']:.2f}x the float model); "
          f"{r['seconds']:.0f} s against {r['read_seconds']:.0f} s for a plain read of the shards; "
          f"{r['layers']} layers" + (f"; calibration state peak {_gb(r['calibration_state'])}, block inputs "
                                     f"{_gb(r['block_activations'])}" if method != "rtn" else ""))


def compare_child(source: str, out: str) -> dict:
    import transformers

    import lowbit

    prompts = _calibration(source, 3, 24)
    streamed = lowbit.load_pretrained(out)
    with torch.no_grad():
        a = [streamed(p).logits for p in prompts]
    generated = streamed.generate(prompts[0][:, :8], max_new_tokens=12, do_sample=False)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.decode(generated[0])
    del streamed
    model = transformers.LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    lowbit.quantize(model, "w4a16-g128", exclude=["lm_head"], progress=False)
    with torch.no_grad():
        b = [model(p).logits for p in prompts]
    return {"identical": all(torch.equal(x, y) for x, y in zip(a, b)),
            "max_diff": max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), "text": text}


def compare(source: str, out: str) -> None:
    r = _child(["compare-child", source, out])
    print(f"logits on 3 prompts, streamed output vs quantized in memory: identical={r['identical']} "
          f"(max |diff| {r['max_diff']}); greedy text: {r['text']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["table", "layer", "make-llama", "load", "stream", "compare", "table-child",
                                            "layer-child", "load-child", "stream-child", "compare-child"])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--child", action="store_true")
    a = parser.parse_args()
    if a.command == "table":
        table()
    elif a.command == "layer":
        layer()
    elif a.command == "make-llama":
        make_llama(Path(a.paths[0]), a.size)
    elif a.command == "load":
        load(a.paths[0])
    elif a.command == "stream":
        stream(a.paths[0], a.paths[1], a.method, a.sequences, a.length)
    elif a.command == "compare":
        compare(a.paths[0], a.paths[1])
    else:
        fn = {"table-child": table_child, "layer-child": layer_child, "load-child": load_child,
              "stream-child": stream_child, "compare-child": compare_child}[a.command]
        extra = {"stream-child": [a.method, a.sequences, a.length]}.get(a.command, [])
        print(json.dumps(fn(*a.paths, *extra)))


if __name__ == "__main__":
    main()
