"""What the machine at hand computes fastest, measured: the precision of a run ("auto") and the kernels
of `kernels.py` follow a short calibration, not a belief about CPU flags.

The calibration (`measure`, about a second; 4 s where native bf16 products crawl, as at 1 GFLOP/s
on an AVX2-only EPYC, a candidate far behind being timed once) times ViT-shaped matrix products in fp32, in bf16 on torch's native kernels
and in bf16 as fp32 GEMMs of the bf16 operands (`kernels.py`'s second path), and the training
attention (forward and backward) of SDPA against the explicit softmax(q k^T) v in bf16 at two
sequence lengths, the candidates of each question timed in turn. "auto" takes bf16 where the native
bf16 products beat fp32 (the widened path is fp32 arithmetic: it serves a run that asked for bf16,
and never makes bf16 the faster choice). It runs once per machine: the figures are cached under the
user's cache folder (`$VITKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/vitkit`, else `~/.cache/vitkit`),
keyed by the CPU model, its flags, the torch version and the thread count, so a new CPU, torch or
thread count measures again. Figures measured while the CPU was busy (a 1-minute load average above one per free core: other
work shared the cores) serve the process that measured them and are not cached, so the next run
measures again. A run logs the figures behind its choice.

Where measuring is impossible or unwanted (`VITKIT_CALIBRATION=off`, a device other than the CPU, a
failure while timing) the flag rules decide: bf16 on a CPU with AMX, fp32 elsewhere.
`VITKIT_CALIBRATION=FILE.json` takes fixed figures instead (to see another machine's choice). Tests set
the figures through `use_calibration` (the seam) in-process, or that variable for subprocesses.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
CPU_FLAGS_ENV = "VITKIT_CPU_FLAGS"
CACHE_ENV = "VITKIT_CACHE_DIR"
CALIBRATION_ENV = "VITKIT_CALIBRATION"
CACHE_NAME = "calibration.json"
CACHE_VERSION = 1
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 is chosen where its best product path beats fp32 by this factor: the rest of a step (norms,
# softmax, optimiser, casts) gains less than the products do.
BF16_MIN_GAIN = 1.15
# The lengths the training attention is timed at, and the longest it may ever take the explicit path
# (it keeps the (B, heads, L, L) probabilities for the backward pass).
ATTENTION_LENGTHS = (65, 197)
# Above this 1-minute load average per free core, a measurement shared the CPU: it is not cached.
BUSY_LOAD = 1.0
EXPLICIT_ATTENTION_MAX_LEN = 640


# The CPU -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """What the precision choice, the calibration key and the benchmarks' headers need of the CPU."""

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


def machine_key(cpu: CpuInfo | None = None) -> str:
    """What the calibration depends on: 'AMD EPYC|flags 1a2b3c4d5e6f|torch 2.13.0+cpu|2 threads'."""
    cpu = cpu or cpu_info()
    flags = hashlib.sha256(" ".join(sorted(cpu.flags)).encode()).hexdigest()[:12]
    return f"{cpu.model}|flags {flags}|torch {torch.__version__}|{torch.get_num_threads()} threads"


