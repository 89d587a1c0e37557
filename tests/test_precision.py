"""train.precision="auto": bf16 where the device multiplies bf16 fast, fp32 elsewhere, and why.

These tests hold the flag rules (the fallback where nothing is measured: `use_calibration(None)`) and
the run's report; the measured choice is in test_calibration.py."""

from __future__ import annotations

import os

import pytest
import torch

from vitkit.fast.machine import use_calibration
from vitkit.train import precision
from vitkit.train.precision import CpuInfo, choose_precision, choose_threads, cpu_info, setup_arithmetic

CPU = torch.device("cpu")
SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
ICELAKE = "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t: fpu avx2 avx512f avx512_bf16\n"
EPYC = "model name\t: AMD EPYC\nflags\t: fpu sse avx2 fma\n"


@pytest.fixture(autouse=True)
def no_forced_flags_and_no_measurement(monkeypatch):
    monkeypatch.delenv(precision.CPU_FLAGS_ENV, raising=False)
    with use_calibration(None):
        yield


def test_cpu_info_reads_the_model_name_and_flags_of_the_first_processor():
    cpu = cpu_info(SAPPHIRE)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpu.flags and cpu.has_amx
    assert cpu.free_cores == len(os.sched_getaffinity(0))
    assert cpu.describe().endswith("free cores, amx_bf16 yes, avx512_bf16 yes")
    assert not cpu_info(EPYC).has_amx


def test_the_environment_replaces_the_flags(monkeypatch):
    monkeypatch.setenv(precision.CPU_FLAGS_ENV, "avx2,amx_bf16")
    assert cpu_info(EPYC).flags == {"avx2", "amx_bf16"}
    assert choose_precision("auto", CPU)[0] == "bf16"  # read from this machine, flags from the env
    monkeypatch.setenv(precision.CPU_FLAGS_ENV, "")
    assert choose_precision("auto", CPU)[0] == "fp32"


def test_cpu_info_reads_this_machine():
    cpu = cpu_info()
    assert cpu.model and cpu.free_cores >= 1
    with open("/proc/cpuinfo") as file:
        assert cpu.has_amx == (" amx_bf16" in file.read())


def test_amx_gives_bf16_and_its_absence_fp32():
    assert choose_precision("auto", CPU, cpu_info(SAPPHIRE)) == (
        "bf16",
        "not measured; CPU Intel(R) Xeon(R) Platinum 8480+ has AMX (amx_bf16: bf16 matmul ~8x fp32)",
    )
    assert choose_precision("auto", CPU, cpu_info(ICELAKE)) == (
        "fp32",
        "not measured; CPU Intel(R) Xeon(R) CPU @ 2.20GHz has no AMX (bf16 matmul assumed slower than fp32)",
    )
    assert choose_precision("auto", CPU, cpu_info(EPYC))[0] == "fp32"


def test_cuda_gives_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda", 0)
    assert choose_precision("auto", cuda) == ("bf16", "CUDA device H100 multiplies bf16 natively")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert choose_precision("auto", cuda)[0] == "fp32"


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(requested):
    for cpu in (cpu_info(SAPPHIRE), cpu_info(EPYC)):
        assert choose_precision(requested, CPU, cpu) == (requested, "requested")


def test_threads_come_from_the_free_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert choose_threads(0) == (6, "6 free cores / 1 process(es)")
    assert choose_threads(0, local_world_size=4)[0] == 1
    assert choose_threads(3) == (3, "set by train.num_threads")


def test_setup_reports_the_choice_and_applies_the_threads(monkeypatch):
    monkeypatch.setenv(precision.CPU_FLAGS_ENV, "avx2")
    before = torch.get_num_threads()
    try:
        arithmetic = setup_arithmetic("auto", 1, CPU)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert arithmetic.precision == "fp32" and not arithmetic.scaler_enabled
    first, second = arithmetic.notes
    assert first.startswith("precision auto -> fp32: not measured; CPU ") and first.endswith(
        "has no AMX (bf16 matmul assumed slower than fp32)"
    )
    assert second == "cpu threads: 1 (set by train.num_threads)"
    with arithmetic.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with setup_arithmetic("bf16", 0, CPU).autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    torch.set_num_threads(before)
    with pytest.raises(ValueError, match="train.precision='fp16' needs a GPU"):
        setup_arithmetic("fp16", 0, CPU)


def test_training_logs_its_choice(tmp_path, capsys, monkeypatch):
    from test_train_loop import tiny_experiment
    from vitkit.train import train

    monkeypatch.setenv(precision.CPU_FLAGS_ENV, "amx_bf16")
    before = torch.get_num_threads()
    try:
        summary = train(tiny_experiment(tmp_path / "run", max_steps=1, num_threads=1))
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "precision auto -> bf16: not measured; CPU " in err and "has AMX" in err
    assert summary["steps"] == 1


def test_cpu_info_is_a_small_value():
    cpu = CpuInfo(model="X", flags=frozenset({"avx512_bf16"}), free_cores=2)
    assert cpu.describe() == "X, 2 free cores, amx_bf16 no, avx512_bf16 yes"


def test_every_benchmark_prints_the_machine():
    from pathlib import Path

    # _name.py files are the benchmarks' helpers, not benchmarks
    benchmarks = sorted(
        p for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if p.name[0] != "_"
    )
    assert benchmarks
    for path in benchmarks:
        assert "# {machine_summary()}" in path.read_text(), f"{path.name} does not print the machine"
    summary = precision.machine_summary()
    assert summary.startswith("CPU ") and "amx_bf16 " in summary and "avx512_bf16 " in summary
