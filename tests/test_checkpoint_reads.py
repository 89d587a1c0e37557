"""A checkpoint is read once: every file opened once, every tensor read once, whether it is loaded
with `vitkit.load`, as `eval`/`predict`/`serve` load a run folder, or converted.

Opens are counted at the Python calls that open a file (`safe_open`, `torch.load`, `numpy.load`,
`open` for JSON and archives); an open made inside another counted one is not counted twice."""

from __future__ import annotations

import builtins
import io
import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import vitkit
from helpers import tiny_config
from vitkit.convert import convert, write_layout
from vitkit.eval.classification import load_classifier
from vitkit.train.state import (
    EMA_NAME,
    MARKER,
    MODEL_NAME,
    OPTIMIZER_NAME,
    STATE_NAME,
    Progress,
    TrainState,
    capture_rng,
    model_metadata,
    read_state,
    write_state,
    write_weights,
)

CLASSES = ["cat", "dog", "eel", "fox", "gnu"]
DATA = {"dataset": "synthetic", "img_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}


class Reads:
    """Opens per file and reads per (file, tensor) under `root`, while counting."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.opens: Counter[str] = Counter()
        self.tensors: Counter[tuple[str, str]] = Counter()
        self.depth = 0

    def opened(self, path) -> bool:
        name = str(path)
        if self.depth or not name.startswith(self.root) or Path(name).name.startswith("."):
            return False
        self.opens[name] += 1
        return True

    @contextmanager
    def inside(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class CountedHandle:
    def __init__(self, handle, path: str, reads: Reads):
        self.handle, self.path, self.reads = handle, path, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def get_tensor(self, key):
        self.reads.tensors[(self.path, key)] += 1
        return self.handle.get_tensor(key)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.fixture
def reads(tmp_path, monkeypatch):
    counter = Reads(tmp_path)
    original_safe_open = safetensors.safe_open

    def safe_open(path, *args, **kwargs):
        counted = counter.opened(path)
        handle = original_safe_open(path, *args, **kwargs)
        return CountedHandle(handle, str(path), counter) if counted else handle

    for module in [safetensors, safetensors.torch, *sys.modules.values()]:
        name = getattr(module, "__name__", "")
        if (
            name.startswith(("vitkit", "safetensors"))
            and getattr(module, "safe_open", None) is original_safe_open
        ):
            monkeypatch.setattr(module, "safe_open", safe_open)

    def counting(original):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, Path)):
                mode = args[0] if args and isinstance(args[0], str) else kwargs.get("mode", "r")
                if not any(flag in mode for flag in "wax+"):
                    counter.opened(file)
            with counter.inside():
                return original(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "load", counting(torch.load))
    monkeypatch.setattr(np, "load", counting(np.load))
    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(io, "open", counting(io.open))
    return counter


def each_once(reads: Reads, files: list[Path], tensor_keys: list[str]) -> None:
    """Every file in `files` opened once, no other file opened, every tensor of the weights read once."""
    summary = f"opens {dict(reads.opens)}; tensor reads {sum(reads.tensors.values())} of {len(tensor_keys)}"
    assert dict(reads.opens) == {str(path): 1 for path in files}, summary
    assert all(count == 1 for count in reads.tensors.values()), summary
    assert sorted(key for _, key in reads.tensors) == sorted(tensor_keys)


def tiny_model() -> vitkit.VisionTransformer:
    torch.manual_seed(0)
    return vitkit.VisionTransformer(tiny_config())


def test_single_file_is_read_once(tmp_path, reads):
    model = tiny_model()
    path = vitkit.save(model, tmp_path / "m.safetensors")
    reads.opens.clear()
    loaded = vitkit.load(path)
    each_once(reads, [path], list(model.state_dict()))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def run_folder(tmp_path: Path) -> tuple[Path, vitkit.VisionTransformer]:
    model = tiny_model()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": "tiny"}}))
    (run / "checkpoints").mkdir()
    write_weights(run / "best.safetensors", model.state_dict(), model_metadata(model.config, CLASSES, DATA))
    return run, model


def test_run_folder_is_read_once_as_eval_and_predict_load_it(tmp_path, reads):
    run, model = run_folder(tmp_path)
    reads.opens.clear()
    loaded, classes, data = load_classifier(run)
    each_once(reads, [run / "best.safetensors"], list(model.state_dict()))
    assert classes == CLASSES and data == DATA


def test_vitkit_load_takes_a_run_folder(tmp_path, reads):
    run, model = run_folder(tmp_path)
    loaded = vitkit.load(run)
    each_once(reads, [run / "best.safetensors"], list(model.state_dict()))
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_conversion_reads_its_source_once(tmp_path, reads):
    model = tiny_model()
    source = vitkit.save(model, tmp_path / "m.safetensors")
    reads.opens.clear()
    convert(source, tmp_path / "hf", to="hf")
    each_once(reads, [source], list(model.state_dict()))
    hf = tmp_path / "hf"
    hf_keys = list(safetensors.torch.load_file(hf / "model.safetensors"))
    reads.opens.clear()
    reads.tensors.clear()
    back = tmp_path / "back.safetensors"
    convert(hf, back, to="vitkit")
    each_once(reads, [hf / "config.json", hf / "model.safetensors", hf / "preprocessor_config.json"], hf_keys)
    again = vitkit.load(back)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_native_folder_is_read_once(tmp_path, reads):
    model = tiny_model()
    folder = vitkit.save(model, tmp_path / "folder")
    reads.opens.clear()
    vitkit.load(folder)
    each_once(reads, [folder / "config.json", folder / "model.safetensors"], list(model.state_dict()))


@pytest.mark.parametrize("target, name", [("timm", "t.pth"), ("npz", "v.npz"), ("mmpretrain", "m.pth")])
def test_a_single_file_of_another_toolkit_is_opened_once(tmp_path, reads, target, name):
    """Its zip directory is checked and its tensors read through one open file."""
    model = tiny_model()
    path = write_layout(model, tmp_path / name, to=target)
    reads.opens.clear()
    loaded = vitkit.load(path, num_heads=4)
    each_once(reads, [path], [])  # read whole: no per-tensor reads to count
    assert torch.equal(loaded.head.weight, model.head.weight)


def training_checkpoint(root: Path) -> tuple[Path, vitkit.VisionTransformer]:
    """A checkpoint folder as a run writes it: weights, EMA weights, AdamW state, state.json, marker."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    ema = {key: value.clone() for key, value in model.state_dict().items()}
    state = TrainState(model.state_dict(), optimizer.state_dict(), Progress(step=3), [capture_rng()], ema)
    return write_state(root / "checkpoints", state, model_metadata(model.config, CLASSES, DATA)), model


def test_a_resume_reads_each_file_of_the_checkpoint_once(tmp_path, reads):
    """The folder is checked (marker, checksums) and read into one `TrainState`: each file opened
    once, its checksum taken from the bytes that are parsed."""
    folder, model = training_checkpoint(tmp_path)
    reads.opens.clear()
    state = read_state(folder)
    files = [folder / name for name in (MARKER, MODEL_NAME, EMA_NAME, OPTIMIZER_NAME, STATE_NAME)]
    each_once(reads, files, [])  # read whole, checked against its checksum: no per-tensor reads
    assert all(torch.equal(state.model[key], value) for key, value in model.state_dict().items())
    assert state.ema is not None and state.optimizer["state"] and state.progress.step == 3


def test_a_resume_refuses_a_file_whose_bytes_differ_from_its_checksum(tmp_path):
    folder, _ = training_checkpoint(tmp_path)
    data = bytearray((folder / OPTIMIZER_NAME).read_bytes())
    data[-1] ^= 1  # one bit of a tensor: the file still parses
    (folder / OPTIMIZER_NAME).write_bytes(bytes(data))
    with pytest.raises(vitkit.io.CheckpointError, match="optimizer.safetensors: checksum mismatch"):
        read_state(folder)


def test_a_served_base_and_its_task_deltas_are_each_read_once(tmp_path, reads):
    from serve_helpers import make_checkpoints
    from vitkit.serve import TaskSet

    files = make_checkpoints(tmp_path / "served")
    paths = [files.base, *files.deltas.values()]
    keys = [key for path in paths for key in safetensors.torch.load_file(path)]
    reads.opens.clear()
    reads.tensors.clear()
    tasks = TaskSet(files.base, files.deltas)
    each_once(reads, paths, keys)
    assert tasks.tasks["pets"].classes == ["tabby", "terrier", "goldfish"]


def hostile_header(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + bytes(16)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\xff" * 8 + b"{}", "header of"),
        (hostile_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}), "do not hold"),
        (hostile_header({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}), "buffer"),
        (hostile_header({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}), "X9"),
        (hostile_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), "counts"),
        (hostile_header({"__metadata__": {"a": 1}}), "text to text"),
    ],
)
def test_a_resume_refuses_a_resigned_file_that_is_not_safetensors(tmp_path, content, needle):
    """A hostile writer who also rewrites the marker's checksum gets a one-line refusal, no tensor."""
    import hashlib

    folder, _ = training_checkpoint(tmp_path)
    (folder / EMA_NAME).write_bytes(content)
    marker = json.loads((folder / MARKER).read_text())
    marker["sha256"][EMA_NAME] = hashlib.sha256(content).hexdigest()
    (folder / MARKER).write_text(json.dumps(marker))
    with pytest.raises(
        vitkit.io.CheckpointError, match="ema.safetensors: not a readable safetensors"
    ) as error:
        read_state(folder)
    assert needle in str(error.value) and "\n" not in str(error.value)
