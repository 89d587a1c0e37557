"""The machine's calibration (vitkit.fast.machine): what it measures, how it is cached, and that the
precision, the GEMM path and the attention path follow it. Every arithmetic the calibration can choose
is set through the seam (`use_calibration`), so these tests hold on a CPU with and without bf16, and
each chosen fast path stays equal to the plain model within its precision's tolerance."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import vitkit
from helpers import tiny_config
from vitkit.fast import apply_fast_paths, choose_kernels, machine, prepare_inference
from vitkit.fast.machine import Calibration, calibration, choose_precision, use_calibration

CPU = torch.device("cpu")
BF16 = dict(rtol=3e-2, atol=3e-2)
FP32 = dict(rtol=1e-5, atol=1e-5)
# The arithmetics a calibration can choose, as the figures that make it choose them.
FP32_WINS = Calibration("test", {"fp32": 190.0, "bf16": 120.0, "bf16_fp32_units": 150.0})
BF16_NATIVE_WINS = Calibration(
    "test",
    {"fp32": 190.0, "bf16": 408.0, "bf16_fp32_units": 170.0},
    {"sdpa 65": 1.0, "explicit 65": 0.5, "sdpa 197": 2.0, "explicit 197": 3.0},
)
BF16_ON_FP32_UNITS_WINS = Calibration(
    "test",
    {"fp32": 190.0, "bf16": 100.0, "bf16_fp32_units": 240.0},
    {"sdpa 65": 1.0, "explicit 65": 2.0, "sdpa 197": 2.0, "explicit 197": 3.0},
)
CALIBRATIONS = {
    "fp32": FP32_WINS,
    "bf16 native": BF16_NATIVE_WINS,
    "bf16 fp32 units": BF16_ON_FP32_UNITS_WINS,
}
# The precision each arithmetic is reached by: "auto" where the figures choose it, a request for bf16
# where only a run asking for bf16 takes it (the widened path never makes "auto" choose bf16).
REQUESTS = {"fp32": "auto", "bf16 native": "auto", "bf16 fp32 units": "bf16"}
# A 2-core AMD EPYC with AVX2 and no bf16 units (torch 2.13): its widened products timed above its
# fp32 ones while the clock ramped up, before the candidates were timed in turn.
AVX2_EPYC = Calibration("test", {"fp32": 93.3, "bf16": 1.27, "bf16_fp32_units": 128.3})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, nothing remembered in this process, measuring on."""
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(machine.CALIBRATION_ENV, raising=False)
    monkeypatch.setattr(machine, "cpu_load", lambda: 0.1)  # a quiet machine, whatever this one does
    machine._cached_calibration.cache_clear()
    yield tmp_path / "cache" / machine.CACHE_NAME
    machine._cached_calibration.cache_clear()


def test_measure_times_every_path_on_vit_shapes():
    measured = machine.measure(repeats=1)
    assert set(measured.gemm) == {"fp32", "bf16", "bf16_fp32_units"}
    assert all(rate > 0 for rate in measured.gemm.values())
    assert set(measured.attention) == {f"{path} {n}" for path in ("sdpa", "explicit") for n in (65, 197)}
    assert measured.machine == machine.machine_key() and measured.seconds > 0
    assert f"torch {torch.__version__}" in measured.machine
    assert f"{torch.get_num_threads()} threads" in measured.machine
    assert "GEMM GFLOP/s fp32 " in measured.describe()


