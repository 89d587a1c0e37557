"""The CLI's user-facing faults, each case as `python -m vitkit ...` in a process of its own: unreadable
images in every evaluation path, values out of range, advice that must work when followed, surprises.

Each case must end with exit 0 and what the user asked for, or with exactly one line (no traceback)
and a non-zero exit. `VITKIT_FAULTS_TABLE=path.json` records each case's outcome, wall time and peak
memory (`benchmarks/faults_table.py` prints them as a table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import tiny_config
from vitkit.data import write_shards
from vitkit.models.vit import VisionTransformer
from vitkit.train.state import model_metadata

SRC = Path(__file__).parent.parent / "src"
RESULTS: list[dict] = []
CLASSES = ["a", "b"]


def vitkit(*argv: str, timeout_s: float = 120, env: dict | None = None) -> dict:
    """Run `python -m vitkit argv` in its own process: exit code, output, wall time and peak RSS."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "vitkit", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environment, **(env or {})},
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        timed_out = True
    # ru_maxrss of the children reaped so far; each case's child is the only one since the last read.
    peak_kib = _children_peak_kib()
    return {
        "rc": process.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "timed_out": timed_out,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": peak_kib / 1024,
    }


def _children_peak_kib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


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
    RESULTS[-1]["outcome"] = f"exit {rc}: " + lines[0].split(": ", 1)[-1][:150]
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
