"""``lowbit quantize | inspect | report``: whole-model tools on local model directories.

A model directory is a sentence-transformers model (it has ``modules.json``) or a
Hugging Face transformers model (``config.json``); both load offline, on the CPU. Inputs
are text, tokenized by the model's own tokenizer, one sample per line of a text file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.formats import Scheme
from lowbit.nn import QuantLinear

# Memory of common accelerators, GB (as sold).
GPUS = [("T4", 16), ("L4", 24), ("A10", 24), ("RTX 4090", 24), ("A100 40GB", 40), ("L40S", 48),
        ("A100 80GB", 80), ("H100", 80), ("H200", 141)]
# Share of a GPU's memory left for weights after activations, caches and the runtime.
WEIGHT_SHARE = 0.8


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    encode: Callable[[list[str]], object]  # texts -> one batch
    forward: Callable[[nn.Module, object], object]


def load_model(path: str) -> LoadedModel:
    """A local sentence-transformers or transformers model, with its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model directory at {path}")
    if os.path.exists(os.path.join(path, "modules.json")):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
        tokenize = getattr(st, "preprocess", None) or st.tokenize
        return LoadedModel(st, lambda texts: tokenize(texts), lambda m, b: m(dict(b)))
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: neither a sentence-transformers (modules.json) nor a transformers "
                         "(config.json) model directory")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model, lambda texts: tok(texts, return_tensors="pt", padding=True, truncation=True,
                                                max_length=512),
                       lambda m, b: m(**b, **({"use_cache": False} if causal else {})))


