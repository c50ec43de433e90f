"""``lowbit demo``: quantize one Linear layer with every scheme and run it on every backend.

Prints, per scheme and backend: the output error against the float layer, the time per
call and the speed relative to the float ``nn.Linear``, all measured in this process.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from lowbit.backends import backends, get_backend
from lowbit.formats import Scheme, quantize_weight

SCHEMES = ["w8a8", "w8a8-static", "w8a16", "w4a16-g128", "w4a16-g128-sym"]


def median_ms(fn, repeats: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def run(in_features: int = 2048, out_features: int = 2048, tokens: int = 32) -> str:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(tokens, in_features)
    y = linear(x)
    float_ms = median_ms(lambda: linear(x))
    ready = [s.name for s in backends() if s.available]
    rows = []
    jobs = [(scheme, name) for scheme in SCHEMES for name in ready]
    for scheme_text, name in tqdm(jobs, desc="quantize and time", leave=False):
        scheme = Scheme.parse(scheme_text)
        backend = get_backend(name)
        ok, _ = backend.can_implement(scheme, x.device)
        if not ok:
            continue
        act = (x.abs().amax() / 127).reshape(1) if scheme.kind == "w8a8-static" else None
        qw = backend.prepack(quantize_weight(linear.weight, scheme, "demo.linear", act_scale=act))
        yq = backend.apply(x, qw, linear.bias)
        err = ((yq - y).norm() / y.norm()).item()
        ms = median_ms(lambda: backend.apply(x, qw, linear.bias))
        mb = qw.nbytes() / 2**20
        rows.append((scheme_text, name, mb, err, ms, float_ms / ms))
    head = (f"lowbit demo: Linear({in_features}, {out_features}) on {tokens} tokens, "
            f"{torch.get_num_threads()} threads; fp32 nn.Linear {float_ms:.3f} ms, "
            f"{linear.weight.numel() * 4 / 2**20:.1f} MB of weights")
    lines = [head, "", f"{'scheme':<16}{'backend':<11}{'weight MB':>10}{'rel. error':>12}{'ms':>9}{'vs fp32':>9}"]
    for scheme_text, name, mb, err, ms, speed in rows:
        lines.append(f"{scheme_text:<16}{name:<11}{mb:>10.2f}{err:>12.2e}{ms:>9.3f}{speed:>8.2f}x")
    return "\n".join(lines)
