"""The run folder is a contract (`vitkit.train.run_folder`): one writer, a resume that checks what it
resumes, a start-over that never mixes runs, a finished run that says so, debris of killed writes
cleaned. The refusals are checked from the command line: one line on stderr, exit code 2."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_pretrain import write_config as write_pretrain_config
from test_train_loop import tiny_experiment
from vitkit.io import read_weights
from vitkit.train import load_experiment, train
from vitkit.train.pretrain import load_pretrain_experiment, pretrain
from vitkit.train.run_folder import RunFinishedError, RunLock, config_changes, read_jsonl
from vitkit.train.state import find_resumable, list_checkpoints

# digits_vit cut down: width 32, depth 1, batches of 128 (11 steps an epoch), evaluation at the end.
TINY = [
    "model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.mlp_dim=64",
    "data.batch_size=128", "eval.every=100", "train.log_every=1",
]  # fmt: skip


def overrides(out_dir: Path, *extra: str) -> list[str]:
    return [f"train.out_dir={out_dir}", *TINY, *extra]


def train_here(out_dir: Path, *extra: str) -> dict:
    """A digits run in this process (the setup of a test, faster than a subprocess)."""
    return train(load_experiment("digits_vit", overrides(out_dir, *extra)))


def command(out_dir: Path | None, *extra: str, config: str = "digits_vit") -> list[str]:
    flags = overrides(out_dir, *extra) if out_dir is not None else list(extra)
    return [sys.executable, "-m", "vitkit", "train", "--config", config, *(f"--set={f}" for f in flags)]


def vitkit_train(out_dir: Path | None, *extra: str, config: str = "digits_vit", timeout: float = 120):
    return subprocess.run(
        command(out_dir, *extra, config=config), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one stderr line of a refused `vitkit train` (exit code 2, no traceback)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("vitkit train: error: ")
    return lines[0]


def written(out_dir: Path) -> dict[str, int]:
    """Modification times of everything in the folder: what a refused command must leave alone."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(out_dir.rglob("*")) if p.name != ".lock"}


