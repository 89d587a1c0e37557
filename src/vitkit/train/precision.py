"""Which arithmetic a run uses: the precision (`train.precision`, "auto" by default), the autocast
context, the grad scaler and the CPU threads, chosen on the machine the run is on.

"auto" follows a measurement of this machine (`vitkit.fast.machine`: bf16 where its products measured
clearly faster than fp32, cached per CPU and torch version), with the flag rules as the fallback. The
run logs one line saying what it chose and the figures behind it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from ..fast.machine import CPU_FLAGS_ENV, CpuInfo, choose_precision, cpu_info, free_cores

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = [
    "CPU_FLAGS_ENV",
    "Arithmetic",
    "CpuInfo",
    "choose_precision",
    "choose_threads",
    "cpu_info",
    "setup_arithmetic",
]


def choose_threads(requested: int, local_world_size: int = 1) -> tuple[int, str]:
    """(threads, reason): `requested`, or with 0 the free cores shared among this node's processes."""
    if requested > 0:
        return requested, "set by train.num_threads"
    cores = free_cores()
    return max(1, cores // local_world_size), f"{cores} free cores / {local_world_size} process(es)"


@dataclass(frozen=True)
class Arithmetic:
    """The chosen precision and its pieces: `autocast()` (one context for every precision: disabled in
    fp32) and whether the grad scaler is on (fp16 only)."""

    precision: str
    device: torch.device
    # One line per choice, what it chose and why; the loop prints them when training starts.
    notes: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def scaler_enabled(self) -> bool:
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision != "fp32")

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.scaler_enabled)


def setup_arithmetic(
    precision: str, num_threads: int, device: torch.device, local_world_size: int = 1
) -> Arithmetic:
    """Choose the precision and the CPU threads for a run on `device` and apply the threads; the
    result's `notes` say what was chosen and why."""
    notes = []
    if device.type == "cpu" or num_threads > 0:  # before the precision: it is measured on these threads
        threads, why = choose_threads(num_threads, local_world_size)
        torch.set_num_threads(threads)
        notes.append(f"cpu threads: {threads} ({why})")
    chosen, reason = choose_precision(precision, device)
    if chosen == "fp16" and device.type != "cuda":
        raise ValueError("train.precision='fp16' needs a GPU (its grad scaler is CUDA's); use 'bf16' on CPU")
    notes.insert(0, f"precision {precision} -> {chosen}: {reason}")
    for note in notes:
        log.info(note)
    return Arithmetic(chosen, device, tuple(notes))


def machine_summary() -> str:
    """The line every benchmark prints first: the CPU, its bf16 flags and the torch build, e.g.
    'CPU AMD EPYC, 2 free cores, amx_bf16 no, avx512_bf16 no; torch 2.13.0+cpu, 2 threads'."""
    line = f"CPU {cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        line += f"; CUDA {torch.cuda.get_device_name()}"
    return line
