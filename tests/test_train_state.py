"""The training state as one value: checked field by field when read back, written before the
epoch's evaluation (an interrupt there loses nothing), and the evaluation capped by eval.max_samples."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_train_loop import tiny_experiment
from vitkit.files import CheckpointError
from vitkit.io import read_weights
from vitkit.registry import create_model
from vitkit.train import load_experiment, train
from vitkit.train.metrics import read_metrics
from vitkit.train.state import MARKER, MODEL_NAME, STATE_NAME, check_checkpoint, find_resumable, read_state


def vitkit_train(config: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vitkit", "train", "--config", str(config)]
    command += [f"--set={override}" for override in overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def write_config(path: Path, out_dir: Path, **options) -> Path:
    path.write_text(json.dumps(tiny_experiment(out_dir, **options).to_dict()))
    return path


def resign(folder: Path, name: str) -> None:
    """Recompute the marker's checksum of `name`, as a hostile writer would."""
    marker = json.loads((folder / MARKER).read_text())
    marker["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / MARKER).write_text(json.dumps(marker))


def one_line_refusal(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


@pytest.fixture
def stopped_run(tmp_path) -> tuple[Path, Path]:
    """A run stopped after 2 of its 4 steps: its config file and its checkpoint."""
    config = write_config(tmp_path / "run.json", tmp_path / "run", epochs=2)
    train(tiny_experiment(tmp_path / "run", epochs=2, max_steps=2))
    folder, _ = find_resumable(tmp_path / "run" / "checkpoints")
    return config, folder


def test_a_resigned_state_json_with_a_negative_step_is_refused_in_one_line(stopped_run):
    config, folder = stopped_run
    state = json.loads((folder / STATE_NAME).read_text())
    state["progress"]["step"] = -5
    (folder / STATE_NAME).write_text(json.dumps(state))
    resign(folder, STATE_NAME)
    last = folder.parent.parent / "last.safetensors"
    before = last.stat().st_mtime_ns
    line = one_line_refusal(vitkit_train(config))
    assert str(folder / STATE_NAME) in line and "'progress.step'" in line and "-5" in line
    assert last.stat().st_mtime_ns == before, "nothing is trained from a refused state"


def test_resigned_weights_of_another_width_are_refused_in_one_line(stopped_run):
    config, folder = stopped_run
    _, metadata = read_weights(folder / MODEL_NAME)
    sizes = dict(img_size=32, num_classes=4, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_dim=64)
    wider = create_model("vit_tiny_patch16_224", **sizes)
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, folder / MODEL_NAME, metadata)
    resign(folder, MODEL_NAME)
    line = one_line_refusal(vitkit_train(config))
    assert str(folder / MODEL_NAME) in line and "shape" in line and "48)" in line


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("progress", "epoch"), True, "'progress.epoch'"),
        (("progress", "epoch"), 7, "past step"),
        (("progress", "best_metric"), 3.0, "'progress.best_metric'"),
        (("progress", "train_time"), float("inf"), "'progress.train_time'"),
        (("rng", 0, "torch"), "AAAA", r"'rng\[0\]'"),
        (("rng", 0, "numpy", 2), 10_000, r"'rng\[0\]'"),
        (("world_size",), 3, "'rng'"),
        (("evaluation_due",), "yes", "'evaluation_due'"),
        (("optimizer", "param_groups", 0, "params"), ["a"], r"'optimizer.param_groups\[0\].params'"),
    ],
)
def test_each_field_of_state_json_is_checked(stopped_run, path, value, needle):
    _, folder = stopped_run
    state = json.loads((folder / STATE_NAME).read_text())
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (folder / STATE_NAME).write_text(json.dumps(state))
    resign(folder, STATE_NAME)
    with pytest.raises(CheckpointError, match=needle):
        read_state(folder)


def test_an_interrupt_during_the_evaluation_keeps_the_epoch(tmp_path):
    # 2 steps of 512 images an epoch, then an evaluation of 1,024 images (twice, flip TTA); a model
    # wider and deeper than the tiny one, so that each phase lasts long enough for the watcher below
    # to act inside it on a loaded machine.
    options = dict(
        data={"synthetic_size": 1024, "batch_size": 512},
        model={"embed_dim": 64, "depth": 4},
        epochs=2,
        keep_last=4,
    )
    tta = ["eval.hflip_tta=true"]
    straight = train(load_experiment(tiny_experiment(tmp_path / "straight", **options), tta))
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(load_experiment(tiny_experiment(tmp_path / "run", **options), tta).to_dict())
    )
    command = [sys.executable, "-m", "vitkit", "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "run.log").open("w")
    # A child inherits an ignored SIGINT (an earlier in-process test may leave this worker ignoring
    # it), and Python then never raises KeyboardInterrupt: start the run as a shell would, with
    # SIGINT live.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
    finally:
        signal.signal(signal.SIGINT, inherited)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    epoch_checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    seen = None  # when the row of the epoch's last step was seen
    while time.monotonic() < deadline and process.poll() is None:
        if epoch_checkpoint.is_dir() and check_checkpoint(epoch_checkpoint) is None:
            break  # written whole: the evaluation of epoch 1 has begun, or is about to
        if seen is None and metrics.exists() and any(row.get("step") == 2 for row in read_metrics(metrics)):
            seen = time.monotonic()
        if seen is not None and time.monotonic() > seen + 0.3:
            break  # well into an evaluation that comes before the checkpoint
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=60)
    log.close()
    assert status == 130, (status, (tmp_path / "run.log").read_text()[-3000:])
    assert not any(row["kind"] == "eval" for row in read_metrics(metrics))

    resumed = vitkit_train(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2 (epoch 1, sample 0" in resumed.stderr, "the epoch was trained again"
    rows = read_metrics(metrics)
    assert [row["step"] for row in rows if row["kind"] == "eval"] == [2, 4]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads(resumed.stdout)["steps"] == straight["steps"] == 4
    for name in ("last.safetensors", "best.safetensors"):
        before, after = (
            read_weights(folder / name)[0] for folder in (tmp_path / "straight", tmp_path / "run")
        )
        assert all(torch.equal(before[key], after[key]) for key in before), f"{name} differs"


def test_eval_max_samples_caps_the_evaluation(tmp_path):
    config = write_config(tmp_path / "run.json", tmp_path / "run", epochs=1)
    done = vitkit_train(config, "eval.max_samples=5", "train.max_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_samples"] == 5
    line = one_line_refusal(
        vitkit_train(config, "eval.max_samples=0", "train.out_dir=" + str(tmp_path / "x"))
    )
    assert "eval.max_samples" in line


def test_the_state_read_back_equals_the_state_written(stopped_run):
    _, folder = stopped_run
    state = read_state(folder)
    # The run stopped at an epoch's end that was evaluated, after its state was written.
    assert state.progress.step == 2 and state.world_size == 1 and state.evaluation_due is True
    assert json.loads((folder / "evaluated.json").read_text())["step"] == 2
    assert torch.equal(state.model["head.weight"], read_weights(folder / MODEL_NAME)[0]["head.weight"])


def test_the_evaluator_counts_the_unreadable_files_its_loader_skipped(tmp_path):
    from types import SimpleNamespace

    from vitkit.train import EvalConfig
    from vitkit.train.evaluator import Evaluator

    def count(loader) -> int:
        return Evaluator(EvalConfig(), loader, ["a"], None, tmp_path).unreadable()

    assert count(SimpleNamespace(unreadable=3)) == 3
    assert count(SimpleNamespace(dataset=SimpleNamespace(unreadable=["x.png", "y.png"]))) == 2
    assert count(SimpleNamespace()) == 0