def test_a_second_writer_refuses_at_once_and_the_first_run_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    extra = ("train.epochs=8", "train.checkpoint_every=5")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = [
        subprocess.Popen(command(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=environment)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=180) for process in started]
    codes = [process.returncode for process in started]
    assert sorted(codes) == [0, 2], [err[-2000:] for _, err in outputs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    line = refusal(subprocess.CompletedProcess([], 2, outputs[loser][0], outputs[loser][1]))
    assert f"pid {started[winner].pid} on host {socket.gethostname()}" in line and "in use" in line
    train_here(tmp_path / "alone", *extra)
    alone, run = (read_weights(folder / "last.safetensors")[0] for folder in (tmp_path / "alone", run_dir))
    assert all(torch.equal(alone[key], run[key]) for key in alone)
    steps = [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if row["kind"] == "train"]
    assert steps == list(range(1, 8 * 11 + 1))
    assert [entry["event"] for entry in read_jsonl(run_dir / "history.jsonl")] == ["start", "finish"]
    assert (run_dir / ".lock").read_text() == ""  # released


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_log_line(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    tmp_path.joinpath(".lock").write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "since": "x"})
    )
    done = vitkit_train(tmp_path, "train.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"took over the lock of pid {pid} on host {socket.gethostname()}" in done.stderr
    # A holder refuses an in-process second writer too; releasing empties the file.
    with RunLock(tmp_path), pytest.raises(ValueError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    assert tmp_path.joinpath(".lock").read_text() == ""


def test_a_resume_of_another_model_is_refused_and_a_schedule_change_recorded(tmp_path):
    train_here(tmp_path, "train.max_steps=3")
    before = written(tmp_path)
    line = refusal(vitkit_train(tmp_path, "train.max_steps=6", "model.overrides.depth=2"))
    assert "model.overrides.depth 1 -> 2" in line and "train.max_steps" not in line
    assert "new train.out_dir" in line and "train.resume=never" in line
    assert written(tmp_path) == before

    done = vitkit_train(tmp_path, "train.max_steps=6", "optim.lr=1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "schedule changes recorded" in done.stderr and "train.max_steps 3 -> 6" in done.stderr
    start, finish, resume, _ = read_jsonl(tmp_path / "history.jsonl")
    assert (start["event"], finish["event"], resume["event"]) == ("start", "finish", "resume")
    assert resume["step"] == 3 and resume["changes"] == {"optim.lr": [2e-3, 1e-3], "train.max_steps": [3, 6]}
    # config.json is the run's config now; the history keeps what it was.
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 6
    assert start["config"]["train"]["max_steps"] == 3


def test_a_run_saved_before_progressive_resizing_existed_resumes(tmp_path):
    train_here(tmp_path, "train.max_steps=3")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["train"]["progressive_min_size"], config["train"]["progressive_end"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train_here(tmp_path, "train.max_steps=6")["steps"] == 6


def test_a_batch_size_changed_mid_epoch_goes_on_from_a_step_boundary(tmp_path):
    train_here(tmp_path, "train.max_steps=1")  # 128 samples into the epoch
    done = vitkit_train(tmp_path, "train.max_steps=3", "data.batch_size=96")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sample 128 of epoch 0, is not at a step of 96 samples" in done.stderr
    assert "goes on from sample 96" in done.stderr
    assert read_jsonl(tmp_path / "history.jsonl")[2]["changes"]["data.batch_size"] == [128, 96]


def test_starting_over_sets_the_old_run_aside_and_keeps_the_new_checkpoints(tmp_path):
    train_here(tmp_path, "train.epochs=1", "train.checkpoint_every=1")
    done = vitkit_train(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.resume=never")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000003", "step-00000002"]
    (previous,) = (tmp_path / "previous").iterdir()
    assert f"moved the earlier run of {tmp_path} to {previous}" in done.stderr
    assert [p.name for p in list_checkpoints(previous / "checkpoints")] == ["step-00000011", "step-00000010"]
    assert (previous / "last.safetensors").exists() and (previous / "history.jsonl").exists()
    assert read_jsonl(tmp_path / "history.jsonl")[0]["previous_run"] == str(previous)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["resume"] == "auto"
    # A later resume continues the new run, never the old one.
    done = vitkit_train(tmp_path, "train.max_steps=4", "train.checkpoint_every=1")
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-00000003'}" in done.stderr


def test_a_finished_run_says_so_and_writes_nothing(tmp_path):
    """The same config again: one line, exit 0 (nothing to do); a schedule that leaves nothing to
    train: refused. Neither writes anything."""
    train_here(tmp_path, "train.max_steps=2")
    before = written(tmp_path)
    finished = f"the run in {tmp_path} is already finished (step 2, epoch 0, test top-1 "
    for done in (
        vitkit_train(tmp_path, "train.max_steps=2"),
        vitkit_train(None, config=str(tmp_path / "config.json")),  # a run's config runs again as is
    ):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 0 and len(lines) == 1 and done.stdout == "", done.stderr[-3000:]
        assert lines[0].startswith(f"vitkit train: {finished}")
        assert "raise train.max_steps" in lines[0] and "train.resume=never" in lines[0]
    line = refusal(vitkit_train(tmp_path, "train.max_steps=1"))
    assert finished in line and "nothing is left to train with train.max_steps 2 -> 1" in line
    assert written(tmp_path) == before


def test_a_finished_pretraining_says_so(tmp_path):
    config = write_pretrain_config(tmp_path)
    pretrain(load_pretrain_experiment(config, ["train.max_steps=4"]))  # logs its loss at step 4
    with pytest.raises(RunFinishedError, match=r"already finished \(step 4, epoch 0, train loss "):
        pretrain(load_pretrain_experiment(config, ["train.max_steps=4"]))


def _write_images(root: Path, num_per_class: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        for split in ("train", "test"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(num_per_class):
                pixels = torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")


def test_a_resume_after_files_were_removed_restarts_the_epoch_and_ends(tmp_path):
    _write_images(tmp_path / "data", num_per_class=8)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "data"), "img_size": 16, "batch_size": 4}
    experiment = tiny_experiment(tmp_path / "run", data=data, model={"patch_size": 4}, epochs=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(experiment.to_dict()))
    train(load_experiment(str(config), ["train.max_steps=3", "train.checkpoint_every=1"]))  # 12 of 16 samples
    for path in sorted((tmp_path / "data" / "train").rglob("*.png"))[::2]:
        path.unlink()  # 8 samples left: 2 steps an epoch
    done = vitkit_train(None, "train.checkpoint_every=1", config=str(config), timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sample 12 of epoch 0, is past the end of an epoch" in done.stderr and "restarts" in done.stderr
    steps = [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if row["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # 3, then the two epochs of 2 steps


def test_a_metrics_line_cut_by_a_kill_does_not_block_the_resume(tmp_path):
    train_here(tmp_path, "train.max_steps=2")
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "epoch": 0, "ki')
    done = vitkit_train(tmp_path, "train.max_steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dropped its last line, cut short by a killed write" in done.stderr
    steps = [row["step"] for row in read_jsonl(tmp_path / "metrics.jsonl") if row["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_the_debris_of_killed_writes_is_cleaned_before_a_resume(tmp_path):
    train_here(tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=3")
    checkpoints = tmp_path / "checkpoints"
    newest = checkpoints / "step-00000004"
    temporary = [tmp_path / ".last.safetensors.k2j4h1.tmp", newest / ".optimizer.safetensors.x8a9.tmp"]
    for path in temporary:
        path.write_bytes(b"cut")
    cut_save = checkpoints / "step-00000005"  # a save killed before its marker
    cut_save.mkdir()
    (cut_save / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes())
    (checkpoints / "step-00000002" / "model.safetensors").unlink()  # a retention killed midway
    done = vitkit_train(tmp_path, "train.max_steps=6", "train.checkpoint_every=1", "train.keep_last=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deleted 2 temporary files of killed writes" in done.stderr
    assert "deleted checkpoint step-00000005, cut short" in done.stderr
    assert "deleted checkpoint step-00000002, cut short" in done.stderr
    assert f"resumed from {newest}" in done.stderr
    assert not any(path.exists() for path in temporary)
    assert [p.name for p in list_checkpoints(checkpoints)] == [f"step-0000000{n}" for n in (6, 5, 4)]


def test_a_damaged_checkpoint_is_set_aside_for_inspection(tmp_path):
    train_here(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=3")
    newest = tmp_path / "checkpoints" / "step-00000003"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    done = vitkit_train(tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checksum mismatch" in done.stderr and "resumed from" in done.stderr
    assert (tmp_path / "checkpoints" / "damaged" / "step-00000003" / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][0] == "step-00000004"


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def _running(pid: int) -> bool:
    """Whether any thread of `pid` is alive: a killed process's leader shows Z while its other threads
    are still exiting, and those still hold its files (and so its flock)."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rpartition(")")[2].split()[0])
        except OSError:  # the thread ended between the listing and the read
            continue
    return any(state not in ("Z", "X") for state in states)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker processes")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_workers_stop_when_the_torchrun_agent_is_killed(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(tiny_experiment(tmp_path / "run", epochs=5000, checkpoint_every=1).to_dict())
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vitkit", "train", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and find_resumable(tmp_path / "run" / "checkpoints")[0] is None:
        time.sleep(0.05)
    workers = _children(agent.pid)
    assert agent.poll() is None and len(workers) == 2, "the run ended before its agent could be killed"
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)  # not to leave them training after a failure
    assert not left, "workers went on training without their agent"
    with RunLock(tmp_path / "run"):  # the lock of rank 0 went with it
        pass


def test_fields_added_since_a_run_count_at_their_old_value_where_the_config_has_them():
    saved = {"train": {"epochs": 1}, "eval": {"hflip_tta": False}}  # written before eval.shift_tta existed
    current = {
        "train": {"epochs": 1, "progressive_min_size": 0},
        "eval": {"hflip_tta": False, "shift_tta": 0},
    }
    assert config_changes(saved, current) == {}
    shifted = {**current, "eval": {"hflip_tta": False, "shift_tta": 1}}
    assert config_changes(saved, shifted) == {"eval.shift_tta": [0, 1]}
    # a pre-training config has no eval section: no eval field is added to its saved config
    pretraining = {"train": {"epochs": 1, "progressive_min_size": 0}}
    assert config_changes({"train": {"epochs": 1}}, pretraining) == {}
