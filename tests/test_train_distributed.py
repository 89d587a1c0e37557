"""torchrun on CPU with gloo: DDP equals one process with the doubled batch, DDP checkpoints move
between world sizes, and an elastic restart after a killed rank ends with the uninterrupted weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_loop import tiny_experiment
from vitkit.io import read_weights
from vitkit.train import train
from vitkit.train.state import find_resumable

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def torchrun(config_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
        "-m", "vitkit", "train", "--config", str(config_path),
    ]  # fmt: skip


def write_config(path: Path, experiment) -> Path:
    path.write_text(json.dumps(experiment.to_dict()))
    return path


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_weights(run_dir / "last.safetensors")[0]


def test_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    # SGD: its update is linear in the gradient. AdamW divides by sqrt(v), which turns the rounding
    # noise of gradients that are zero in exact arithmetic (the key bias) into lr-sized steps.
    data = {"synthetic_size": 32, "scale": (0.5, 1.0), "hflip": 0.5}
    optim = {"name": "sgd", "lr": 0.05}
    train(tiny_experiment(tmp_path / "single", epochs=3, optim=optim, data={**data, "batch_size": 8}))
    ddp = tiny_experiment(tmp_path / "ddp", epochs=3, optim=optim, data={**data, "batch_size": 4})
    config = write_config(tmp_path / "ddp.json", ddp)
    run(torchrun(config))
    single, ddp = last_weights(tmp_path / "single"), last_weights(tmp_path / "ddp")
    assert single.keys() == ddp.keys()  # no `module.` prefixes
    earlier = read_weights(tmp_path / "single" / "checkpoints" / "step-00000008" / "model.safetensors")[0]
    assert not torch.equal(earlier["head.weight"], single["head.weight"])
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert (
        results["num_samples"]
        == json.loads((tmp_path / "single" / "results.json").read_text())["num_samples"]
    )

    # The DDP checkpoint resumes in one process, and that one back under DDP.
    single_config = write_config(
        tmp_path / "more.json",
        tiny_experiment(tmp_path / "ddp", epochs=4, optim=optim, data={**data, "batch_size": 4}),
    )
    done = run([sys.executable, "-m", "vitkit", "train", "--config", str(single_config)])
    assert "written by 2 processes" in done.stderr and "resumed from" in done.stderr
    config = write_config(
        tmp_path / "ddp_more.json",
        tiny_experiment(tmp_path / "ddp", epochs=5, optim=optim, data={**data, "batch_size": 4}),
    )
    done = run(torchrun(config))
    assert "resumed from" in done.stderr
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["steps"] == 3 * 4 + 8 + 4


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


@pytest.mark.slow  # three torchrun launches: about 70 s on 2 busy cores
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker processes")
def test_elastic_restart_after_a_killed_rank_ends_with_the_uninterrupted_weights(tmp_path):
    options = dict(
        data={"synthetic_size": 64, "batch_size": 4, "mixup": 0.8},
        model={"drop_path": 0.1},
        epochs=25,
        checkpoint_every=1,
    )
    straight = write_config(tmp_path / "straight.json", tiny_experiment(tmp_path / "straight", **options))
    run(torchrun(straight))
    config = write_config(tmp_path / "elastic.json", tiny_experiment(tmp_path / "elastic", **options))
    agent = subprocess.Popen(
        torchrun(config, "--max-restarts", "1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and agent.poll() is None:
        folder, _ = find_resumable(tmp_path / "elastic" / "checkpoints")
        if folder is not None and int(folder.name.split("-")[1]) >= 20:
            break
        time.sleep(0.01)
    workers = _children(agent.pid)
    assert agent.poll() is None and workers, "the run ended before a rank could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = agent.communicate(timeout=180)
    assert agent.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr
    reference, restarted = last_weights(tmp_path / "straight"), last_weights(tmp_path / "elastic")
    assert all(torch.equal(reference[key], restarted[key]) for key in reference)