# The measurement -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Measured rates of one machine. `gemm`: GFLOP/s of ViT-shaped products by path ("fp32", "bf16"
    on native kernels, "bf16_fp32_units"); `attention`: milliseconds of a bf16 training attention
    (forward and backward) by "sdpa L" / "explicit L"."""

    machine: str
    gemm: dict[str, float]
    attention: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bf16_path(self) -> str:
        """The faster bf16 product path: "bf16" (native kernels) or "bf16_fp32_units"."""
        native, widened = self.gemm.get("bf16", 0.0), self.gemm.get("bf16_fp32_units", 0.0)
        return "bf16_fp32_units" if widened > native else "bf16"

    @property
    def bf16_gain(self) -> float:
        """The native bf16 product rate over the fp32 rate: what bf16 can gain. The widened path is
        fp32 arithmetic (the same fp32 GEMM after two casts), so a rate above fp32's there is noise
        and never a reason to choose bf16; it only serves a run that asked for bf16. A CPU without
        bf16 units (1 GFLOP/s native against 93 fp32 on an AVX2-only EPYC) would otherwise train every
        operation outside the widened products (convolutions, norms) on its crawling native kernels."""
        return self.gemm["bf16"] / self.gemm["fp32"]

    def explicit_attention_max_len(self) -> int:
        """The longest measured sequence at which the explicit training attention beat SDPA (0: none)."""
        won = [
            length
            for length in ATTENTION_LENGTHS
            if self.attention.get(f"explicit {length}", float("inf"))
            < self.attention.get(f"sdpa {length}", 0.0)
        ]
        return max(won, default=0)

    def describe(self) -> str:
        """'GEMM GFLOP/s fp32 190, bf16 408, bf16_fp32_units 185; bf16 attention ms sdpa 65 1.2, ...'."""
        rates = ", ".join(f"{path} {rate:.0f}" for path, rate in self.gemm.items())
        times = ", ".join(f"{name} {ms:.2f}" for name, ms in self.attention.items())
        return f"GEMM GFLOP/s {rates}; bf16 training attention ms {times or '-'} (measured in {self.seconds:.2f} s)"


# A candidate this many times slower than the fastest is timed once (see _best_ms).
FAR_BEHIND = 4.0


def _best_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best of `repeats` times of each run in milliseconds, the runs taken in turn (one round each
    per repeat, after a warm-up round), so a clock ramping up or a load spike hits them alike rather
    than favouring whichever comes last. A run more than FAR_BEHIND times slower than the fastest is
    timed once: more repeats cannot change the order, and on a CPU without bf16 units its bf16
    products would take most of the calibration (1.2 s a call against 10 ms for fp32)."""
    best = dict.fromkeys(runs, float("inf"))
    for run in runs.values():
        run()  # warm-up: first-call allocation and kernel selection
    for _ in range(repeats):
        for name, run in runs.items():
            if best[name] < float("inf") and best[name] > FAR_BEHIND * min(best.values()):
                continue  # far behind after its first timing
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def _gemm_rates(repeats: int) -> dict[str, float]:
    # A ViT-S MLP product at 1024 tokens (batch 16 x 64 tokens): the shape class that dominates a step.
    rows, inner, outer = 1024, 384, 1536
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator)
    b = torch.randn(inner, outer, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    paths = {
        "fp32": lambda: a @ b,
        "bf16": lambda: a16 @ b16,
        "bf16_fp32_units": lambda: (a16.float() @ b16.float()).bfloat16(),
    }
    flops = 2 * rows * inner * outer
    return {path: flops / ms / 1e6 for path, ms in _best_ms(paths, repeats).items()}


def _attention_times(repeats: int) -> dict[str, float]:
    times = {}
    for length in ATTENTION_LENGTHS:
        q, k, v = (torch.randn(4, 6, length, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def sdpa(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        def explicit(q=q, k=k, v=v):
            (torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v).sum().backward()

        times |= _best_ms({f"sdpa {length}": sdpa, f"explicit {length}": explicit}, repeats)
    return times


def measure(repeats: int = 5) -> Calibration:
    """Time the candidate arithmetic on this machine now (no cache; see `calibration`)."""
    start = time.perf_counter()
    with torch.no_grad():
        gemm = _gemm_rates(repeats)
    attention = _attention_times(repeats)
    return Calibration(machine_key(), gemm, attention, time.perf_counter() - start)


# The cache and the seam ----------------------------------------------------------------------------
def cache_dir() -> Path:
    """$VITKIT_CACHE_DIR, else $XDG_CACHE_HOME/vitkit, else ~/.cache/vitkit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitkit"


def _read_cache(path: Path) -> dict[str, dict]:
    """The cached entries by machine key; an unreadable or foreign file counts as empty (and is
    rewritten by the next measurement), with a warning naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a version {CACHE_VERSION} calibration cache")
        return data["entries"]
    except (OSError, ValueError, AttributeError) as error:
        log.warning("calibration cache %s ignored (%s); measuring again", path, error)
        return {}


def _from_entry(entry: dict) -> Calibration:
    calibration = Calibration(**entry)
    if not {"fp32", "bf16"} <= calibration.gemm.keys() or min(calibration.gemm.values()) <= 0:
        raise ValueError(f"gemm rates {calibration.gemm} lack fp32/bf16 or are not positive")
    return calibration


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    """All of the file or none of it: written beside and renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".calibration-", delete=False) as file:
        json.dump({"version": CACHE_VERSION, "entries": entries}, file, indent=1)
    os.replace(file.name, path)


_forced: list[Calibration | None] = []


@contextlib.contextmanager
def use_calibration(calibration: Calibration | None) -> Iterator[None]:
    """The seam: within the block, `calibration()` answers `calibration` (None: as if measuring were
    impossible, so the flag rules decide) without measuring or reading the cache."""
    _forced.append(calibration)
    try:
        yield
    finally:
        _forced.pop()


def calibration() -> Calibration | None:
    """This machine's figures: from the cache, or measured now and cached; None where measuring is
    off (VITKIT_CALIBRATION=off) or failed (logged). VITKIT_CALIBRATION=FILE.json takes the figures
    in that file instead (one `Calibration` as JSON): another machine's choice, or a test's."""
    if _forced:
        return _forced[-1]
    mode = os.environ.get(CALIBRATION_ENV, "measure")
    if mode == "off":
        return None
    if mode != "measure":
        return _figures_file(mode)
    return _cached_calibration(machine_key(), str(cache_dir() / CACHE_NAME))


@functools.cache
def _figures_file(path: str) -> Calibration:
    if not Path(path).is_file():
        raise ValueError(f"{CALIBRATION_ENV}={path!r}: expected 'measure', 'off' or a calibration JSON file")
    try:
        return _from_entry(json.loads(Path(path).read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{CALIBRATION_ENV}={path}: not a calibration ({error})") from None


def cpu_load() -> float:
    """The 1-minute load average per free core (0 where the OS keeps none)."""
    try:
        return os.getloadavg()[0] / free_cores()
    except (OSError, AttributeError):
        return 0.0


@functools.cache
def _cached_calibration(key: str, cache_path: str) -> Calibration | None:
    path = Path(cache_path)
    entries = _read_cache(path)
    if key in entries:
        try:
            return _from_entry(entries[key])
        except (TypeError, ValueError) as error:
            log.warning("calibration cache %s: entry for %s ignored (%s); measuring again", path, key, error)
    load = cpu_load()
    try:
        measured = measure()
    except RuntimeError as error:  # a kernel this build lacks: the flag rules decide
        log.warning("calibration failed (%s); precision and kernels follow the CPU flags", error)
        return None
    log.info("calibrated %s: %s", key, measured.describe())
    if load > BUSY_LOAD:
        log.warning(
            "calibrated while the CPU was busy (load %.1f per free core): the figures serve this process "
            "and are not cached; the next run measures again",
            load,
        )
        return measured
    try:
        _write_cache(path, {**entries, key: asdict(measured)})
    except OSError as error:
        log.warning("calibration not cached (%s: %s); it will be measured again next time", path, error)
    return measured


# The choices ---------------------------------------------------------------------------------------
def choose_precision(requested: str, device: torch.device, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(precision, reason): `requested` itself unless it is "auto": then bf16 where its native products
    measured at least BF16_MIN_GAIN times fp32's rate (`Calibration.bf16_gain`), else fp32; without a
    measurement, the flag rules of `cpu` (this machine's when None)."""
    if requested != "auto":
        return requested, "requested"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return "bf16", f"CUDA device {name} multiplies bf16 natively"
        return "fp32", f"CUDA device {name} has no bf16 support"
    if device.type != "cpu":
        return "fp32", f"no bf16 rule for device {device.type!r}"
    measured = calibration()
    if measured is not None:
        verdict = "bf16" if measured.bf16_gain >= BF16_MIN_GAIN else "fp32"
        return verdict, (
            f"measured bf16 products at {measured.bf16_gain:.2f}x fp32 "
            f"(needs {BF16_MIN_GAIN}x; {measured.describe()})"
        )
    cpu = cpu or cpu_info()
    if cpu.has_amx:
        return "bf16", f"not measured; CPU {cpu.model} has AMX (amx_bf16: bf16 matmul ~8x fp32)"
    return "fp32", f"not measured; CPU {cpu.model} has no AMX (bf16 matmul assumed slower than fp32)"