def test_the_choice_follows_the_figures():
    with use_calibration(BF16_NATIVE_WINS):
        chosen, reason = choose_precision("auto", CPU)
        assert chosen == "bf16" and reason.startswith("measured bf16 products at 2.15x fp32")
        assert "fp32 190, bf16 408" in reason
        assert choose_kernels(CPU, "bf16") == vitkit.fast.Kernels(
            bf16_gemm_in_fp32=False, explicit_training_attention=True, explicit_attention_max_len=65
        )
    with use_calibration(BF16_ON_FP32_UNITS_WINS):
        # 240 / 190 = 1.26x on the widened path is fp32 arithmetic, not a bf16 gain: native 100 / 190
        assert choose_precision("auto", CPU)[0] == "fp32"
        kernels = choose_kernels(CPU, "bf16")  # a run that asks for bf16 gets the faster bf16 path
        assert kernels.bf16_gemm_in_fp32 and not kernels.explicit_training_attention
    with use_calibration(FP32_WINS):
        assert choose_precision("auto", CPU) == (
            "fp32",
            "measured bf16 products at 0.63x fp32 (needs 1.15x; " + FP32_WINS.describe() + ")",
        )
        assert choose_precision("bf16", CPU) == ("bf16", "requested")  # a request is kept
    with use_calibration(Calibration("test", {"fp32": 100.0, "bf16": 110.0})):
        assert choose_precision("auto", CPU)[0] == "fp32"  # 1.10x: not worth the rounding
    with use_calibration(AVX2_EPYC):  # a run in bf16 there took 25 s a step instead of about 1
        chosen, reason = choose_precision("auto", CPU)
        assert chosen == "fp32" and reason.startswith("measured bf16 products at 0.01x fp32")


def test_the_candidates_are_timed_in_turn(monkeypatch):
    """Each repeat times every candidate once, after one warm-up round, so no candidate gets the CPU's
    quiet or ramped-up moments to itself; the best time of each is kept."""
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
    timed = machine._best_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4
    assert timed == {"a": 1000.0, "b": 1000.0}  # each timing spans one tick of the fake clock


def test_a_candidate_far_behind_is_timed_once(monkeypatch):
    """On a CPU without bf16 units a bf16 product takes 100x fp32's time: after its first timing
    shows it far behind (more than FAR_BEHIND x the fastest) it is not timed again, and its one time
    is what is reported; a candidate within the bound is timed every round."""
    durations = {"fast": 1, "close": 3, "slow": 100}
    now, calls = [0], []

    def run(name):
        calls.append(name)
        now[0] += durations[name]

    monkeypatch.setattr(machine.time, "perf_counter", lambda: now[0])
    timed = machine._best_ms({name: lambda name=name: run(name) for name in durations}, repeats=4)
    assert calls.count("fast") == 5 and calls.count("close") == 5  # a warm-up, then every round
    assert calls.count("slow") == 2  # a warm-up, then one timing
    assert timed == {"fast": 1000.0, "close": 3000.0, "slow": 100000.0}


def test_the_environment_still_overrides_the_gemm_path(monkeypatch):
    monkeypatch.setenv("VITKIT_BF16_GEMM", "fp32")
    with use_calibration(BF16_NATIVE_WINS):
        assert choose_kernels(CPU, "bf16").bf16_gemm_in_fp32


def test_calibration_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    first = calibration()
    assert first is not None and cache.is_file()
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries) == [machine.machine_key()]
    machine._cached_calibration.cache_clear()
    monkeypatch.setattr(machine, "measure", lambda: pytest.fail("measured again despite the cache"))
    assert calibration() == first


def test_a_calibration_on_a_busy_cpu_serves_its_process_and_is_not_cached(cache, monkeypatch, caplog):
    monkeypatch.setattr(machine, "cpu_load", lambda: 1.8)
    measured = calibration()
    assert measured is not None and not cache.exists()
    assert "calibrated while the CPU was busy (load 1.8 per free core)" in caplog.text
    assert calibration() is measured  # the same process keeps its figures
    machine._cached_calibration.cache_clear()
    monkeypatch.setattr(machine, "cpu_load", lambda: 0.3)
    again = calibration()  # the next run, on a quiet CPU, measures again and caches
    assert again is not measured and cache.is_file()


def test_cpu_load_is_the_load_average_per_free_core(monkeypatch):
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (3.0, 1.0, 0.5))
    monkeypatch.setattr(machine, "free_cores", lambda: 2)
    assert machine.cpu_load() == 1.5
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (_ for _ in ()).throw(OSError("no load average")))
    assert machine.cpu_load() == 0.0


def test_another_torch_or_thread_count_measures_again(cache, monkeypatch):
    planted = {"other|torch 0.0|2 threads": asdict(Calibration("other", {"fp32": 1.0, "bf16": 2.0}))}
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": machine.CACHE_VERSION, "entries": planted}))
    measured = calibration()
    assert measured is not None and measured.machine == machine.machine_key()
    entries = json.loads(cache.read_text())["entries"]
    assert set(entries) == {"other|torch 0.0|2 threads", machine.machine_key()}  # the other kept