def read_lines(path: str | None) -> list[str]:
    if path is None:
        from lowbit.demo import sentences

        return sentences(32)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text file at {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no text lines")
    return lines


# --- quantize -----------------------------------------------------------------------------------


def quantize_model(path: str, scheme: str, out: str, *, method: str = "rtn", observer: str = "minmax",
                   calibration: str | None = None, exclude=(), max_shard_size: str | None = None,
                   scale_dtype: torch.dtype | None = None) -> str:
    """``lowbit quantize``: the streaming quantizer (``lowbit.quantize_pretrained``) with
    calibration samples read from a text file, one per line, tokenized by the model's own
    tokenizer."""
    parsed = Scheme.parse(scheme)  # refuse a bad scheme before reading anything
    needs = method != "rtn" or parsed.static_activations
    if needs and calibration is None:
        raise ValueError(f"method {method!r} / scheme {scheme!r} needs --calibration (a text file)")
    batches = None
    if needs:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(path)
        batches = [dict(tok([t], return_tensors="pt", truncation=True, max_length=512)) for t in read_lines(calibration)]
    report = lowbit.quantize_pretrained(path, out, scheme, method=method, observer=observer, exclude=list(exclude),
                                        calibration=batches, max_shard_size=max_shard_size, scale_dtype=scale_dtype)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return f"{report}\nwrote {out} ({size / 2**20:.1f} MB of weights); load it with lowbit.load_pretrained({out!r})"


# --- export -------------------------------------------------------------------------------------


def _source_dtype(path: str) -> torch.dtype:
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else torch.float32


def _export_onnx(path: str, out: str, scheme: str | None, quantized: bool, accuracy_level: int, *,
                 method: str = "rtn", observer: str = "minmax", calibration: str | None = None, exclude=()) -> str:
    """``lowbit export --format onnx``: the model in float32, quantized in memory (an edge
    model fits), written as one ONNX file."""
    if quantized:
        model = lowbit.load_pretrained(path).float()
    else:
        parsed = Scheme.parse(scheme)
        loaded = load_model(path)
        model = loaded.model.float().eval()
        needs = method != "rtn" or parsed.static_activations
        batches = [loaded.encode([t]) for t in read_lines(calibration)] if needs else None
        lowbit.quantize(model, parsed, method=method, observer=observer, exclude=list(exclude), calibration=batches,
                        calibration_forward=loaded.forward, progress=False)
    return str(lowbit.export(model, out, "onnx", accuracy_level=accuracy_level))


def export_model(path: str, fmt: str, out: str, *, scheme: str | None = None, checkpoint_format: str = "gptq",
                 max_shard_size: str | None = None, accuracy_level: int = 4, **quantize_options) -> str:
    """``lowbit export``: a quantized directory (lowbit's, or another format's) converted to
    ``fmt``; or a float directory quantized first (``--scheme``; for the checkpoint formats
    streaming, with the scales rounded to the dtype the format stores them in, so that it
    holds them exactly)."""
    from lowbit import interop, pretrained

    if Path(out).exists() and (Path(out).is_file() or any(Path(out).iterdir())):
        raise FileExistsError(f"{out} exists; choose a new path")
    quantized = pretrained._quant_method(Path(path)) is not None
    if quantized and scheme is not None:
        raise ValueError(f"{path} is already quantized; drop --scheme to convert it as it is")
    if not quantized and scheme is None:
        raise ValueError(f"{path} is a float model: give --scheme (e.g. w4a16-g128-sym) to quantize it first")
    if fmt == "onnx":
        return _export_onnx(path, out, scheme, quantized, accuracy_level, **quantize_options)
    exporter = interop.format_for(fmt, checkpoint_format)
    if quantized:
        report = interop.export(lowbit.load_pretrained(path), out, fmt, source=path,
                                checkpoint_format=checkpoint_format, max_shard_size=max_shard_size)
        return str(report)
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lowbit-export-", dir=parent) as staging:
        summary = quantize_model(path, scheme, staging, max_shard_size=max_shard_size,
                                 scale_dtype=exporter.scale_dtype or _source_dtype(path), **quantize_options)
        report = interop.export(lowbit.load_pretrained(staging), out, fmt, source=path,
                                checkpoint_format=checkpoint_format, max_shard_size=max_shard_size)
    return f"{summary.splitlines()[0]}\n{report}"


# --- inspect ------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerNumerics:
    name: str
    scheme: str
    rel_error: float
    sqnr_db: float
    weight_error: float
    outlier_channels: int
    worst_channel_ratio: float


def inspect_model(path: str, scheme: str, *, checkpoint: str | None = None, texts: list[str] | None = None,
                  ) -> list[LayerNumerics]:
    """Each quantized layer's output error on its own float inputs (captured from the float
    model on ``texts``), so that one layer's error is not blamed on the layers before it."""
    Scheme.parse(scheme)
    loaded = load_model(path)
    float_model = loaded.model
    quant = copy.deepcopy(float_model)
    if checkpoint:
        lowbit.load(quant, checkpoint)
    else:
        lowbit.quantize(quant, scheme)
    qlayers = {n: m for n, m in quant.named_modules() if isinstance(m, QuantLinear)}
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in float_model.named_modules() if n in qlayers and isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            for t in texts or read_lines(None):
                loaded.forward(float_model, loaded.encode([t]))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    with torch.no_grad():
        for name, q in qlayers.items():
            f = float_model.get_submodule(name)
            if name not in inputs:
                continue
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
            yf, yq = f(x), q(x)
            err = (yq - yf).pow(2).sum().item()
            sig = yf.pow(2).sum().item()
            wq = q.to_linear().weight
            cmax = x.abs().amax(0)
            ratio = (cmax / cmax.median().clamp(min=1e-12))
            rows.append(LayerNumerics(name, str(q.scheme), math.sqrt(err / max(sig, 1e-30)),
                                      10 * math.log10(max(sig, 1e-30) / max(err, 1e-30)),
                                      ((wq - f.weight).norm() / f.weight.norm()).item(),
                                      int((ratio > 6).sum()), ratio.max().item()))
    return rows


def format_inspect(rows: list[LayerNumerics], threshold: float) -> str:
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'scheme':<12}{'rel err':>9}{'SQNR dB':>9}{'w err':>8}{'outliers':>9}"
             f"{'max/med':>9}  flag"]
    for r in rows:
        flag = "consider excluding" if r.sqnr_db < threshold else ""
        lines.append(f"{r.name:<{width}}  {r.scheme:<12}{r.rel_error:>9.4f}{r.sqnr_db:>9.1f}{r.weight_error:>8.4f}"
                     f"{r.outlier_channels:>9}{r.worst_channel_ratio:>9.1f}  {flag}")
    flagged = [r.name for r in rows if r.sqnr_db < threshold]
    lines.append(f"{len(rows)} layers; {len(flagged)} below {threshold:g} dB SQNR"
                 + (f": exclude=[{', '.join(repr(n) for n in flagged[:8])}]" if flagged else ""))
    lines.append("outliers: input channels whose max |x| exceeds 6x the median channel's")
    return "\n".join(lines)


