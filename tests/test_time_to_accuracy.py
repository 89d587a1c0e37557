"""benchmarks/cifar10_time_to_accuracy.py as a user runs it: a budget sweep is one command, one
annealed run per budget, with its table, its JSON and the curve PNG (on synthetic data, a tiny model
of the recipe's stem, so it runs anywhere in seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import cifar10_time_to_accuracy as time_to_accuracy  # noqa: E402

TINY_HYBRID = [
    "data.dataset=synthetic",
    "data.synthetic_size=64",
    "data.cache=false",
    "data.batch_augment=false",
    "data.batch_size=16",
    "train.num_threads=1",
    "train.log_every=1",
    'model.overrides={"stem": "cnn", "patch_size": 4, "stem_channels": [4, 8, 16],'
    ' "embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32, "class_token": false, "pool": "gap"}',
]


def run_benchmark(
    tmp_path: Path, *budgets: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    sets = [arg for override in TINY_HYBRID for arg in ("--set", override)]
    command = [
        sys.executable,
        str(REPO / "benchmarks/cifar10_time_to_accuracy.py"),
        "--out",
        str(tmp_path / "b"),
        *options,
    ]
    command += ["--budget-minutes", *budgets, "--set", "train.epochs=2", *sets]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_a_sweep_runs_each_budget_and_draws_the_curve(tmp_path):
    result = run_benchmark(tmp_path, "0.02", "0.04")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("# ") and "cpu" in out.lower()  # the machine first
    assert "0.02-minute budget" in out and "0.04-minute budget" in out
    assert "| budget (min) | best top-1 | images/s | to 50% | to 70% | to 80% | to 85% | to 90% |" in out
    results = json.loads((tmp_path / "b/time_to_accuracy.json").read_text())
    assert [run["budget_minutes"] for run in results["runs"]] == [0.02, 0.04]
    for run in results["runs"]:
        assert run["precision"] == "fp32" and run["images_per_s"] > 0 and run["curve"]
        assert run["best_top1"] == max(point["top1"] for point in run["curve"])
    for budget in ("0.02", "0.04"):  # each budget its own run folder, annealed on its own budget
        config = json.loads((tmp_path / f"b/budget_{budget}min/config.json").read_text())
        assert config["train"]["time_budget_minutes"] == float(budget)
    assert (tmp_path / "b/time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_must_be_positive(tmp_path):
    result = run_benchmark(tmp_path, "5", "0")
    assert result.returncode == 2
    assert "--budget-minutes must be > 0, got [5.0, 0.0]" in result.stderr
    assert not (tmp_path / "b").exists()


def test_the_target_is_the_recipes_unless_given(tmp_path, capsys):
    # the targets: 90% for the hybrid (the default config), 80% for the pure ViT
    for options, target in (((), 0.9), (("--config", "cifar10_vit_patch"), 0.8), (("--target", "0.5"), 0.5)):
        assert time_to_accuracy.parse_args(list(options)).target == target
    with pytest.raises(SystemExit):
        time_to_accuracy.parse_args(["--target", "90"])
    assert "--target is a top-1 in (0, 1], got 90.0" in capsys.readouterr().err
    # The target given reaches the run's report and its JSON.
    result = run_benchmark(tmp_path, "0.01", options=("--target", "0.5"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "target 50%: " in result.stdout
    assert json.loads((tmp_path / "b/time_to_accuracy.json").read_text())["target"] == 0.5
