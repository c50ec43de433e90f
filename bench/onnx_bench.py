"""lowbit's ONNX exports against onnxruntime's own quantizers, in onnxruntime.

For all-MiniLM-L6-v2 (the sentence-transformers pipeline up to the normalized embedding)
and the byte-level LM of ``bench/tinylm.py``: the fp32 model exported to ONNX, quantized by
onnxruntime's tools (``quantize_dynamic``, per-channel int8 weights with dynamic uint8
activations; ``MatMulNBitsQuantizer``, int4 blocks of 128, asymmetric), against lowbit's
exports (RTN and calibrated: SmoothQuant for W8A8 with per-token and with static per-tensor
activations, GPTQ for W4A16). Every file runs in
onnxruntime (CPU, ``--threads`` intra-op threads) at MatMulNBits accuracy level 4 (int8
compute, onnxruntime's fast path and its quantizer's setting here); timings are medians of
interleaved runs. Fidelity: MiniLM, cosine of the embeddings to the PyTorch fp32 model's on
128 sentences (calibration on 256 others); the LM, perplexity on its held-out bytes.

With ``--op-profile``, the MiniLM table is followed by onnxruntime's own profile of the int8
files at 16 sentences: milliseconds per run in each op type.

A third table measures MiniLM for the edge: W4A16 Linear layers with the embedding tables
quantized too (int8 per row, int4 per group), file size and one-sentence latency.

    python bench/onnx_bench.py [--threads 1] [--only minilm|lm|edge] [--work DIR] [--op-profile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowbit  # noqa: E402
import tinylm  # noqa: E402
from lowbit import demo  # noqa: E402
from lowbit.calibrate import GPTQ, SmoothQuant  # noqa: E402

LOWBIT_ROWS = [("lowbit W8A8, RTN", "w8a8", {}),
               ("lowbit W8A8, SmoothQuant 0.5", "w8a8", {"method": SmoothQuant(0.5)}),
               ("lowbit W8A8-static, SmoothQuant auto", "w8a8-static", {"method": SmoothQuant("auto")}),
               ("lowbit W4A16 g128, RTN", "w4a16-g128", {}),
               ("lowbit W4A16 g128, GPTQ act-order", "w4a16-g128", {"method": GPTQ(act_order=True)})]


def ort_int8(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def ort_int4(fp32: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=128, is_symmetric=False, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: arrays[i.name] for i in sess.get_inputs()}


def timed(sessions: dict[str, ort.InferenceSession], inputs: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median ms per run of each session, interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        sess.run(None, feed(sess, inputs))  # warm-up
    for _ in range(rounds):
        for name, sess in sessions.items():
            args = feed(sess, inputs)
            start = time.perf_counter()
            sess.run(None, args)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def _quantized(model, scheme, kw, calibration, forward):
    q = copy.deepcopy(model)
    extra = {"calibration": calibration, "calibration_forward": forward} if "method" in kw else {}
    lowbit.quantize(q, scheme, progress=False, **kw, **extra)
    return q


def _files(work: Path, model, example_inputs, calibration, forward) -> dict[str, Path]:
    """Every variant's ONNX file: fp32, onnxruntime's int8 / int4, lowbit's."""
    files = {"fp32": work / "fp32.onnx"}
    lowbit.export(model, files["fp32"], "onnx", example_inputs=example_inputs)
    files["onnxruntime int8 (quantize_dynamic, per channel)"] = ort_int8(files["fp32"], work / "ort-int8.onnx")
    files["onnxruntime int4 (MatMulNBitsQuantizer, g128)"] = ort_int4(files["fp32"], work / "ort-int4.onnx")
    for label, scheme, kw in LOWBIT_ROWS:
        path = work / (label.replace(" ", "_").replace(",", "") + ".onnx")
        lowbit.export(_quantized(model, scheme, kw, calibration, forward), path, "onnx",
                      example_inputs=example_inputs, accuracy_level=4)
        files[label] = path
    return files