def plot_inspect(rows: list[LayerNumerics], threshold: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    ax.bar(range(len(rows)), [r.sqnr_db for r in rows],
           color=["tab:red" if r.sqnr_db < threshold else "tab:blue" for r in rows])
    ax.axhline(threshold, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report -------------------------------------------------------------------------------------


@dataclasses.dataclass
class MemoryRow:
    scheme: str
    weight_bytes: int  # canonical quantized tensors (or float weights for "fp32"/"bf16")
    runtime_bytes: int  # the CPU backend's prepacked copy
    other_bytes: int  # parameters and buffers outside the Linear layers
    tokens_per_s: float | None

    @property
    def total(self) -> int:
        return self.weight_bytes + self.runtime_bytes + self.other_bytes


def _layer_memory(shape: tuple[int, int], scheme: str) -> tuple[int, int]:
    k, n = shape
    w = torch.randn(n, k) / k**0.5
    if scheme in ("fp32", "bf16"):
        return n * k * (4 if scheme == "fp32" else 2), 0
    s = Scheme.parse(scheme)
    act = torch.tensor([0.05]) if s.static_activations else None
    qw = lowbit.quantize_weight(w, s, act_scale=act)
    return qw.nbytes(), lowbit.choose_backend(s, "cpu").prepack(qw).nbytes()


def _time_layers(shapes: list[tuple[int, int]], scheme: str, tokens: int) -> float:
    """Seconds for one pass of ``tokens`` rows through one layer of each shape."""
    from lowbit.bench.timing import median_seconds

    total = 0.0
    for k, n in shapes:
        linear = nn.Linear(k, n)
        layer = linear.to(torch.bfloat16) if scheme == "bf16" else linear
        if scheme not in ("fp32", "bf16"):
            static = Scheme.parse(scheme).static_activations
            layer = QuantLinear.from_linear(linear, scheme, act_scale=torch.tensor([0.05]) if static else None)
        x = torch.randn(tokens, k, dtype=torch.bfloat16 if scheme == "bf16" else torch.float32)
        with torch.inference_mode():
            total += median_seconds(lambda _: layer(x), min_time=0.1)
    return total


def report_memory(*, path: str | None = None, shapes: str | None = None, blocks: int = 32,
                  schemes=("w8a8", "w4a16-g128"), tokens: int = 256, measure: bool = True) -> list[MemoryRow]:
    from lowbit.bench.shapes import parse_shapes

    if (path is None) == (shapes is None):
        raise ValueError("give a model directory or --shapes (not both)")
    for s in schemes:
        Scheme.parse(s)
    if path is not None:
        model = load_model(path).model
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        layer_shapes = [(m.in_features, m.out_features) for m in linears]
        linear_params = {id(m.weight) for m in linears}
        other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear_params)
        repeat = 1
    else:
        layer_shapes, other, repeat = parse_shapes(shapes), 0, blocks
    rows = []
    for scheme in ["fp32", "bf16", *schemes]:
        weight = runtime = 0
        for shape in dict.fromkeys(layer_shapes):
            count = layer_shapes.count(shape) * repeat
            w, r = _layer_memory(shape, scheme)
            weight, runtime = weight + w * count, runtime + r * count
        tps = None
        if measure:
            tps = tokens / (_time_layers(list(layer_shapes), scheme, tokens) * repeat)
        rows.append(MemoryRow(scheme, weight, runtime, other, tps))
    return rows


def format_report(rows: list[MemoryRow], price: float, tokens: int) -> str:
    gb = 1e9
    lines = [f"{'variant':<12}{'weights GB':>11}{'runtime GB':>11}{'other GB':>9}{'total GB':>9}  "
             f"{'fits on (weights <= 80% of memory)':<44}{'tok/s':>9}{'cost/Mtok':>10}"]
    for r in rows:
        fits = [name for name, mem in GPUS if r.weight_bytes + r.other_bytes <= WEIGHT_SHARE * mem * gb]
        cost = price / (r.tokens_per_s * 3600) * 1e6 if r.tokens_per_s else float("nan")
        tps = f"{r.tokens_per_s:>9.0f}" if r.tokens_per_s else f"{'-':>9}"
        lines.append(f"{r.scheme:<12}{r.weight_bytes / gb:>11.3f}{r.runtime_bytes / gb:>11.3f}{r.other_bytes / gb:>9.3f}"
                     f"{r.total / gb:>9.3f}  {(', '.join(fits) or 'none listed'):<44}{tps}{cost:>10.3f}")
    lines.append(f"runtime: the CPU backend's prepacked copy of the weights, held beside the canonical ones. "
                 f"tok/s: the model's Linear layers, {tokens} tokens per batch, measured now on this CPU "
                 f"({torch.get_num_threads()} threads); cost/Mtok at {price:g} per hour.")
    return "\n".join(lines)


# --- the command-line entry points (lowbit.cli) ------------------------------------------------


def quantize(args) -> str:
    return quantize_model(args.model, args.scheme, args.out, method=args.method, observer=args.observer,
                          calibration=args.calibration, exclude=args.exclude, max_shard_size=args.shard_size)


def export(args) -> str:
    import warnings

    from lowbit.interop import EngineWarning

    with warnings.catch_warnings():  # the report lists them
        warnings.simplefilter("ignore", EngineWarning)
        return export_model(args.model, args.format, args.out, scheme=args.scheme,
                            checkpoint_format=args.checkpoint_format, accuracy_level=args.accuracy_level,
                            max_shard_size=args.shard_size, method=args.method, observer=args.observer,
                            calibration=args.calibration, exclude=args.exclude)


def inspect(args) -> str:
    if str(args.model).endswith(".onnx"):
        from lowbit.interop.onnx import check_onnx

        found = check_onnx(args.model)
        if not found:
            return f"{args.model}: no integer matmul that gives wrong answers on some CPUs"
        return "\n".join(f"warning: {line}" for line in found)
    rows = inspect_model(args.model, args.scheme, checkpoint=args.checkpoint,
                         texts=read_lines(args.texts) if args.texts else None)
    if args.plot:
        plot_inspect(rows, args.sqnr_threshold, args.plot)
    return format_inspect(rows, args.sqnr_threshold)


def report(args) -> str:
    start = time.perf_counter()
    rows = report_memory(path=args.model, shapes=args.shapes, blocks=args.blocks, schemes=args.schemes,
                         tokens=args.tokens, measure=not args.no_measure)
    return format_report(rows, args.price, args.tokens) + f"\n({time.perf_counter() - start:.1f} s)"
