"""A small causal transformer language model for calibration benchmarks.

Byte-level (vocabulary 256), pre-LayerNorm, 4 blocks of width 256 (4 heads, MLP 1024),
context 128, trained once on the English text of CPython's ``pydoc_data.topics`` (the
first 90% of it; the last 10% is held out for perplexity). Training takes a few minutes
on two CPU cores; the weights are cached under ``$LOWBIT_CACHE`` (default
``~/.cache/lowbit``) keyed by the configuration, so later runs load them.

Every Linear layer's in_features is a multiple of 128, so each scheme (up to
w4a16-g128) applies to all of them, the head included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time

import torch
from torch import nn
from tqdm import tqdm

from lowbit import plan


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 256
    dim: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 128
    steps: int = 700
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.fc2 = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors of the pydoc topics text."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``length + 1`` bytes (inputs and next-byte targets)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (count,), generator=g)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def train(cfg: Config, progress: bool = True) -> TinyLM:
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg)
    data, _ = corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = cfg.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    bar = tqdm(range(cfg.steps), desc="training the benchmark LM", disable=None if progress else True)
    for step in bar:
        batch = windows(data, cfg.batch, cfg.context, seed=cfg.seed * 100003 + step)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def load_or_train(cfg: Config = Config(), progress: bool = True) -> TinyLM:
    path = plan.cache_dir() / f"tinylm-{cfg.key()}.pt"
    if path.exists():
        model = TinyLM(cfg)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    model = train(cfg, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    if progress:
        print(f"trained in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, context: int = 128, max_windows: int | None = None) -> float:
    """Per-byte perplexity over consecutive non-overlapping windows of the held-out bytes."""
    n = (len(data) - 1) // context
    if max_windows is not None:
        n = min(n, max_windows)
    inputs = torch.stack([data[i * context : (i + 1) * context] for i in range(n)])
    targets = torch.stack([data[i * context + 1 : (i + 1) * context + 1] for i in range(n)])
    nll = 0.0
    for i in range(0, n, 32):
        logits = model(inputs[i : i + 32]).float()
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[i : i + 32].reshape(-1),
                                           reduction="sum").item()
    return math.exp(nll / targets.numel())
