"""GPTQModel as an independent writer and reader of GPTQ and AWQ checkpoints, run by
tests/test_interop.py with the Python of GPTQModel's own venv (see the Makefile: installed
beside peft it changes peft's behaviour; it also sets process-wide allocator and thread
settings on import). One process runs every job, so its import (seconds) is paid once.

    python gptqmodel_client.py JOBS.json

JOBS.json holds {"ids": path of int64 token ids, "jobs": [...]}, each job one of
    {"quantize": FLOAT_DIR, "out": DIR, "method": "gptq"|"awq", "group": G, "sym": bool,
     "desc_act": bool}
        GPTQModel's own quantizer writes DIR (checkpoint format "gptq", v1).
    {"dequantize": QUANT_DIR, "out": FILE.pt, "method": "gptq"|"awq"}
        GPTQModel loads QUANT_DIR (its torch kernels, float16) and saves each quantized
        layer's dequantized weight [N, K] and the logits on the token ids.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default pool wants more workers than 2 cores give

import torch  # noqa: E402


def quantize(job: dict) -> None:
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig, GPTQConfig

    fields = {"bits": 4, "group_size": job["group"], "sym": job["sym"]}
    if job["method"] == "gptq":
        config = GPTQConfig(**fields, desc_act=job["desc_act"])
    else:
        config = AWQConfig(**fields)
    model = GPTQModel.load(job["quantize"], config, device="cpu")
    texts = [f"sample {i}: the quick brown fox jumps over the lazy dog, then runs {i} laps" for i in range(16)]
    model.quantize(texts, batch_size=4)
    model.save(job["out"])


def dequantize(job: dict, ids: torch.Tensor) -> None:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    backend = BACKEND.GPTQ_TORCH if job["method"] == "gptq" else BACKEND.AWQ_TORCH
    model = GPTQModel.load(job["dequantize"], device="cpu", backend=backend, dtype=torch.float16)
    weights = {}
    for name, module in model.model.named_modules():
        # Both dequantizers give [K, N], the packed layouts' orientation.
        if hasattr(module, "dequantize_weight"):  # GPTQ layers
            w = module.dequantize_weight()
        elif hasattr(module, "qzeros"):  # AWQ layers: the AWQ GEMM layout's own dequantizer
            w = dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size)
        else:
            continue
        weights[name] = w.t().contiguous()
    with torch.no_grad():
        logits = model.model(ids).logits
    torch.save({"weights": weights, "logits": logits}, job["out"])


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    ids = torch.load(spec["ids"])
    for job in spec["jobs"]:
        quantize(job) if "quantize" in job else dequantize(job, ids)


if __name__ == "__main__":
    main()