PROFILED = ("onnxruntime int8 (quantize_dynamic, per channel)", "lowbit W8A8, RTN")


def op_profile(path: Path, inputs: dict[str, np.ndarray], threads: int, work: Path, runs: int = 10) -> dict[str, float]:
    """Milliseconds per run spent in each op type, from onnxruntime's profiler."""
    import json

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"profile-{path.stem}")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sess.run(None, feed(sess, inputs))  # warm-up, profiled too: taken out below
    for _ in range(runs):
        sess.run(None, feed(sess, inputs))
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 1)
    totals: dict[str, float] = {}
    for e in kernels[per_run:]:  # the warm-up run's nodes come first
        totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return totals


def minilm(work: Path, threads: int, rounds: int, profile: bool = False) -> str:
    model = demo.load_sentence_model().float().eval()
    eval_texts = demo.sentences(128)
    calibration_texts = demo.sentences(256, offset=400)
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    calibration = [tokenize([t]) for t in calibration_texts]
    reference = model.encode(eval_texts, convert_to_numpy=True)
    files = _files(work, model, None, calibration, lambda m, f: m(dict(f)))
    batch = {k: v.astype(np.int64) for k, v in model.tokenizer(eval_texts, return_tensors="np", padding=True).items()}
    one = {k: v.astype(np.int64) for k, v in model.tokenizer(eval_texts[:1], return_tensors="np").items()}
    sixteen = {k: v.astype(np.int64) for k, v in
               model.tokenizer(eval_texts[:16], return_tensors="np", padding=True).items()}
    sessions = {name: session(path, threads) for name, path in files.items()}
    fast_one, fast_16 = timed(sessions, one, rounds), timed(sessions, sixteen, max(3, rounds // 4))
    lines = [f"MiniLM, {threads} thread(s): cosine to the PyTorch fp32 embeddings on 128 sentences; ms for one "
             f"sentence ({one['input_ids'].shape[1]} tokens) and for 16 (padded to {sixteen['input_ids'].shape[1]})",
             "", "| model | MB | mean cos | worst cos | ms, 1 sentence | ms, 16 sentences |",
             "|---|---|---|---|---|---|"]
    for name, sess in sessions.items():
        out = sess.run(None, feed(sess, batch))[0]
        cos = (out * reference).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(reference, axis=-1)
        lines.append(f"| {name} | {files[name].stat().st_size / 2**20:.1f} | {cos.mean():.4f} | {cos.min():.4f} | "
                     f"{fast_one[name]:.2f} | {fast_16[name]:.1f} |")
    if profile:
        split = {name: op_profile(files[name], sixteen, threads, work) for name in PROFILED}
        ops = sorted({op for t in split.values() for op in t},
                     key=lambda op: -max(t.get(op, 0) for t in split.values()))
        lines += ["", f"onnxruntime's profile, 16 sentences, ms per run in each op type ({threads} thread(s)):", "",
                  "| op | " + " | ".join(PROFILED) + " |", "|---|" + "---:|" * len(PROFILED)]
        lines += [f"| {op} | " + " | ".join(f"{split[n].get(op, 0):.2f}" for n in PROFILED) + " |" for op in ops]
        lines.append("| all ops | " + " | ".join(f"{sum(split[n].values()):.2f}" for n in PROFILED) + " |")
    return "\n".join(lines)


def lm(work: Path, threads: int, rounds: int) -> str:
    model = tinylm.load_or_train().float().eval()
    train, held = tinylm.corpus()
    windows = tinylm.windows(train, 64, 128, seed=123)[:, :-1]
    calibration = list(windows.split(8))
    example = (torch.zeros(1, 128, dtype=torch.long),)
    files = _files(work, model, example, calibration, None)
    sessions = {name: session(path, threads) for name, path in files.items()}
    n = 40
    data = held[: n * 128 + 1]
    x = torch.stack([data[i * 128: (i + 1) * 128] for i in range(n)])
    y = torch.stack([data[i * 128 + 1: (i + 1) * 128 + 1] for i in range(n)])
    speed = timed(sessions, {sessions["fp32"].get_inputs()[0].name: x[:1].numpy()}, rounds)
    lines = [f"The LM of bench/tinylm.py, {threads} thread(s): perplexity on {n} held-out windows of 128 bytes; ms "
             "for one window", "", "| model | MB | perplexity | ms, 128 tokens |", "|---|---|---|---|"]
    with torch.no_grad():
        torch_ppl = torch.exp(torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))).item()
    for name, sess in sessions.items():
        logits = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        ppl = torch.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))).item()
        lines.append(f"| {name} | {files[name].stat().st_size / 2**20:.2f} | {ppl:.3f} | {speed[name]:.2f} |")
    lines.append(f"\n(PyTorch fp32 on the same windows: perplexity {torch_ppl:.3f}.)")
    return "\n".join(lines)


