"""Calibration: observers, static W8A8, SmoothQuant, GPTQ and AWQ.

Used through the replacement pass::

    lowbit.quantize(model, "w4a16-g128", method="gptq", calibration=batches)
    lowbit.quantize(model, "w8a8-static", method=SmoothQuant(alpha=0.5), observer="percentile",
                    calibration=batches)

``calibration`` is an iterable of batches (a tuple is unpacked into positional arguments,
anything else is the single argument); ``calibration_forward=fn(model, batch)`` covers
models called another way. See ``lowbit.calibrate.pipeline`` for how the work is staged.
"""

from lowbit.calibrate.gptq import gptq_quantize
from lowbit.calibrate.methods import AWQ, GPTQ, METHODS, RTN, SmoothQuant, as_method
from lowbit.calibrate.observers import (
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from lowbit.calibrate.blocks import find_blocks
from lowbit.calibrate.pipeline import CalibrationSummary
from lowbit.calibrate.scaling import awq_clip_search, awq_scale_search, smoothquant_factors

__all__ = [
    "AWQ", "GPTQ", "METHODS", "OBSERVERS", "RTN", "CalibrationSummary", "HistogramObserver",
    "MSEObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer", "PercentileObserver",
    "SmoothQuant", "as_method", "awq_clip_search", "awq_scale_search", "find_blocks", "gptq_quantize",
    "make_observer", "smoothquant_factors",
]
