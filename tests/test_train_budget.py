"""A wall-clock budget: the lr schedule follows the time spent, and training stops when it is spent."""

import itertools
import json
from types import SimpleNamespace

import pytest

import vitkit.train.loop as loop
from test_train_loop import tiny_experiment
from vitkit.train import OptimConfig, RunFinishedError, load_experiment, train
from vitkit.train.optim import learning_rate

STEP_SECONDS = 0.5


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every optimiser step takes exactly STEP_SECONDS on the loop's clock."""
    ticks = itertools.count()
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * STEP_SECONDS))


def test_budget_stops_training_and_anneals_the_schedule_in_time(tmp_path, clock) -> None:
    # 2 steps per epoch for 50 epochs would be 100 steps; a 6-second budget of 0.5-s steps allows 12.
    experiment = load_experiment(tiny_experiment(tmp_path, epochs=50), ["train.time_budget_minutes=0.1"])
    summary = train(experiment)
    assert summary["steps"] == 12 and summary["train_time_s"] == 6.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if row["kind"] == "train"]
    optim = OptimConfig(lr=3e-3, warmup_epochs=1, weight_decay=0.0)
    # Step k starts after k * 0.5 s: the schedule stands at max(k, k * 0.5 / 6 * 100 total steps).
    expected = [learning_rate(optim, max(k, k * STEP_SECONDS / 6 * 100), 100, 2) for k in range(12)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] < 0.03 * optim.lr
    assert rows[-1]["kind"] == "eval" and rows[-1]["train_time_s"] == 6.0
    # The spent budget is part of the saved state: a re-run trains no further, it says the run is finished.
    with pytest.raises(RunFinishedError, match=r"finished \(step 12.*with train.time_budget_minutes=0.1"):
        train(experiment)


def test_budget_must_not_be_negative(tmp_path) -> None:
    with pytest.raises(ValueError, match="time_budget_minutes must be >= 0"):
        load_experiment(tiny_experiment(tmp_path), ["train.time_budget_minutes=-1"])
