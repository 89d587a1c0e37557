"""The CLI's user-facing faults, each case as `python -m vitkit ...` in a process of its own: unreadable
images in every evaluation path, values out of range, advice that must work when followed, surprises.

Each case must end with exit 0 and what the user asked for, or with exactly one line (no traceback)
and a non-zero exit. `VITKIT_FAULTS_TABLE=path.json` records each case's outcome, wall time and peak
memory (`benchmarks/faults_table.py` prints them as a table).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import tiny_config
from vitkit.data import write_shards
from vitkit.io import save
from vitkit.models.vit import VisionTransformer
from vitkit.train.state import model_metadata

SRC = Path(__file__).parent.parent / "src"
RESULTS: list[dict] = []
CLASSES = ["a", "b"]


def vitkit(*argv: str, timeout_s: float = 120, env: dict | None = None, max_file_bytes: int = 0) -> dict:
    """Run `python -m vitkit argv` in its own process, killed at `timeout_s`: exit code, output, wall
    time and the process's own peak RSS (from `wait4`). `max_file_bytes` (RLIMIT_FSIZE) makes a
    write past that size fail with EFBIG, as a full disk fails (Python ignores SIGXFSZ)."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    killed = threading.Event()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "vitkit", *map(str, argv)],
            stdout=stdout,
            stderr=stderr,
            text=True,
            env={**environment, **(env or {})},
            preexec_fn=limit_file_size if max_file_bytes else None,
        )
        timer = threading.Timer(timeout_s, lambda: (killed.set(), process.kill()))
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall_s = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        return {
            "rc": process.returncode,
            "stdout": stdout.read(),
            "stderr": stderr.read(),
            "timed_out": killed.is_set(),
            "wall_s": wall_s,
            "peak_rss_mib": usage.ru_maxrss / 1024,
        }


class Cases:
    """Runs and records the cases; the base RSS is that of `vitkit --version` (the imports only)."""

    def __init__(self) -> None:
        self.base_rss_mib = vitkit("--version")["peak_rss_mib"]

    def __call__(self, case: str, *argv: str, **options) -> dict:
        reply = vitkit(*argv, **options)
        RESULTS.append({"case": case, **reply, "base_rss_mib": self.base_rss_mib})
        return reply


@pytest.fixture(scope="module")
def run():
    yield Cases()
    table = os.environ.get("VITKIT_FAULTS_TABLE")
    if table:
        Path(table).write_text(json.dumps(RESULTS, indent=1))


