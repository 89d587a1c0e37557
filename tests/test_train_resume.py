"""A training process killed with SIGKILL at an arbitrary moment resumes bitwise-equal on CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from test_train_loop import tiny_experiment
from vitkit.io import read_weights
from vitkit.train import train
from vitkit.train.state import find_resumable


def run_command(config_path) -> list[str]:
    return [sys.executable, "-m", "vitkit", "train", "--config", str(config_path)]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    options = dict(
        data={"synthetic_size": 64, "mixup": 0.8, "scale": (0.5, 1.0), "hflip": 0.5},
        model={"drop_path": 0.1},
        ema_decay=0.9,
        epochs=16,  # 128 steps: the kill lands after step 12, with most of the run still to come
        checkpoint_every=1,
        keep_last=2,
    )
    train(tiny_experiment(tmp_path / "straight", **options))
    run_dir = tmp_path / "killed"
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(tiny_experiment(run_dir, **options).to_dict()))

    process = subprocess.Popen(run_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        folder, _ = find_resumable(run_dir / "checkpoints")
        if folder is not None and int(folder.name.split("-")[1]) >= 12:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)  # no chance to clean up: possibly mid-checkpoint
    process.wait()
    assert not (run_dir / "last.safetensors").exists()

    resumed = subprocess.run(run_command(config), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    straight = read_weights(tmp_path / "straight" / "last.safetensors")[0]
    after_kill = read_weights(run_dir / "last.safetensors")[0]
    assert straight.keys() == after_kill.keys()
    assert all(torch.equal(straight[key], after_kill[key]) for key in straight)
