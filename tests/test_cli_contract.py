"""The command line's contract, run as a user runs it (subprocesses): every command answers --help,
a user's mistake is one line naming the key, flag or path (exit 2, no traceback), evaluation never
guesses its data, and configs find their data from any working folder."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import COMMANDS, build_parser, main, one_line
from vitkit.convert import convert
from vitkit.data import Digits
from vitkit.eval.classification import NonFiniteLogitsError, evaluate_classification

REPO = Path(__file__).resolve().parents[1]
SHORT = "train.epochs=1 train.max_steps=2 data.batch_size=16 train.log_every=1"


def vitkit_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one line on stderr naming every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, lines
    assert "\x1b[" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-step digits run."""
    out = tmp_path_factory.mktemp("run") / "digits"
    result = vitkit_cli(
        "train", "--config", "digits_vit", f"--set=train.out_dir={out}", env={"VITKIT_SET": SHORT}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# 1. Every command answers --help -------------------------------------------------------------------
@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_every_command_answers_help(command: str, capsys) -> None:
    # In this process: the parsers are the ones `python -m vitkit` builds (the subprocess runs of
    # --version and --help below hold the entry point), without a torch start-up per command.
    assert main([command, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: vitkit {command}")
    assert err == ""


def test_version_and_top_level_help() -> None:
    assert vitkit_cli("--version").stdout.strip() == f"vitkit {vitkit.__version__}"
    listing = vitkit_cli("--help").stdout
    assert all(name in listing for name, _, _ in COMMANDS)


def test_broken_pipe_is_quiet() -> None:
    result = subprocess.run(
        f"{sys.executable} -m vitkit zoo 'vit_base_*' | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.startswith("| model |")
    assert result.stderr == ""


# 4. Evaluation never guesses -----------------------------------------------------------------------
def test_eval_refuses_a_checkpoint_that_names_no_data_set(tmp_path: Path) -> None:
    path = vitkit.save(
        vitkit.create_model("vit_tiny_patch16_224", img_size=32, depth=1), tmp_path / "w.safetensors"
    )
    assert_one_line_error(vitkit_cli("eval", str(path)), str(path), "names no data set", "--root")
    assert not (tmp_path / "eval_test").exists()


def test_eval_of_the_train_split_sees_every_image_once_unaugmented(run: Path) -> None:
    first = vitkit_cli("eval", str(run), "--split", "train", "--out", str(run / "a"))
    second = vitkit_cli("eval", str(run), "--split", "train", "--out", str(run / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    results = [json.loads((run / name / "results.json").read_text()) for name in ("a", "b")]
    # Training augmentation and shuffling would change the confusion matrix; drop_last would drop 14.
    assert results[0]["num_samples"] == len(Digits("train")) == 1438
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]
    assert (
        np.array(results[0]["confusion_matrix"]).sum(axis=1).tolist()
        == np.bincount(Digits("train").targets).tolist()
    )


def test_a_test_class_missing_from_train_is_refused_before_training(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "emu"))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for index in range(4):
                Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(root / split / name / f"{index}.png")
    out = tmp_path / "run"
    result = vitkit_cli(
        "train", "--config", "digits_vit", "--set", "data.dataset=imagefolder", "--set", f"data.root={root}",
        "--set", f"train.out_dir={out}", "--set", "data.batch_size=2",
    )  # fmt: skip
    assert_one_line_error(result, "'emu'", "test")
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_non_finite_logits_fail_evaluation() -> None:
    batches = [(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 2)
        logits[2, 0] = float("nan")
        return logits

    with pytest.raises(NonFiniteLogitsError, match="image 2"):
        evaluate_classification(predict, batches, ["a", "b"])


# 5. Paths and values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("model.overrides.depth=abc", ("depth", "'abc'")),
        ("model.overrides.patch_size=5", ("patch_size=5", "stride 5")),
        ("model.overrides.embed_dim=0", ("embed_dim", "0")),
        ("train.max_steps=-1", ("train.max_steps", "-1")),
        ("train.checkpoint_every=-2", ("train.checkpoint_every", "-2")),
        ("data.img_size=-16", ("img_size", "-16")),
        ("optim.lr=abc", ("optim.lr", "abc")),
    ],
)
def test_bad_values_are_one_line_naming_key_and_value(tmp_path: Path, override: str, fragments) -> None:
    result = vitkit_cli(
        "train", "--config", "digits_vit", "--set", override, "--set", f"train.out_dir={tmp_path}"
    )
    assert_one_line_error(result, *fragments)


def test_predict_top_k_out_of_range(run: Path) -> None:
    image = run / "digit.png"
    Image.fromarray(Digits("test").images[0].permute(1, 2, 0).numpy()).save(image)
    for top_k in ("0", "11"):
        assert_one_line_error(
            vitkit_cli("predict", str(run), str(image), "--top-k", top_k), "--top-k", "1..10"
        )
    result = vitkit_cli("predict", str(run), str(image), "--top-k", "3")
    assert result.returncode == 0 and len(result.stdout.split(",")) == 3


def test_config_data_roots_do_not_depend_on_the_working_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for cwd in (REPO, tmp_path):
        for config in ("finetune_cifar10", "cifar10_vit"):
            result = vitkit_cli(
                "train", "--config", config, "--print-config", cwd=cwd, env={"VITKIT_DATA": str(data)}
            )
            assert json.loads(result.stdout)["data"]["root"] == str(data / "cifar10"), result.stderr
    result = vitkit_cli(
        "train", "--config", "finetune_cifar10", "--print-config", cwd=tmp_path, env={"VITKIT_DATA": ""}
    )
    assert json.loads(result.stdout)["data"]["root"] == str((REPO.parent / "shared/data/cifar10").resolve())
    # A root typed on the command line is the user's: taken from the working folder.
    result = vitkit_cli(
        "train", "--config", "finetune_cifar10", "--set", "data.root=mine", "--print-config", cwd=tmp_path
    )
    assert json.loads(result.stdout)["data"]["root"] == str(tmp_path / "mine")


def test_pretrain_config_data_root_and_types(tmp_path: Path) -> None:
    result = vitkit_cli("pretrain", "--print-config", cwd=tmp_path, env={"VITKIT_DATA": str(tmp_path)})
    assert json.loads(result.stdout)["data"]["root"] == str(tmp_path / "cifar10"), result.stderr
    assert_one_line_error(
        vitkit_cli("pretrain", "--set", "optim.lr=abc", "--print-config"), "optim.lr", "abc"
    )


def test_every_checkpoint_command_takes_a_run_folder(run: Path, tmp_path: Path) -> None:
    result = vitkit_cli("export", str(run), str(tmp_path / "model.onnx"))
    assert result.returncode == 0, result.stderr[-2000:]
    result = vitkit_cli("plot", "pos-embed", str(run), "--out", str(tmp_path / "pos.png"))
    assert result.returncode == 0 and (tmp_path / "pos.png").stat().st_size > 0, result.stderr[-2000:]
    empty = tmp_path / "unfinished"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    assert_one_line_error(
        vitkit_cli("export", str(empty), str(tmp_path / "x.onnx")), str(empty), "not finished"
    )


def test_convert_refuses_a_suffix_its_target_cannot_write(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert_one_line_error(
        vitkit_cli("convert", str(run / "best.safetensors"), str(out), "--to", "timm"), "out.onnx", ".pth"
    )
    assert not out.exists()
    assert (
        vitkit_cli(
            "convert", str(run / "best.safetensors"), str(tmp_path / "t.pth"), "--to", "timm"
        ).returncode
        == 0
    )


def test_messages_name_the_cli_flag_not_the_api_argument(tmp_path: Path) -> None:
    # Width 48 is not in the size table, so the number of heads must be given: the CLI says --num-heads.
    model = vitkit.create_model(
        "vit_tiny_patch16_224", img_size=32, embed_dim=48, num_heads=3, depth=1, zero_head=False
    )
    path = vitkit.save(model, tmp_path / "w.safetensors")
    convert(path, tmp_path / "w.npz", to="npz")
    line = assert_one_line_error(
        vitkit_cli("convert", str(tmp_path / "w.npz"), str(tmp_path / "o.safetensors"), "--to", "vitkit"),
        "--num-heads",
    )
    assert "num_heads=" not in line


def test_os_errors_name_the_path(run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "w.safetensors"
    result = vitkit_cli("convert", str(run / "best.safetensors"), str(target), "--to", "vitkit")
    assert_one_line_error(result, str(blocker))
    parser, commands = build_parser()
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/last.safetensors")
    assert one_line(full, commands["train"]) == "/data/run/last.safetensors: No space left on device"
    assert one_line(ValueError("\x1b[31mbad\x1b[0m\n  value"), commands["train"]) == "bad value"