def refused(reply: dict, *needles: str, rc: int = 2) -> str:
    """The case ended with exit `rc` and exactly one line on stderr containing every needle."""
    assert not reply["timed_out"], f"hung until killed: {reply}"
    assert "Traceback" not in reply["stderr"], reply["stderr"]
    assert reply["rc"] == rc, reply
    lines = [line for line in reply["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, reply["stderr"]
    for needle in needles:
        assert needle in lines[0], lines[0]
    # The table shows the message without the test's temporary folder.
    message = re.sub(r"/\S*/pytest-\d+/[^/\s]+/", "", lines[0].split("error: ", 1)[-1])
    RESULTS[-1]["outcome"] = f"exit {rc}: {message[:150]}"
    return lines[0]


def completed(reply: dict, outcome: str) -> str:
    assert not reply["timed_out"], f"hung until killed: {reply}"
    assert "Traceback" not in reply["stderr"], reply["stderr"]
    assert reply["rc"] == 0, reply
    RESULTS[-1]["outcome"] = f"exit 0: {outcome}"
    return reply["stdout"]


# Inputs ------------------------------------------------------------------------------------------------
def write_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def folder_with_broken_files(root: Path) -> Path:
    """`root/test/{a,b}`: 10 valid JPEGs (5 per class) and three broken files in class a."""
    for index in range(10):
        write_jpeg(root / "test" / CLASSES[index % 2] / f"{index}.jpg", seed=index)
    broken = root / "test" / "a"
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("not an image")
    whole = write_jpeg(broken / "truncated.jpg", seed=99).read_bytes()
    (broken / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def write_checkpoint(path: Path, classes: list[str] = CLASSES, data: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(num_classes=len(classes)))
    data = data or {
        "dataset": "imagefolder",
        "root": "/data/trained-on",
        "img_size": 32,
        "num_workers": 0,
        "batch_size": 4,
    }
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=model_metadata(model.config, classes, data))
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors")


# 1. Unreadable images are dropped and counted, never scored as other images -----------------------------
@pytest.mark.parametrize("path", ["folder", "cache", "shards"])
def test_eval_skips_unreadable_files_and_counts_them(run, tmp_path, checkpoint, path):
    root = folder_with_broken_files(tmp_path / "data")
    options = ["--set", f"root={root}"]
    if path == "cache":
        options += ["--set", "cache=true", "--set", f"cache_dir={tmp_path / 'cache'}"]
    if path == "shards":
        write_shards(root / "test", tmp_path / "shards" / "test", verify="none", seed=None)
        options = ["--set", f"root={tmp_path / 'shards'}", "--set", "dataset=shards"]
    out = tmp_path / "eval"
    reply = run(
        f"eval: 10 images and 3 unreadable files ({path})", "eval", checkpoint, *options, "--out", out
    )
    stdout = completed(reply, "10 images scored; 3 unreadable files skipped and listed")
    assert "(10 images; 3 unreadable files skipped: " in stdout
    # A shard names its samples by tar file and key; a folder by file.
    names = ["shard-000000.tar"] if path == "shards" else ["empty.jpg", "text.jpg", "truncated.jpg"]
    for name in names:
        assert name in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["num_samples"] == 10
    assert np.array(results["confusion_matrix"]).sum(axis=1).tolist() == [5, 5]
    assert len(results["unreadable"]) == 3


# 6. Values out of range are one line, not a traceback ----------------------------------------------------
@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_outside_the_tcp_range(run, checkpoint, port):
    reply = run(f"serve --port {port}", "serve", checkpoint, "--port", port)
    refused(reply, "vitkit serve: error:", "--port", port, "0..65535")


@pytest.mark.parametrize(
    ("figure", "flag", "value"),
    [
        ("filters", "--num-components", "0"),
        ("filters", "--num-components", "-1"),
        ("attention-distance", "--max-images", "0"),
        ("attention-distance", "--batch-size", "0"),
    ],
)
def test_plot_counts_below_one(run, tmp_path, checkpoint, figure, flag, value):
    images = [write_jpeg(tmp_path / "image.jpg", seed=0)] if figure == "attention-distance" else []
    out = tmp_path / "figure.png"
    reply = run(
        f"plot {figure} {flag} {value}", "plot", figure, checkpoint, *images, flag, value, "--out", out
    )
    refused(reply, "vitkit plot: error:", flag, value, ">= 1")
    assert not out.exists()


def test_unknown_flag_is_named_by_its_command(run, checkpoint):
    reply = run("predict --img-size (not a predict flag)", "predict", checkpoint, "x.png", "--img-size", "64")
    refused(reply, "vitkit predict: error:", "unrecognized arguments: --img-size 64", "vitkit predict --help")


# 7. Advice works when followed ---------------------------------------------------------------------------
def unfinished_run(root: Path) -> Path:
    """A run folder that has written one rotated checkpoint and no best/last weights yet."""
    (root / "checkpoints" / "step-00000003").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"train": {"out_dir": str(root)}}))
    write_checkpoint(root / "checkpoints" / "step-00000003" / "model.safetensors")
    return root


def test_eval_of_an_unfinished_run_names_a_file_that_evaluates(run, tmp_path):
    root = folder_with_broken_files(tmp_path / "data")
    folder = unfinished_run(tmp_path / "run")
    line = refused(run("eval of a run with no best weights yet", "eval", folder), "no best.safetensors")
    advised = line.split("pass one of its weight files: ", 1)[1].split(", ")[0]
    assert advised == str(folder / "checkpoints" / "step-00000003" / "model.safetensors")
    reply = run("eval of the checkpoint it advises", "eval", advised, "--set", f"root={root}")
    completed(reply, "evaluated; results written beside checkpoints/, in eval_test_step-00000003")
    # 8. Out of the folder that checkpoint rotation deletes.
    assert (folder / "eval_test_step-00000003" / "results.json").is_file()
    assert not (folder / "checkpoints" / "step-00000003" / "eval_test").exists()


