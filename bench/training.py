"""Training through quantized layers: what LoRA on a W4A16 base and quantization-aware
training win back over post-training quantization, and what a LoRA step costs.

(a) Perplexity of the byte-level LM of ``bench/tinylm.py`` on its held-out text (the last
    10% of the pydoc corpus): fp32, W4A16 g128 by round-to-nearest and by GPTQ, the RTN
    model with LoRA adapters trained on the training text (adapters from zero, and from the
    quantization error's truncated SVD), the RTN model with LoRA distilled from the fp32
    model on the training text (the adapters learn what quantization lost, nothing else),
    and QAT from the fp32 model.
(b) A LoRA training step (rank 16 on every layer, batch 4 x 128 tokens) over a stack of four
    4096 x 4096 layers: the base in bf16 against the base in W4A16 g128 — bytes held, peak
    resident growth during the step, and time per step.

    python bench/training.py            # both
    python bench/training.py --only lm  # or step
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tinylm  # noqa: E402

import lowbit  # noqa: E402
from lowbit import lora, qat  # noqa: E402
from lowbit.bench.memory import live_tensor_bytes  # noqa: E402
from lowbit.calibrate import GPTQ  # noqa: E402
from lowbit.calibrate.rss import RssPeak  # noqa: E402

SCHEME = "w4a16-g128"
EVAL_WINDOWS = 160


def lm_loss(model, batch, teacher=None):
    """Next-byte cross-entropy, or with ``teacher`` the KL divergence from the teacher's
    next-byte distribution (distillation: the student learns to compute the teacher)."""
    logits = model(batch[:, :-1]).reshape(-1, 256)
    if teacher is None:
        return nn.functional.cross_entropy(logits, batch[:, 1:].reshape(-1))
    with torch.no_grad():
        target = nn.functional.log_softmax(teacher(batch[:, :-1]).reshape(-1, 256), dim=-1)
    return nn.functional.kl_div(nn.functional.log_softmax(logits, dim=-1), target, log_target=True,
                                reduction="batchmean")


def fit(model, train_data, steps, lr, seed, batch=16, context=128, teacher=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for step in range(steps):
        loss = lm_loss(model, tinylm.windows(train_data, batch, context, seed=seed + step), teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return model.eval()


def perplexity_table(lora_steps: int, qat_steps: int) -> None:
    """Each quantized model beside a float control trained the same way: the small LM is not
    trained to convergence, so any further training lowers its perplexity, and what a
    method wins back is its quantization cost measured against that control."""
    base = tinylm.load_or_train()
    train_data, held = tinylm.corpus()
    ppl = lambda m: tinylm.perplexity(m, held, max_windows=EVAL_WINDOWS)  # noqa: E731
    fp32 = ppl(base)
    rtn = copy.deepcopy(base)
    lowbit.quantize(rtn, SCHEME, progress=False)
    calibration = [tinylm.windows(train_data, 4, 128, seed=7000 + i)[:, :-1] for i in range(16)]
    gptq = copy.deepcopy(base)
    lowbit.quantize(gptq, SCHEME, method=GPTQ(act_order=True), calibration=calibration, progress=False)

    def with_lora(model, include_float, reference=None, teacher=None):
        adapted = copy.deepcopy(model)
        torch.manual_seed(40_000)  # A's random start: the same in every row and every run
        lora.add_lora(adapted, r=16, alpha=32, include_float=include_float, reference=reference)
        t0 = time.perf_counter()
        fit(adapted, train_data, lora_steps, lr=2e-3, seed=50_000, teacher=teacher)
        return adapted, time.perf_counter() - t0

    float_lora, _ = with_lora(base, True)
    rtn_lora, lora_time = with_lora(rtn, False)
    svd_lora, _ = with_lora(rtn, False, reference=base)
    svd_start = copy.deepcopy(rtn)
    lora.add_lora(svd_start, r=16, alpha=32, reference=base)
    distilled, distill_time = with_lora(rtn, False, reference=base, teacher=base.eval())
    tuned = fit(copy.deepcopy(base), train_data, qat_steps, lr=3e-4, seed=90_000)
    trained = copy.deepcopy(base)
    qat.prepare(trained, SCHEME)
    t0 = time.perf_counter()
    fit(trained, train_data, qat_steps, lr=3e-4, seed=90_000)
    qat_time = time.perf_counter() - t0
    qat.convert(trained)

    rtn_cost = ppl(rtn) - fp32
    rows = [("fp32", fp32, None, ""),
            (f"{SCHEME}, RTN", ppl(rtn), fp32, ""),
            (f"{SCHEME}, GPTQ act-order", ppl(gptq), fp32, "64 calibration windows"),
            ("fp32 + LoRA r16 (control)", ppl(float_lora), None, f"{lora_steps} steps on the training text"),
            (f"{SCHEME}, RTN + LoRA r16", ppl(rtn_lora), ppl(float_lora), f"same recipe, {lora_time:.0f} s"),
            (f"{SCHEME}, RTN + LoRA r16 from the error's SVD", ppl(svd_lora), ppl(float_lora),
             "same recipe, adapters start at W - Q's rank-16 SVD"),
            (f"{SCHEME}, RTN + that SVD start, untrained", ppl(svd_start), fp32, "no training"),
            (f"{SCHEME}, RTN + LoRA r16 distilled from fp32", ppl(distilled), fp32,
             f"SVD start, {lora_steps} steps of KL to fp32's next-byte distribution, {distill_time:.0f} s"),
            ("fp32 fine-tuned (control)", ppl(tuned), None, f"{qat_steps} steps, the QAT recipe without fake quant"),
            (f"{SCHEME}, QAT", ppl(trained), ppl(tuned), f"{qat_steps} steps from the fp32 model, {qat_time:.0f} s")]
    print(f"Held-out perplexity of bench/tinylm.py ({EVAL_WINDOWS} windows of 128 bytes); cost = perplexity - "
          "its float control's; recovered = the share of RTN's cost won back:\n")
    print("| model | perplexity | quantization cost | of RTN's cost recovered | note |")
    print("|---|---|---|---|---|")
    for label, value, control, note in rows:
        cost = recovered = ""
        if control is not None:
            cost = f"{value - control:+.3f}"
            recovered = f"{1 - (value - control) / rtn_cost:.0%}"
        print(f"| {label} | {value:.3f} | {cost} | {recovered} | {note} |")


def step_cost(steps: int = 5) -> None:
    print("\nOne LoRA training step (rank 16 on each layer; batch 4 x 128 tokens; four 4096 x 4096 layers):\n")
    print("| base | bytes held | peak growth in the step | ms per step |")
    print("|---|---|---|---|")
    for label in ("bf16", SCHEME):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(4)]).to(torch.bfloat16)
        if label != "bf16":
            lowbit.quantize(model, label, progress=False)
        lora.add_lora(model, r=16, alpha=32, include_float=label == "bf16")
        x = torch.randn(4, 128, 4096, dtype=torch.bfloat16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = model(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up: optimizer state and allocator
        held = live_tensor_bytes()
        times = []
        with RssPeak() as peak:
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        times.sort()
        print(f"| {label} | {held / 2**20:.0f} MB | {peak.delta / 2**20:.0f} MB | {1e3 * times[len(times) // 2]:.0f} |")
        del model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["lm", "step"])
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--qat-steps", type=int, default=300)
    a = parser.parse_args()
    if a.only != "step":
        perplexity_table(a.lora_steps, a.qat_steps)
    if a.only != "lm":
        step_cost()


if __name__ == "__main__":
    main()
