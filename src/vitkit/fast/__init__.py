"""Fast paths: faster implementations of the model's function for a device and precision, applied to
a built model by the code that runs it (`apply_fast_paths`); re-exports only."""

from .apply import apply_fast_paths
from .kernels import Kernels, choose_kernels

__all__ = ["Kernels", "apply_fast_paths", "choose_kernels"]