def test_unknown_head_count_is_advised_with_a_command_that_exists(run, tmp_path):
    from vitkit.convert import write_layout

    torch.manual_seed(0)
    source = write_layout(
        VisionTransformer(tiny_config(num_classes=2)), tmp_path / "timm.safetensors", to="timm"
    )
    image = write_jpeg(tmp_path / "image.jpg", seed=0)
    line = refused(run("predict: width outside the size table", "predict", source, image), "number of heads")
    assert "pass num_heads=" not in line and "vitkit convert SRC DST --num-heads N" in line
    converted = tmp_path / "converted.safetensors"
    reply = run(
        "the advised convert --num-heads", "convert", source, converted, "--to", "vitkit", "--num-heads", "4"
    )
    completed(reply, "converted with the heads given")
    completed(run("predict of the converted file", "predict", converted, image), "predicted")


def test_siglip_export_of_a_classifier_advises_a_flag_that_exists(run, tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "map.safetensors"
    save(VisionTransformer(tiny_config(num_classes=2, class_token=False, pool="map")), source)
    line = refused(
        run("convert --to siglip of a classifier", "convert", source, tmp_path / "a", "--to", "siglip"),
        "a classifier",
    )
    assert "--num-classes 0" in line and "num_classes=0" not in line
    reply = run(
        "the advised convert --num-classes 0",
        "convert",
        source,
        tmp_path / "b",
        "--to",
        "siglip",
        "--num-classes",
        "0",
    )
    completed(reply, "a SigLIP tower without the head")
    assert (tmp_path / "b" / "config.json").is_file()


def test_folder_with_only_a_start_file_names_it(run, tmp_path):
    folder = tmp_path / "finetune"
    folder.mkdir()
    start = write_checkpoint(folder / "init-0123abcd.safetensors")
    image = write_jpeg(tmp_path / "image.jpg", seed=0)
    line = refused(run("predict of a run folder holding only its start", "predict", folder, image), "init-")
    assert str(start) in line
    completed(run("predict of the start file it names", "predict", start, image), "predicted")


# 8. Surprises --------------------------------------------------------------------------------------------
def test_zoo_pattern_that_matches_nothing(run):
    refused(run("zoo 'nothing_*'", "zoo", "nothing_*"), "vitkit zoo: error:", "'nothing_*'")


def test_plot_out_folder_gets_the_figure_inside(run, tmp_path, checkpoint):
    out = tmp_path / "figures"
    out.mkdir()
    completed(
        run("plot --out FOLDER", "plot", "pos-embed", checkpoint, "--out", out), "wrote FOLDER/pos-embed.png"
    )
    assert (out / "pos-embed.png").is_file()


def test_train_split_smaller_than_a_batch_names_the_sizes(run, tmp_path):
    from test_train_loop import tiny_experiment

    for index in range(10):
        write_jpeg(tmp_path / "data" / "train" / CLASSES[index % 2] / f"{index}.jpg", seed=index)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "data"), "batch_size": 64}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_experiment(tmp_path / "run", epochs=1, data=data).to_dict()))
    reply = run("train: 10 images at batch 64", "train", "--config", config)
    refused(reply, "vitkit train: error:", "10 images", "batch_size 64", "drop_last")


def config_file(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("case", "lines", "needle"),
    [
        ("a syntax error", ["x = 1", "def experiment(:", "    pass"], ":2: SyntaxError: "),
        (
            "an exception",
            ["from vitkit.train import Experiment", "", "", "def experiment():", "    return 1 / 0"],
            ":5: ZeroDivisionError: division by zero while running experiment() of the config",
        ),
        ("a failing import", ["import vitkit_no_such_module"], ":1: ModuleNotFoundError: "),
    ],
)
def test_config_file_that_fails_names_its_line(run, tmp_path, case, lines, needle):
    path = config_file(tmp_path / "my.py", *lines)
    refused(run(f"train --config my.py with {case}", "train", "--config", path), f"{path}{needle}")


def tiny_config_file(tmp_path: Path, data: dict | None = None, **train) -> Path:
    from test_train_loop import tiny_experiment

    config = tmp_path / "config.json"
    experiment = tiny_experiment(tmp_path / "run", data=data, **{"epochs": 2, **train})
    config.write_text(json.dumps(experiment.to_dict()))
    return config


