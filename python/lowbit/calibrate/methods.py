"""The calibration methods, as small frozen configs: ``RTN()``, ``GPTQ(act_order=True)``,
``AWQ(grid=20)``, ``SmoothQuant(alpha=0.5)``. ``as_method`` also takes their names."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round to nearest: no calibration of the weights (static activation scales, if the
    scheme has them, still come from the observer)."""

    name = "rtn"
    schemes = ("w8a8", "w8a8-static", "w8a16", "w4a16")


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """Hessian-aware rounding (``lowbit.calibrate.gptq``): ``damp`` is the dampening as a
    fraction of the mean Hessian diagonal; ``act_order`` visits columns by descending
    activation energy; ``block_size`` is the lazy-update block."""

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    name = "gptq"
    schemes = ("w8a8", "w8a8-static", "w8a16", "w4a16")

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise ValueError(f"GPTQ damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"GPTQ block_size must be positive, got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class AWQ:
    """Activation-aware scaling and clipping for weight-only schemes
    (``lowbit.calibrate.scaling``): ``grid`` ratios for the scale search (``duo`` adds
    the weight-aware scale family), ``clip`` on or
    off, ``clip_grid`` and ``max_shrink`` for the clip search, ``max_tokens`` sampled
    input rows per layer group kept for the searches."""

    grid: int = 20
    duo: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    max_tokens: int = 2048
    name = "awq"
    schemes = ("w8a16", "w4a16")

    def __post_init__(self):
        if self.grid < 1 or self.clip_grid < 1 or self.max_tokens < 1:
            raise ValueError("AWQ grid, clip_grid and max_tokens must be positive")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """Activation smoothing for W8A8 (``lowbit.calibrate.scaling``); ``alpha`` is the
    migration strength (0: none, 1: all of the activation range moves to the weights), or
    ``"auto"``: for each group of layers reading one input, the alpha of ``{i / grid}`` (or
    no smoothing) whose quantized outputs (weights and activations rounded as the scheme
    rounds them) are nearest the float outputs on ``max_tokens`` sampled input rows."""

    alpha: float | str = 0.5
    grid: int = 20
    max_tokens: int = 2048
    name = "smoothquant"
    schemes = ("w8a8", "w8a8-static")

    def __post_init__(self):
        if self.alpha != "auto" and (isinstance(self.alpha, str) or not 0 <= self.alpha <= 1):
            raise ValueError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        if self.grid < 1 or self.max_tokens < 1:
            raise ValueError("SmoothQuant grid and max_tokens must be positive")

    @property
    def searches(self) -> bool:
        return self.alpha == "auto"


METHODS = {m.name: m for m in (RTN, GPTQ, AWQ, SmoothQuant)}
Method = RTN | GPTQ | AWQ | SmoothQuant


def as_method(spec) -> Method:
    if isinstance(spec, str):
        if spec.lower() not in METHODS:
            raise ValueError(f"unknown calibration method {spec!r}; expected one of {sorted(METHODS)}")
        return METHODS[spec.lower()]()
    if isinstance(spec, tuple(METHODS.values())):
        return spec
    raise TypeError(f"method must be a name or one of {[m.__name__ for m in METHODS.values()]}, "
                    f"got {type(spec).__name__}")
