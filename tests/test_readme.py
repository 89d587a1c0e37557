"""The README's commands, run one after another as printed, in a fresh folder: the README cannot drift.

The folder is laid out like a checkout: `../shared/data/cifar10` is a small ImageFolder made here
(400 JPEGs), `$VITKIT_DATA` points at it for the configs, and the downloaded weights the README names
(`ViT-B_16.npz`, `model.pth`) are stand-ins written here in their layouts. `$VITKIT_SET` shortens
every training schedule to two steps and its evaluations to 32 images; everything else is the README's text. Lines that cannot run
here are listed in SKIPPED with the reason, and each entry must still match a README line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import vitkit
from helpers import make_image_folder
from vitkit.convert import write_layout
from vitkit.data import Digits

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent

# README lines that are not run here, by their first words, with the reason.
SKIPPED = {
    "make test": "the test suite itself",
    "source .venv/bin/activate": "the venv's bin folder is put on the PATH instead",
    "python benchmarks/reproduce.py": "a benchmark of about an hour (its --quick run is tests/test_reproduce.py)",
    "vitkit predict hf-hub:": "downloads from the Hugging Face Hub (tests/test_hub.py reads hf-hub: from an offline cache)",
    "vitkit convert hf-hub:": "downloads from the Hugging Face Hub (tests/test_hub.py runs it on an offline cache)",
}
# README lines run as another command: `make demo` sets up .venv (this test runs in it), then runs this.
REPLACED = {"make demo": "python -m vitkit demo"}
SHORT_SCHEDULE = "train.epochs=1 train.max_steps=2 data.batch_size=8 data.num_workers=0 train.log_every=1"
# Evaluations see 32 images; pre-training has no evaluation (its config has no `eval` section).
SHORT_EVALUATION = "eval.max_samples=32"


def short_schedule(line: str) -> str:
    return SHORT_SCHEDULE if " pretrain " in f" {line} " else f"{SHORT_SCHEDULE} {SHORT_EVALUATION}"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, in order, trailing comments stripped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            if shlex.split(line, comments=True):
                commands.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return commands


def write_stand_ins(folder: Path) -> None:
    """The downloaded checkpoints the README names, as tiny models in the same layouts."""
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, num_classes=5)
    write_layout(model, folder / "ViT-B_16.npz", "npz")
    write_layout(model, folder / "model.pth", "timm")


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_readme_lists_what_it_skips() -> None:
    commands = readme_commands()
    for prefix in [*SKIPPED, *REPLACED]:
        assert any(line.startswith(prefix) for line in commands), (
            f"SKIPPED/REPLACED entry {prefix!r} is stale"
        )


def test_readme_commands_run_in_order(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    data = tmp_path / "shared" / "data"
    make_image_folder(data / "cifar10")
    write_stand_ins(project)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VITKIT_DATA": str(data),
        "VITKIT_SET": SHORT_SCHEDULE,
        "OMP_NUM_THREADS": "1",
    }
    # The Python quick start first, as the README shows it.
    for block in readme_blocks("python"):
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=project, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"README python block failed:\n{block}\n{result.stderr[-3000:]}"
    ran = []
    for line in readme_commands():
        if any(line.startswith(prefix) for prefix in SKIPPED):
            continue
        command = next((REPLACED[p] for p in REPLACED if line.startswith(p)), line)
        result = run_line(command, project, {**env, "VITKIT_SET": short_schedule(line)})
        assert result.returncode == 0, (
            f"README line failed (exit {result.returncode}): {line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
        ran.append(line)
    assert len(ran) >= 20, ran
    # What the lines promise: the demo's config ran again to the same result; eval scored every image.
    demo = (project / "runs/demo/results.json").read_text()
    again = (project / "runs/demo_again/results.json").read_text()
    assert '"top1"' in demo and demo.split('"top1"')[1][:12] == again.split('"top1"')[1][:12]
    train_eval = json.loads((project / "runs/demo/eval_train/results.json").read_text())
    assert train_eval["num_samples"] == len(Digits("train"))


@pytest.mark.parametrize("command", ["info", "zoo"])
def test_readme_names_only_real_commands(command: str) -> None:
    from vitkit.cli import COMMANDS

    names = {name for name, _, _ in COMMANDS}
    used = {line.split()[1] for line in readme_commands() if line.startswith("vitkit ")}
    assert used <= names, used - names
    assert command in used