def stopped(reply: dict, *needles: str) -> str:
    """A training that stopped part-way: its progress lines, then one line of error (no traceback)."""
    assert not reply["timed_out"], f"hung until killed: {reply}"
    assert "Traceback" not in reply["stderr"], reply["stderr"]
    assert reply["rc"] == 2, reply
    line = reply["stderr"].strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, line
    message = re.sub(r"/\S*/pytest-\d+/[^/\s]+/", "", line.split("error: ", 1)[-1])
    RESULTS[-1]["outcome"] = f"exit 2: {message[:150]}"
    return line


def test_full_disk_during_a_checkpoint_write_leaves_the_run_resumable(run, tmp_path):
    config = tiny_config_file(tmp_path)
    folder = tmp_path / "run"
    # Two steps an epoch: a complete checkpoint at step 2 first.
    completed(run("train to step 2", "train", "--config", config, "--set", "train.max_steps=2"), "step 2")
    # 150 kB lets a checkpoint's model (100 kB) through and stops its optimiser state (200 kB).
    reply = run("train on to step 4, the disk full", "train", "--config", config, max_file_bytes=150_000)
    written = folder / "checkpoints" / "step-00000004" / "optimizer.safetensors"
    stopped(reply, f"vitkit train: error: {written}: File too large")
    assert not list(folder.rglob("*.tmp")), "a temporary file was left behind"
    assert not (folder / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    reply = run("the same command with space again", "train", "--config", config)
    completed(reply, "resumed from step 2 and finished")
    assert f"resumed from {folder / 'checkpoints' / 'step-00000002'} at step 2" in reply["stderr"]
    assert json.loads(reply["stdout"])["steps"] == 4


def test_explicit_set_wins_over_the_environment(run, tmp_path):
    environment = {"VITKIT_SET": "train.epochs=7 train.seed=5"}
    argv = ["train", "--config", "digits_vit", "--set", "train.epochs=3", "--print-config"]
    reply = run("train --set epochs=3 under VITKIT_SET epochs=7", *argv, env=environment)
    printed = json.loads(completed(reply, "--set wins: epochs 3; seed 5 from VITKIT_SET"))
    assert printed["train"]["epochs"] == 3 and printed["train"]["seed"] == 5
    assert reply["stderr"].count("VITKIT_SET") == 1 and "wins" in reply["stderr"]


def test_finetune_announces_the_environment_once(run, tmp_path, checkpoint):
    argv = ["finetune", checkpoint, "--print-config", "--set", f"data.root={tmp_path}"]
    reply = run("finetune under VITKIT_SET", *argv, env={"VITKIT_SET": "train.epochs=1"})
    printed = json.loads(completed(reply, "VITKIT_SET announced once"))
    assert printed["train"]["epochs"] == 1
    assert reply["stderr"].count("VITKIT_SET") == 1, reply["stderr"]


def test_training_on_one_class_is_refused(run, tmp_path):
    for index in range(8):
        write_jpeg(tmp_path / "data" / "train" / "cat" / f"{index}.jpg", seed=index)
        write_jpeg(tmp_path / "data" / "test" / "cat" / f"{index}.jpg", seed=index)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "data"), "batch_size": 4}
    config = tiny_config_file(tmp_path, data=data)
    reply = run("train on a folder of one class", "train", "--config", config)
    refused(reply, "vitkit train: error:", f"{tmp_path / 'data' / 'train'}: one class, 'cat'", "2 classes")
    assert not list((tmp_path / "run").rglob("*.safetensors"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: no thread count to choose")
def test_default_thread_count_is_measured_before_training(run, tmp_path):
    # 2 steps an epoch, 50 steps: long enough to repay the measurement.
    config = tiny_config_file(tmp_path, epochs=25, num_threads=0)
    reply = run("train with train.num_threads=0 (measured)", "train", "--config", config)
    completed(reply, "thread count measured on throwaway passes, chosen and logged")
    lines = [line for line in reply["stderr"].splitlines() if "measured passes/s by thread count" in line]
    assert len(lines) == 1, reply["stderr"]
    RESULTS[-1]["outcome"] += f" ({lines[0]})"
    assert json.loads(reply["stdout"])["steps"] == 50