@pytest.mark.parametrize(
    "text", ["{not json", json.dumps({"version": 99, "entries": {}}), json.dumps([1, 2])]
)
def test_a_damaged_cache_is_measured_again_and_rewritten(cache, caplog, text):
    cache.parent.mkdir(parents=True)
    cache.write_text(text)
    assert calibration() is not None
    assert f"calibration cache {cache} ignored" in caplog.text
    assert json.loads(cache.read_text())["version"] == machine.CACHE_VERSION


def test_a_damaged_entry_is_measured_again(cache, caplog):
    cache.parent.mkdir(parents=True)
    bad = {"machine": "x", "gemm": {"fp32": -1.0, "bf16": 2.0}}
    cache.write_text(json.dumps({"version": machine.CACHE_VERSION, "entries": {machine.machine_key(): bad}}))
    assert calibration().gemm["fp32"] > 0
    assert "ignored" in caplog.text and "not positive" in caplog.text


def test_an_unwritable_cache_still_measures(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(machine.CACHE_ENV, str(blocker / "cache"))  # a folder under a file
    monkeypatch.delenv(machine.CALIBRATION_ENV, raising=False)
    monkeypatch.setattr(machine, "cpu_load", lambda: 0.1)
    machine._cached_calibration.cache_clear()
    try:
        assert calibration() is not None
        assert "calibration not cached" in caplog.text
    finally:
        machine._cached_calibration.cache_clear()


def test_calibration_off_falls_back_to_the_flag_rules(cache, monkeypatch):
    monkeypatch.setenv(machine.CALIBRATION_ENV, "off")
    monkeypatch.setenv(machine.CPU_FLAGS_ENV, "avx2 amx_bf16")
    assert calibration() is None and not cache.exists()
    assert choose_precision("auto", CPU)[0] == "bf16"
    monkeypatch.setenv(machine.CPU_FLAGS_ENV, "avx2 avx512_bf16")
    assert choose_precision("auto", CPU)[0] == "fp32"
    monkeypatch.setenv(machine.CALIBRATION_ENV, "sometimes")
    with pytest.raises(
        ValueError, match="VITKIT_CALIBRATION='sometimes': expected 'measure', 'off' or a calibration"
    ):
        calibration()


def test_a_figures_file_stands_for_another_machine(tmp_path, monkeypatch):
    figures = tmp_path / "zen4.json"
    figures.write_text(json.dumps(asdict(BF16_NATIVE_WINS)))
    monkeypatch.setenv(machine.CALIBRATION_ENV, str(figures))
    assert calibration() == BF16_NATIVE_WINS
    assert choose_precision("auto", CPU)[0] == "bf16"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"machine": "x", "gemm": {"fp32": 1.0}}))
    monkeypatch.setenv(machine.CALIBRATION_ENV, str(broken))
    with pytest.raises(ValueError, match="broken.json: not a calibration .*lack fp32/bf16"):
        calibration()


# Every arithmetic the calibration can choose keeps the fast model equal to the plain one ---------
def _model(**overrides):
    torch.manual_seed(0)
    model = vitkit.create_model(tiny_config(num_classes=5, **overrides))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would hide every difference
    return model


