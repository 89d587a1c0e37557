"""Fast paths: faster implementations of the model's function for a device and precision, applied to
a built model by the code that runs it (`apply_fast_paths`); re-exports only."""

from .apply import apply_fast_paths, prepare_inference
from .kernels import Kernels, choose_kernels
from .machine import Calibration, calibration, choose_precision, use_calibration

__all__ = [
    "Calibration",
    "Kernels",
    "apply_fast_paths",
    "calibration",
    "choose_kernels",
    "choose_precision",
    "prepare_inference",
    "use_calibration",
]
