"""Shared test helpers: random inputs, tolerance checks, small models, and the devices to
test on.

Hypothesis runs derandomized (the same examples every run, so a CI failure reproduces);
``LOWBIT_HYPOTHESIS=random`` draws fresh examples (and more of them) for exploration.
"""

from __future__ import annotations

import os
import sys

import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. The variable
# is read when a kernel is defined, so it is set before anything imports lowbit.kernels.
TRITON_INTERPRETED = not torch.cuda.is_available()
if TRITON_INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
import lowbit  # noqa: F401  (registers the ops)
import pytest
from hypothesis import settings
from lowbit import _extension, formats
from torch import nn

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("random", deadline=None, max_examples=100, derandomize=False)
# make test-avx2 runs under CPU emulation, 10-50 times slower: fewer drawn examples there.
settings.register_profile("emulated", deadline=None, max_examples=6, derandomize=True)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS") or "ci")

# The test-only extension with the CPU models of the CUDA kernels (built by `make test`).
try:
    MODELS = _extension.load("_models")
except ImportError:
    MODELS = None

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_generator(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def activation(shape, dtype=torch.float32, device="cpu", seed=0, noncontiguous=False) -> torch.Tensor:
    """Random activations with a few outlier channels, as real activations have.

    ``noncontiguous`` returns a strided view (every other element of a wider tensor).
    """
    g = make_generator(seed)
    x = torch.randn(*shape, generator=g)
    x[..., :: max(1, shape[-1] // 7)] *= 8
    x = x.to(dtype).to(device)
    if noncontiguous:
        x = torch.stack((x, torch.zeros_like(x)), dim=-1)[..., 0]
    return x


def weight(n, k, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = make_generator(seed + 1)
    return (torch.randn(n, k, generator=g) / k**0.5).to(dtype)


def int8_weight(n, k, seed=0, device="cpu"):
    q, s = formats.quantize_int8_per_channel(weight(n, k, seed=seed))
    return q.to(device), s.to(device)


def int4_weight(n, k, group_size, symmetric, seed=0, device="cpu"):
    packed, scales, zeros = formats.quantize_int4_groupwise(weight(n, k, seed=seed), group_size, symmetric)
    return packed.to(device), scales.to(device), (None if zeros is None else zeros.to(device))


def int8_values(shape, seed=0, device="cpu") -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=make_generator(seed), dtype=torch.int8).to(device)


def pytest_generate_tests(metafunc):
    # A parameter rather than a fixture, so hypothesis tests can take it too.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


# --- tolerances ----------------------------------------------------------------------------

OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_linear_close(out, ref, x, w_float, bias=None, extra=None):
    """|out - ref| within twice the fp32 summation bound plus one rounding of the output.

    The sum has K products, the bias and one scale multiplication (kernels may apply
    the scale after the sum), so the bound counts K + 2 roundings of its magnitude.
    ``extra``: a kernel's own documented error beyond that ([rows, N], added).
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape
    k = x.shape[-1]
    mag = x.float().abs().reshape(-1, k) @ w_float.float().abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    bound = 2 * (k + 2) * 2.0**-23 * mag + 2 * OUT_EPS[out.dtype] * ref.float().abs().reshape(mag.shape)
    if extra is not None:
        bound = bound + extra
    err = (out.float() - ref.float()).abs().reshape(mag.shape)
    assert torch.all(err <= bound + 1e-30), f"max excess {(err - bound).max().item()}"


def assert_same_rounding(out: torch.Tensor, ref: torch.Tensor, triton: bool = True) -> None:
    """Bit-equal, except one bf16 step for a Triton kernel in the interpreter, whose fp32 ->
    bf16 conversion truncates instead of rounding to nearest (a GPU rounds)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = out.cpu(), ref.cpu()
    if triton and out.dtype == torch.bfloat16 and TRITON_INTERPRETED:
        step = ref.float().abs() * 2.0**-7 + 2.0**-133
        assert torch.all((out.float() - ref.float()).abs() <= step)
    else:
        assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max().item()}"


def reference_output(x: torch.Tensor, weight: formats.QuantizedWeight, bias=None) -> torch.Tensor:
    """What a linear layer with this canonical weight computes, by the reference."""
    ref = lowbit.backends.get_backend("reference")
    return ref.apply(x, ref.prepack(weight), bias)


def require_kernel(op: str, device: str) -> None:
    """Skip, saying so, where this build has no kernel for op on the device (the CUDA
    backend covers W8A8, quantize and dequantize; the Triton backend the rest)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, device.upper()):
        pytest.skip(f"no {device} kernel for {op} in this build")


# --- a small model with every structure the replacement pass must handle -------------------


class Block(nn.Module):
    def __init__(self, d=128):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d)})
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.attn["q"](x) * torch.sigmoid(self.attn["k"](x)))


class Net(nn.Module):
    """Nested blocks, a tiny head, a layer reachable under two names, and tied weights."""

    def __init__(self, d=128):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.shared = nn.Linear(d, d)
        self.alias = self.shared  # same module, second name
        self.tied_a = nn.Linear(d, d, bias=False)
        self.tied_b = nn.Linear(d, d)
        self.tied_b.weight = self.tied_a.weight  # distinct modules, one weight
        self.odd = nn.Linear(100, d)  # in_features not a multiple of any group size
        self.head = nn.Linear(d, 4)  # tiny
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = self.alias(self.shared(x)) + self.tied_b(self.tied_a(x))
        x = x + self.odd(x[..., :100])
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return self.head(x)


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


# --- two ranks of torch.distributed (gloo) on this machine -----------------------------------


def _rank_main(rank: int, worker, world: int, init_file: str, *args) -> None:
    worker(rank, world, init_file, *args)
    # A rank that finished leaves without the interpreter's teardown: torch's distributed
    # threads, torn down by static destructors at exit, now and then abort a finished rank
    # ("terminate called without an active exception"), failing a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, world: int, tmp_path, *args) -> None:
    """Run ``worker(rank, world, init_file, *args)`` in ``world`` spawned processes; each
    starts a gloo process group through ``init_file``. Raises if any rank fails."""
    import torch.multiprocessing as mp

    init_file = tmp_path / "ddp_init"
    mp.spawn(_rank_main, args=(worker, world, str(init_file), *args), nprocs=world, join=True)


def init_rank(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the same summation blocking as the single-process reference
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


# --- a tiny random Llama for the generation tests (test_decode, test_generate_bench) ---------

# Every Linear layer above quantize's min_numel, so the quantized copies hold no float matmul.
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A transformers Llama directory of TINY_LLAMA's dimensions (bf16, random weights)."""
    from lowbit.bench import generate

    return generate.build_llama(tmp_path_factory.mktemp("llama") / "tiny", TINY_LLAMA)