@pytest.mark.parametrize("name", list(CALIBRATIONS))
@pytest.mark.parametrize("overrides", [{}, {"parallel": 2}])
def test_inference_in_the_chosen_precision_equals_the_plain_model(name, overrides):
    plain = _model(**overrides).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = plain(images)
    with use_calibration(CALIBRATIONS[name]):
        fast, chosen = prepare_inference(copy.deepcopy(plain), CPU, REQUESTS[name])
        with torch.no_grad():
            logits = fast(images)
            other_size = fast(torch.randn(2, 3, 48, 40))  # position embeddings resampled in bf16 too
    assert chosen == ("fp32" if name == "fp32" else "bf16")
    assert logits.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[chosen]
    assert other_size.shape == (2, 5)
    if chosen == "fp32":
        torch.testing.assert_close(logits, reference, **FP32)
    else:  # bf16 weights and activations: within a few bf16 roundings of the logits' scale
        assert (logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()
    assert (logits.float().argmax(-1) == reference.argmax(-1)).all()  # top-1 agreement


CNN_STEM = dict(stem="cnn", patch_size=8, stem_channels=(8, 16, 16, 32), class_token=True, pool="token")


@pytest.mark.parametrize("name", list(CALIBRATIONS))
@pytest.mark.parametrize("overrides", [{}, CNN_STEM], ids=["patch", "cnn"])
def test_a_training_step_in_the_chosen_arithmetic_equals_the_plain_model(name, overrides):
    plain = _model(**overrides)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with use_calibration(CALIBRATIONS[name]):
        precision, _ = choose_precision(REQUESTS[name], CPU)
        fast = apply_fast_paths(copy.deepcopy(plain), CPU, precision)
    convs = [type(m) for m in fast.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    widened = name == "bf16 fp32 units"  # every convolution of the stem on fp32 units, none native
    assert convs and set(convs) == {vitkit.fast.kernels.FastConv2d if widened else torch.nn.Conv2d}
    tolerance = FP32 if precision == "fp32" else BF16
    exact = copy.deepcopy(plain)  # the fp32 gradients both bf16 runs round away from
    losses = []
    for model, bf16 in ((plain, precision == "bf16"), (fast, precision == "bf16"), (exact, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.detach().float())
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    named = zip(plain.named_parameters(), fast.parameters(), exact.parameters(), strict=True)
    for (key, p), q, r in named:
        assert q.grad is not None, key
        if precision == "fp32":
            torch.testing.assert_close(q.grad, p.grad, **FP32)
        elif not overrides:  # bf16 roundings on both sides, other kernels: close in norm
            assert (q.grad - p.grad).norm() <= 0.05 * p.grad.norm() + 1e-3, key
        else:  # through seven convolutions and norms on a batch of 4, bf16 strays ~15% from fp32 on
            # torch's kernels: the fast path strays no further
            assert (q.grad - r.grad).norm() <= 1.5 * (p.grad - r.grad).norm() + 1e-3, key


def test_inference_in_fp32_on_request_is_exact():
    plain = _model().eval()
    images = torch.randn(2, 3, 32, 32)
    with use_calibration(BF16_NATIVE_WINS):
        fast, chosen = prepare_inference(copy.deepcopy(plain), CPU, "fp32")
    assert chosen == "fp32" and next(fast.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(fast(images), plain(images), **FP32)
    with pytest.raises(ValueError, match="precision 'fp16' needs a GPU"):
        prepare_inference(copy.deepcopy(plain), CPU, "fp16")


# The commands follow the cached figures -----------------------------------------------------------
@pytest.mark.parametrize("name,expected", [("fp32", "fp32"), ("bf16 native", "bf16")])
def test_predict_takes_the_precision_the_cache_says_is_fastest(tmp_path, name, expected):
    from PIL import Image

    torch.manual_seed(0)
    checkpoint = vitkit.save(_model(), tmp_path / "tiny.safetensors")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    cache = tmp_path / "cache"
    env = {**os.environ, machine.CACHE_ENV: str(cache)}
    env.pop(machine.CALIBRATION_ENV, None)
    print_key = "from vitkit.fast.machine import machine_key; print(machine_key())"
    key = subprocess.run(
        [sys.executable, "-c", print_key], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    figures = asdict(CALIBRATIONS[name])
    cache.mkdir()
    (cache / machine.CACHE_NAME).write_text(
        json.dumps({"version": machine.CACHE_VERSION, "entries": {key: {**figures, "machine": key}}})
    )
    command = [
        sys.executable,
        "-m",
        "vitkit",
        "predict",
        str(checkpoint),
        str(tmp_path / "red.png"),
        "--json",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"precision: {expected} (measured fastest on this CPU)" in result.stderr
    assert json.loads(result.stdout.splitlines()[0])["path"].endswith("red.png")
    stored = json.loads((cache / machine.CACHE_NAME).read_text())["entries"]
    assert list(stored) == [key]  # read, not measured again under another key