EDGE_ROWS = [("W4A16 g128 Linear, fp32 embeddings", None), ("W4A16 g128 Linear, int8 embeddings", "w8a16"),
             ("W4A16 g128 Linear, int4 g64 embeddings", "w4a16-g64"),
             ("W4A16 g128 Linear, int4 g32 embeddings", "w4a16-g32")]


def edge(work: Path, threads: int, rounds: int) -> str:
    """MiniLM for the edge: the file size and one-sentence latency with the embedding
    tables quantized too (GPTQ on the Linear layers), beside the fp32 export."""
    model = demo.load_sentence_model().float().eval()
    eval_texts = demo.sentences(128)
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    calibration = [tokenize([t]) for t in demo.sentences(256, offset=400)]
    reference = model.encode(eval_texts, convert_to_numpy=True)
    files = {"fp32": work / "fp32.onnx"}
    lowbit.export(model, files["fp32"], "onnx")
    for label, embeddings in EDGE_ROWS:
        q = copy.deepcopy(model)
        lowbit.quantize(q, "w4a16-g128", method=GPTQ(act_order=True), calibration=calibration,
                        calibration_forward=lambda m, f: m(dict(f)), embeddings=embeddings, progress=False)
        files[label] = work / f"edge-{embeddings}.onnx"
        lowbit.export(q, files[label], "onnx")
    sessions = {name: session(path, threads) for name, path in files.items()}
    one = {k: v.astype(np.int64) for k, v in model.tokenizer(eval_texts[:1], return_tensors="np").items()}
    batch = {k: v.astype(np.int64) for k, v in model.tokenizer(eval_texts, return_tensors="np", padding=True).items()}
    speed = timed(sessions, one, rounds)
    lines = [f"MiniLM for the edge, {threads} thread(s), GPTQ act-order on the Linear layers, accuracy level 4: "
             f"file size, cosine to the PyTorch fp32 embeddings (128 sentences), ms for one sentence "
             f"({one['input_ids'].shape[1]} tokens)", "", "| model | MB | mean cos | ms, 1 sentence |",
             "|---|---|---|---|"]
    for name, sess in sessions.items():
        out = sess.run(None, feed(sess, batch))[0]
        cos = (out * reference).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(reference, axis=-1)
        lines.append(f"| {name} | {files[name].stat().st_size / 2**20:.1f} | {cos.mean():.4f} | {speed[name]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--only", choices=["minilm", "lm", "edge"])
    parser.add_argument("--work", help="where the ONNX files go (default: a new temporary directory)")
    parser.add_argument("--op-profile", action="store_true", help="add onnxruntime's per-op profile of the int8 files")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-onnx-"))
    for name, table in (("minilm", functools.partial(minilm, profile=args.op_profile)), ("lm", lm), ("edge", edge)):
        if args.only in (None, name):
            (work / name).mkdir(parents=True, exist_ok=True)
            print(table(work / name, args.threads, args.rounds) + "\n", flush=True)


if __name__ == "__main__":
    main()
