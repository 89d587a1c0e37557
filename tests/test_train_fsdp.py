"""FSDP under torchrun on CPU with gloo: two processes holding parameter shards equal one process with
the doubled batch (clipping, EMA, accumulation and an evaluation split unevenly between ranks
included), their checkpoint is an ordinary one that `vitkit.load` reads and one process resumes, a
one-process checkpoint resumes under FSDP, and a non-finite loss on one rank stops both."""

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vitkit
from test_train_distributed import last_weights, run, torchrun, write_config
from test_train_loop import tiny_experiment
from vitkit.io import read_weights
from vitkit.train import train
from vitkit.train.state import find_resumable

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

# 33 images: each rank trains on 16 of them, but evaluates 17 and 16, so FSDP's collective forward
# must run on padding batches. SGD: its update is linear in the gradient (see the DDP test), and a
# clip threshold below every step's gradient norm, so each step is clipped by the global norm.
DATA = {"synthetic_size": 33, "scale": (0.5, 1.0), "hflip": 0.5}
OPTIM = {"name": "sgd", "lr": 0.05, "clip_grad": 0.5}
STEPS_PER_EPOCH = 4


def one_process(out_dir: Path, epochs: int):
    return tiny_experiment(out_dir, epochs=epochs, optim=OPTIM, ema_decay=0.5, data={**DATA, "batch_size": 8})


def fsdp(out_dir: Path, epochs: int, **train):
    """The same global batch of 8: 2 ranks x 2 micro-batches of 2."""
    return tiny_experiment(
        out_dir, epochs=epochs, optim=OPTIM, ema_decay=0.5, accumulation=2, strategy="fsdp",
        data={**DATA, "batch_size": 2}, **train,
    )  # fmt: skip


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def assert_close_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three epochs in one process and under FSDP, and the one-process run continued to a fourth."""
    root = tmp_path_factory.mktemp("fsdp")
    train(one_process(root / "single", epochs=3))
    run(torchrun(write_config(root / "fsdp.json", fsdp(root / "fsdp", epochs=3))))
    shutil.copytree(root / "single", root / "reference")
    train(one_process(root / "reference", epochs=4))
    return root


def test_two_fsdp_processes_equal_one_process_with_the_doubled_batch(runs):
    single, sharded = runs / "single", runs / "fsdp"
    assert_close_weights(last_weights(sharded), last_weights(single))
    earlier = read_weights(checkpoint(single, 8) / "model.safetensors")[0]
    assert not torch.equal(earlier["head.weight"], last_weights(single)["head.weight"])
    # The whole checkpoint is gathered, in the one-process layout: weights, EMA, optimiser moments.
    step = 3 * STEPS_PER_EPOCH
    for name in ("model", "ema", "optimizer"):
        expected = read_weights(checkpoint(single, step) / f"{name}.safetensors")[0]
        assert_close_weights(read_weights(checkpoint(sharded, step) / f"{name}.safetensors")[0], expected)
    states = [
        json.loads((checkpoint(folder, step) / "state.json").read_text()) for folder in (single, sharded)
    ]
    assert states[0]["optimizer"]["param_groups"] == states[1]["optimizer"]["param_groups"]
    assert states[1]["world_size"] == 2
    # Clipping used the norm over all shards, and clipped.
    norms = [
        [row["grad_norm"] for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
         if row["kind"] == "train"]
        for folder in (single, sharded)
    ]  # fmt: skip
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-5, atol=0)
    assert min(norms[0]) > OPTIM["clip_grad"]
    # Evaluation saw every image once, though the ranks had 17 and 16.
    results = [json.loads((folder / "results.json").read_text()) for folder in (single, sharded)]
    assert results[1]["num_samples"] == results[0]["num_samples"] == DATA["synthetic_size"]
    assert results[1]["top1"] == results[0]["top1"]


def test_fsdp_checkpoint_loads_with_vitkit_load_and_resumes_in_one_process(runs, tmp_path, caplog):
    folder = checkpoint(runs / "fsdp", 3 * STEPS_PER_EPOCH)
    model, reference = (
        vitkit.load(f / "model.safetensors").eval()
        for f in (folder, checkpoint(runs / "single", 3 * STEPS_PER_EPOCH))
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)

    shutil.copytree(runs / "fsdp", tmp_path / "resumed")
    with caplog.at_level(logging.WARNING):
        summary = train(one_process(tmp_path / "resumed", epochs=4))
    assert "written by 2 processes" in caplog.text
    assert summary["steps"] == 4 * STEPS_PER_EPOCH
    # The optimiser's momentum came through: the fourth epoch matches the one-process run's.
    assert_close_weights(last_weights(tmp_path / "resumed"), last_weights(runs / "reference"))


def test_one_process_checkpoint_resumes_under_fsdp(runs, tmp_path):
    shutil.copytree(runs / "single", tmp_path / "resumed")
    done = run(torchrun(write_config(tmp_path / "more.json", fsdp(tmp_path / "resumed", epochs=4))))
    assert "resumed from" in done.stderr and "written by 1 processes" in done.stderr
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["steps"] == 4 * STEPS_PER_EPOCH
    assert_close_weights(last_weights(tmp_path / "resumed"), last_weights(runs / "reference"))
    ema = [
        read_weights(checkpoint(f, 4 * STEPS_PER_EPOCH) / "ema.safetensors")[0]
        for f in (tmp_path / "resumed", runs / "reference")
    ]
    assert_close_weights(*ema)


POISONED_CONFIG = '''
"""Rank 1 alone sees a NaN loss, at its fourth micro-batch: step 1, after checkpoint step-00000001."""
import os
import sys

sys.path.insert(0, {tests!r})
from test_train_fsdp import fsdp
from vitkit.train.objectives import OBJECTIVES, supervised

calls = []


def poisoned(model, batch):
    calls.append(1)
    loss, metrics = supervised(model, batch)
    return (loss * float("nan") if len(calls) == 4 and os.environ["RANK"] == "1" else loss), metrics


OBJECTIVES["poisoned"] = poisoned


def experiment():
    return fsdp({out_dir!r}, epochs=2, objective="poisoned", checkpoint_every=1)
'''


def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_step(tmp_path):
    config = tmp_path / "poisoned.py"
    config.write_text(POISONED_CONFIG.format(tests=str(Path(__file__).parent), out_dir=str(tmp_path / "run")))
    done = subprocess.run(
        torchrun(config),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    assert "non-finite loss nan at step 1" in done.stderr
    assert "non-finite loss on another rank" in done.stderr  # rank 0 stopped too, and says why
    folder, _ = find_resumable(tmp_path / "run" / "checkpoints")
    assert folder.name == "step-00000001"
    assert all(torch.isfinite(t).all() for t in read_weights(folder / "model.safetensors")[0].values())
