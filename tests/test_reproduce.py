"""benchmarks/reproduce.py: its claim statistics against hand computations, and its --quick run end to
end on a generated CIFAR-10-shaped folder (every run, every claim, two seeds, the cost columns)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_image_folder

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import reproduce  # noqa: E402


def test_paired_difference_is_the_mean_and_standard_error_of_per_seed_differences() -> None:
    baseline = {0: 0.40, 1: 0.50, 2: 0.45, 3: 0.99}  # seed 3 has no partner: left out
    compared = {0: 0.44, 1: 0.52, 2: 0.51}
    mean, se, n = reproduce.paired_difference(baseline, compared)
    # differences 0.04, 0.02, 0.06: mean 0.04, sample std 0.02, se 0.02 / sqrt(3)
    assert n == 3
    assert mean == pytest.approx(0.04)
    assert se == pytest.approx(0.02 / math.sqrt(3))
    assert math.isnan(reproduce.paired_difference({0: 0.1}, {0: 0.2})[1])


@pytest.mark.parametrize(
    ("mean", "se", "kind", "expected"),
    [
        (0.05, 0.02, "better", "holds"),
        (0.03, 0.02, "better", "does not hold: within noise"),
        (-0.05, 0.02, "better", "does not hold: the opposite, beyond noise"),
        (-0.03, 0.02, "no loss", "holds"),
        (0.05, 0.02, "no loss", "holds"),
        (-0.05, 0.02, "no loss", "does not hold: a loss beyond noise"),
        (0.05, math.nan, "better", "one seed: no spread"),
    ],
)
def test_verdict_weighs_the_difference_against_twice_its_standard_error(mean, se, kind, expected) -> None:
    assert reproduce.verdict(mean, se, kind) == expected


def test_every_claim_names_two_runs_of_the_table() -> None:
    runs = {*reproduce.BASE_RUNS, *reproduce.FINETUNE_RUNS}
    for _, baseline, compared, kind in reproduce.CLAIMS:
        assert {baseline, compared} <= runs and baseline != compared
        assert kind in ("better", "no loss")


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "reproduce.py"), *args], capture_output=True, text=True, timeout=600
    )


def test_quick_run_fills_every_row_and_claim_for_two_seeds(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "cifar10", train_per_class=10, test_per_class=5)
    out = tmp_path / "out"
    result = run_benchmark("--quick", "--train-per-class", "10", "--test-per-class", "5",
                           "--data", str(tmp_path / "cifar10"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "table.md").read_text()
    record = json.loads((out / "rows.json").read_text())
    assert record["seeds"] == [0, 1] and record["settings"]["epochs"] == 1.0
    rows = record["rows"]
    assert set(rows) == {*reproduce.BASE_RUNS, *reproduce.FINETUNE_RUNS}
    for name, row in rows.items():
        assert name in table
        assert sorted(row["per_seed"]) == ["0", "1"]
        for run in row["per_seed"].values():
            assert 0.0 <= run["top1"] <= 1.0 and run["time_s"] > 0 and run["steps"] == 3  # 100 images / 32
    for claim, *_ in reproduce.CLAIMS:
        assert claim in table
    full, attention = rows["fine-tune 48 px, full"], rows["fine-tune 48 px, attention-only"]
    assert attention["per_seed"]["0"]["trainable"] < full["per_seed"]["0"]["trainable"]
    assert full["per_seed"]["0"]["trainable"] == full["per_seed"]["0"]["params"]
    assert attention["memory_mib"] < full["memory_mib"]
    sequential, parallel = rows["scratch, linear stem"], rows["scratch, parallel 3x2 blocks"]
    assert sequential["per_seed"]["0"]["params"] == parallel["per_seed"]["0"]["params"]
    assert sequential["latency_b1_ms"] > 0 and parallel["latency_b1_ms"] > 0
    pretrained = rows["masked-patch pre-trained, hMLP stem"]["per_seed"]["1"]
    assert 0.0 <= pretrained["fewshot10_encoder"] <= 1.0


def test_a_missing_data_folder_is_one_line(tmp_path: Path) -> None:
    result = run_benchmark("--quick", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "nowhere/train: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_picks_rows_and_their_claims(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "cifar10", train_per_class=10, test_per_class=5)
    out = tmp_path / "out"
    chosen = ["scratch, linear stem", "scratch, hMLP stem"]
    result = run_benchmark("--quick", "--train-per-class", "10", "--test-per-class", "5", "--seeds", "1",
                           "--data", str(tmp_path / "cifar10"), "--out", str(out), "--runs", *chosen)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert list(rows) == chosen
    assert (
        rows["scratch, hMLP stem"]["per_seed"]["0"]["params"]
        > rows["scratch, linear stem"]["per_seed"]["0"]["params"]
    )
    table = (out / "table.md").read_text()
    assert "parallel" not in table  # neither its row nor its claim


def test_bf16_longer_pretraining_and_the_peft_rows(tmp_path: Path) -> None:
    """--precision bf16 reaches the runs and the header; --pretrain-epochs sets the pre-training steps
    alone; LoRA and head-only fine-tuning train fewer parameters than attention-only."""
    make_image_folder(tmp_path / "cifar10", train_per_class=10, test_per_class=5)
    out = tmp_path / "out"
    chosen = [
        "scratch, linear stem",
        "masked-patch pre-trained, linear stem",
        "fine-tune 48 px, attention-only",
        "fine-tune 48 px, LoRA rank 8",
        "fine-tune 48 px, head-only",
    ]
    # bf16 on one row (on a CPU without bf16 units every bf16 step crawls), the rest in fp32.
    result = run_benchmark("--quick", "--train-per-class", "10", "--test-per-class", "5", "--seeds", "1",
                           "--precision", "bf16", "--data", str(tmp_path / "cifar10"),
                           "--out", str(tmp_path / "bf16"), "--runs", chosen[0])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "bf16" / "rows.json").read_text())["settings"]["precision"] == "bf16"
    assert "1 per fine-tuning run; bf16 (requested)" in (tmp_path / "bf16" / "table.md").read_text()
    result = run_benchmark("--quick", "--train-per-class", "10", "--test-per-class", "5", "--seeds", "1",
                           "--precision", "fp32", "--pretrain-epochs", "2", "--data", str(tmp_path / "cifar10"),
                           "--out", str(out), "--runs", *chosen)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "rows.json").read_text())
    assert record["settings"]["precision"] == "fp32" and record["settings"]["pretrain_epochs"] == 2.0
    assert "2 per pre-training run, 1 per fine-tuning run; fp32 (requested)" in (out / "table.md").read_text()
    rows = {name: row["per_seed"]["0"] for name, row in record["rows"].items()}
    pretrained = rows["masked-patch pre-trained, linear stem"]
    assert (
        pretrained["pretrain_steps"] == 2 * pretrained["steps"] == 2 * rows["scratch, linear stem"]["steps"]
    )
    attention, lora, head = (
        rows[f"fine-tune 48 px, {rule}"] for rule in ("attention-only", "LoRA rank 8", "head-only")
    )
    assert head["trainable"] == 10 * 128 + 10 < lora["trainable"] < attention["trainable"]
    assert lora["params"] > attention["params"]  # the adapters are extra parameters
    assert (
        "LoRA (rank 8) fine-tuning at a higher resolution matches full fine-tuning"
        not in (out / "table.md").read_text()
    )


@pytest.mark.parametrize(
    "runs, message",
    [(["scratch, nothing"], "--runs: no row 'scratch, nothing'"),
     (["fine-tune 48 px, full"], "start from 'scratch, linear stem': name it too")],
)  # fmt: skip
def test_bad_runs_are_one_line(tmp_path: Path, runs, message) -> None:
    result = run_benchmark(
        "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--runs", *runs
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
