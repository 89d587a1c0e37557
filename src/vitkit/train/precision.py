"""Which arithmetic a run uses: the precision (`train.precision`, "auto" by default), the autocast
context, the grad scaler and the CPU threads, chosen from the machine the run is on.

"auto" picks bf16 autocast only where bf16 products run faster than fp32: a CUDA device that supports
bf16, or a CPU with AMX (`amx_bf16`: its tiles multiply bf16 about 8x faster than the fp32 FMA units).
On a CPU with only `avx512_bf16`, bf16 GEMMs run at about 0.6x fp32 (docs/results.md, "Kernels"), and
without either bf16 is emulated: both get fp32. The run logs one line saying what it chose and why.

The CPU is read from /proc/cpuinfo by `cpu_info`; $VITKIT_CPU_FLAGS (space- or comma-separated flags)
replaces the flags read there, to see what another CPU would get or to force a choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPUINFO = Path("/proc/cpuinfo")
CPU_FLAGS_ENV = "VITKIT_CPU_FLAGS"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What the precision choice and the benchmarks' headers need to know about the CPU."""

    model: str
    flags: frozenset[str]
    free_cores: int

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags

    def describe(self) -> str:
        """'AMD EPYC, 2 free cores, amx_bf16 no, avx512_bf16 no'."""
        marks = ", ".join(f"{flag} {'yes' if flag in self.flags else 'no'}" for flag in BF16_FLAGS)
        return f"{self.model}, {self.free_cores} free cores, {marks}"


def free_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit), which
    os.cpu_count() ignores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """The CPU's model name and flags from the text of /proc/cpuinfo (read when `cpuinfo` is None;
    where it is missing, the platform's name and torch's AMX probe), flags replaced by
    $VITKIT_CPU_FLAGS when set."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "flags" in fields:
        flags = frozenset(fields["flags"].split())
    else:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        flags = frozenset({"amx_bf16"} if probe is not None and probe() else ())
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        flags = frozenset(forced.replace(",", " ").split())
    return CpuInfo(model=model, flags=flags, free_cores=free_cores())


def choose_precision(requested: str, device: torch.device, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(precision, reason): `requested` itself unless it is "auto" (see the module text)."""
    if requested != "auto":
        return requested, "set by train.precision"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {name} multiplies bf16 natively"
        return "fp32", f"CUDA device {name} has no bf16 support"
    if device.type != "cpu":
        return "fp32", f"no bf16 rule for device {device.type!r}"
    cpu = cpu or cpu_info()
    if cpu.has_amx:
        return "bf16", f"CPU {cpu.model} has AMX (amx_bf16: bf16 matmul ~8x fp32)"
    if "avx512_bf16" in cpu.flags:
        return "fp32", f"CPU {cpu.model} has avx512_bf16 but no AMX (bf16 matmul slower than fp32)"
    return "fp32", f"CPU {cpu.model} has no AMX (bf16 matmul slower than fp32)"


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
    chosen, reason = choose_precision(precision, device)
    if chosen == "fp16" and device.type != "cuda":
        raise ValueError("train.precision='fp16' needs a GPU (its grad scaler is CUDA's); use 'bf16' on CPU")
    notes = [f"precision {precision} -> {chosen}: {reason}"]
    if device.type == "cpu" or num_threads > 0:
        threads, why = choose_threads(num_threads, local_world_size)
        torch.set_num_threads(threads)
        notes.append(f"cpu threads: {threads} ({why})")
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
