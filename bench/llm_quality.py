"""Quality of lowbit's schemes on a real (small) LM: greedy continuations and perplexity.

The byte-level LM of ``bench/tinylm.py`` (trained once on CPython's pydoc text, cached).
20 prompts of 32 bytes from the held-out 10% of the text; each model continues them
greedily for 64 bytes. Two agreements with the fp32 model:

- free-running: the share of positions where the quantized model's own continuation has
  fp32's byte (after a first difference the two texts go apart, so this is strict);
- teacher-forced: the share of positions where its next-byte choice, given fp32's text so
  far, is fp32's choice.

Perplexity per byte over the held-out text, as in the calibration table
(``bench/calibration.py``). GPTQ and SmoothQuant calibrate on 128 windows of the training
90%.

    python bench/llm_quality.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowbit  # noqa: E402
import tinylm  # noqa: E402
from lowbit.calibrate import GPTQ, SmoothQuant  # noqa: E402

PROMPTS, PROMPT_BYTES, NEW_BYTES = 20, 32, 64

ROWS = [
    ("W8A8, RTN", "w8a8", {}),
    ("W8A8, SmoothQuant 0.5", "w8a8", {"method": SmoothQuant(0.5)}),
    ("W8A8, SmoothQuant auto", "w8a8", {"method": SmoothQuant("auto")}),
    ("W8A16, RTN", "w8a16", {}),
    ("W4A16 g128, RTN", "w4a16-g128", {}),
    ("W4A16 g128, GPTQ act-order", "w4a16-g128", {"method": GPTQ(act_order=True)}),
    ("W4A16 g32, GPTQ act-order", "w4a16-g32", {"method": GPTQ(act_order=True)}),
]


@torch.no_grad()
def continue_greedily(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    ids = prompts
    for _ in range(new):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:]


@torch.no_grad()
def teacher_forced(model, prompts: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """The model's next-byte choices along ``prompts + continuation``."""
    text = torch.cat([prompts, continuation], dim=1)
    return model(text[:, :-1])[:, prompts.shape[1] - 1:].argmax(-1)


def main() -> None:
    torch.set_num_threads(2)
    cfg = tinylm.Config()
    model = tinylm.load_or_train(cfg)
    train, held_out = tinylm.corpus()
    prompts = tinylm.windows(held_out, PROMPTS, PROMPT_BYTES - 1, seed=7)
    calibration = list(tinylm.windows(train, 128, cfg.context, seed=1)[:, :-1].split(8))
    reference = continue_greedily(model, prompts, NEW_BYTES)
    base = tinylm.perplexity(model, held_out, cfg.context)
    print(f"Byte-level LM (bench/tinylm.py), {PROMPTS} held-out prompts of {PROMPT_BYTES} bytes, greedy "
          f"continuations of {NEW_BYTES} bytes against fp32\n")
    print("| model | free-running agreement | teacher-forced agreement | perplexity |")
    print("|---|---:|---:|---:|")
    print(f"| fp32 | 100.0% | 100.0% | {base:.3f} |")
    for label, scheme, kw in ROWS:
        q = copy.deepcopy(model)
        lowbit.quantize(q, scheme, progress=False, **kw, **({"calibration": calibration} if kw else {}))
        free = (continue_greedily(q, prompts, NEW_BYTES) == reference).float().mean().item()
        forced = (teacher_forced(q, prompts, reference) == reference).float().mean().item()
        print(f"| {label} | {free:.1%} | {forced:.1%} | {tinylm.perplexity(q, held_out, cfg.context):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
