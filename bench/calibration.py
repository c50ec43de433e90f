"""Calibration benchmark: what GPTQ, AWQ, SmoothQuant and the observers win back over
round-to-nearest, on real text.

(a) all-MiniLM-L6-v2 embedding fidelity: calibration on sentences of
    ``pydoc_data.topics`` (one sentence per batch, so no padding enters the statistics),
    evaluation on a disjoint set; mean and worst cosine to the fp32 embeddings, and the
    share of sentences whose nearest neighbour (among the evaluation set) is unchanged.
(b) Perplexity of a small byte-level causal LM (``bench/tinylm.py``, trained once on the
    same corpus and cached) on held-out text, in the style of the GPTQ/AWQ papers' tables.

    python bench/calibration.py                 # both tables
    python bench/calibration.py --only lm       # or minilm
    python bench/calibration.py --quick         # fewer calibration/evaluation samples
    python bench/calibration.py --match GPTQ    # only the variants whose label has this
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tinylm  # noqa: E402

import lowbit  # noqa: E402
from lowbit.calibrate import AWQ, GPTQ, SmoothQuant  # noqa: E402

# The W4A16 rows both models are measured on.
W4_ROWS = [
    ("W4A16 g128, RTN", "w4a16-g128", {}),
    ("W4A16 g128, GPTQ", "w4a16-g128", {"method": GPTQ()}),
    ("W4A16 g128, GPTQ act-order", "w4a16-g128", {"method": GPTQ(act_order=True)}),
    ("W4A16 g128, AWQ", "w4a16-g128", {"method": AWQ()}),
    ("W4A16 g32, RTN", "w4a16-g32", {}),
    ("W4A16 g32, GPTQ act-order", "w4a16-g32", {"method": GPTQ(act_order=True)}),
]

# (label, scheme, keywords for lowbit.quantize); calibration data is added where needed.
MINILM_ROWS = [
    ("W8A8 dynamic, RTN", "w8a8", {}),
    ("W8A8 dynamic, SmoothQuant a=0.5", "w8a8", {"method": SmoothQuant(0.5)}),
    ("W8A8 dynamic, SmoothQuant a=auto", "w8a8", {"method": SmoothQuant("auto")}),
    ("W8A8 static, min-max", "w8a8-static", {"observer": "minmax"}),
    ("W8A8 static, moving min-max", "w8a8-static", {"observer": "moving_minmax"}),
    ("W8A8 static, percentile 99.99", "w8a8-static", {"observer": "percentile"}),
    ("W8A8 static, MSE", "w8a8-static", {"observer": "mse"}),
    ("W8A8 static, KL", "w8a8-static", {"observer": "kl"}),
    ("W8A8 static, SmoothQuant a=0.5 + MSE", "w8a8-static", {"method": SmoothQuant(0.5), "observer": "mse"}),
    ("W8A8 static, SmoothQuant a=0.8 + min-max", "w8a8-static", {"method": SmoothQuant(0.8), "observer": "minmax"}),
    ("W8A8 static, SmoothQuant a=0.8 + MSE", "w8a8-static", {"method": SmoothQuant(0.8), "observer": "mse"}),
    ("W8A8 static, SmoothQuant a=auto + min-max", "w8a8-static",
     {"method": SmoothQuant("auto"), "observer": "minmax"}),
    *W4_ROWS,
]

LM_ROWS = [
    *W4_ROWS,
    ("W4A16 g32, AWQ", "w4a16-g32", {"method": AWQ()}),
    ("W8A8 dynamic, RTN", "w8a8", {}),
    ("W8A8 dynamic, SmoothQuant a=0.5", "w8a8", {"method": SmoothQuant(0.5)}),
    ("W8A8 static, min-max", "w8a8-static", {"observer": "minmax"}),
    ("W8A8 static, MSE", "w8a8-static", {"observer": "mse"}),
    ("W8A8 static, SmoothQuant a=0.5 + min-max", "w8a8-static", {"method": SmoothQuant(0.5), "observer": "minmax"}),
    ("W8A8 static, SmoothQuant a=0.5 + MSE", "w8a8-static", {"method": SmoothQuant(0.5), "observer": "mse"}),
    ("W8A8 dynamic, SmoothQuant a=auto", "w8a8", {"method": SmoothQuant("auto")}),
    ("W8A8 static, SmoothQuant a=auto + min-max", "w8a8-static",
     {"method": SmoothQuant("auto"), "observer": "minmax"}),
]


def _needs_calibration(scheme: str, kw: dict) -> bool:
    return "method" in kw or lowbit.Scheme.parse(scheme).static_activations


def _quantize(model, scheme, kw, calibration, forward=None):
    q = copy.deepcopy(model)
    start = time.perf_counter()
    extra = {"calibration": calibration, "calibration_forward": forward} if _needs_calibration(scheme, kw) else {}
    report = lowbit.quantize(q, scheme, progress=False, **kw, **extra)
    return q, report, time.perf_counter() - start


def _memory(report) -> str:
    c = report.calibration
    if c is None or not c.sequential:
        return "-"
    return f"{c.peak_state_bytes / 2**20:.1f} / {2 * (c.block_weight_bytes + c.block_activation_bytes) / 2**20:.1f}"


# --- (a) MiniLM -----------------------------------------------------------------------------------


def minilm_table(n_cal: int = 512, n_eval: int = 128) -> str:
    from lowbit import demo

    model = demo.load_sentence_model()
    eval_texts = demo.sentences(n_eval, offset=0)
    cal_texts = demo.sentences(n_cal, offset=max(n_eval, 400))  # disjoint from the evaluation set
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    calibration = [tokenize([t]) for t in cal_texts]

    def forward(m, features):
        return m(dict(features))

    reference = demo.encode(model, eval_texts)
    ref_nn = _nearest(reference)
    lines = [
        f"MiniLM (all-MiniLM-L6-v2): {n_cal} calibration sentences, {n_eval} disjoint evaluation sentences, "
        f"{torch.get_num_threads()} threads",
        "",
        "| variant | mean cos | worst cos | same nearest neighbour | calibration s | layer-wise peak / budget MB |",
        "|---|---|---|---|---|---|",
    ]
    for label, scheme, kw in MINILM_ROWS:
        q, report, seconds = _quantize(model, scheme, kw, calibration, forward)
        emb = demo.encode(q, eval_texts)
        cos = demo.cosine_to(reference, emb)
        agree = (_nearest(emb) == ref_nn).float().mean().item()
        lines.append(f"| {label} | {cos.mean():.4f} | {cos.min():.4f} | {agree:.1%} | {seconds:.1f} | {_memory(report)} |")
        print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.argmax(dim=1)


# --- (b) the small LM -----------------------------------------------------------------------------


def lm_table(n_cal: int = 128, max_windows: int | None = None) -> str:
    cfg = tinylm.Config()
    model = tinylm.load_or_train(cfg)
    train, held_out = tinylm.corpus()
    windows = tinylm.windows(train, n_cal, cfg.context, seed=1)[:, :-1]
    calibration = list(windows.split(8))
    base = tinylm.perplexity(model, held_out, cfg.context, max_windows)
    lines = [
        f"Byte-level LM ({cfg.layers} x {cfg.dim}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters, bench/tinylm.py): perplexity per byte on the held-out 10% of pydoc_data.topics; "
        f"{n_cal} calibration windows of {cfg.context} bytes from the training 90%",
        "",
        "| variant | perplexity | increase over fp32 | calibration s | layer-wise peak / budget MB |",
        "|---|---|---|---|---|",
        f"| fp32 | {base:.4f} | - | - | - |",
    ]
    for label, scheme, kw in LM_ROWS:
        q, report, seconds = _quantize(model, scheme, kw, calibration)
        ppl = tinylm.perplexity(q, held_out, cfg.context, max_windows)
        lines.append(f"| {label} | {ppl:.4f} | {ppl - base:+.4f} ({(ppl / base - 1):+.2%}) | {seconds:.1f} | "
                     f"{_memory(report)} |")
        print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["minilm", "lm"])
    parser.add_argument("--quick", action="store_true", help="fewer calibration and evaluation samples")
    parser.add_argument("--match", default="", help="only the variants whose label contains this text")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    global MINILM_ROWS, LM_ROWS
    MINILM_ROWS = [r for r in MINILM_ROWS if args.match in r[0]]
    LM_ROWS = [r for r in LM_ROWS if args.match in r[0]]
    out = []
    if args.only in (None, "minilm"):
        out.append(minilm_table(*((128, 64) if args.quick else (512, 128))))
    if args.only in (None, "lm"):
        out.append(lm_table(*((32, 64) if args.quick else (128, None))))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
