"""The whole training state on disk, in formats that cannot run code, written atomically.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/`:

    model.safetensors      weights + the ViTConfig (loads with `vitkit.load`), class names, data config;
                           a LoRA run's holds its adapters unmerged (`lora.py`): best and last load
    ema.safetensors        the EMA weights, when EMA is on
    optimizer.safetensors  every optimiser state tensor (AdamW moments and step counts)
    state.json             the rest: step, epoch and data position, optimiser hyper-parameters, grad
                           scaler, RNG states of python, numpy and torch (per rank), best metric,
                           whether the epoch's evaluation is due
    evaluated.json         beside, not covered by the marker: that evaluation's outcome (evaluator.py)
    COMPLETE               written last: the SHA-256 of each file above

Each file is written with `atomic_write` (temporary file, fsync, rename), and the marker only after all
of them, so a process killed at any moment leaves either a complete checkpoint or a folder without a
marker, which `find_resumable` skips. A complete folder whose files no longer match their checksums
(a damaged disk, a copy cut short) is skipped too, and the log says why.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..convert.checkpoint import read_checkpoint
from ..convert.names import CLASSES_KEY, CONFIG_KEY, DATA_KEY
from ..files import MAX_JSON_BYTES, CheckpointError, atomic_write, check_regular_file, read_json
from ..models.config import ViTConfig
from .lora import merged_state_dict
from .state_checks import check_plain_state

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_NAME = "state.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")


@dataclass
class Progress:
    """Where training stands: `position` counts this rank's samples of `epoch` already trained on."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    # Seconds spent in training steps (evaluation and checkpoints excluded), for time-to-accuracy.
    train_time: float = 0.0


@dataclass
class TrainState:
    """The whole training state, saved and restored whole: the weights, the EMA weights, the optimiser,
    the grad scaler, the progress and one RNG state per process. Tensors on CPU, the rest plain data."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    progress: Progress
    rng: list[dict[str, Any]] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None
    scaler: dict[str, Any] | None = None
    # Written at an epoch's end that is evaluated: the evaluation runs after the state is safe on disk
    # and records itself beside it (evaluator.py); a resume runs one that an interrupt cut short.
    evaluation_due: bool = False

    @property
    def world_size(self) -> int:
        """How many processes wrote it (one RNG state each)."""
        return len(self.rng)


# RNG states as JSON -------------------------------------------------------------------------------------
def encode_bytes(tensor: torch.Tensor) -> str:
    """A uint8 RNG state tensor as base64 text."""
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG states of python, numpy and torch (CPU, and `device`'s when it is a GPU) as
    JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": encode_bytes(torch.get_rng_state()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = encode_bytes(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(decode_bytes(state["torch"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(decode_bytes(state["cuda"]), device)


# Optimiser state as safetensors + JSON ---------------------------------------------------------------
def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors named `state.{param}.{name}`, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            key = f"state.{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    entries: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        _, index, name = key.split(".", 2)
        entries.setdefault(int(index), {})[name] = value
    return {"state": entries, "param_groups": rest["param_groups"]}


# Writing --------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def model_metadata(
    config: ViTConfig, classes: list[str] | None = None, data: dict[str, Any] | None = None
) -> dict[str, str]:
    """safetensors metadata that makes a weight file self-describing for `vitkit.load` and predict."""
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(config.to_dict(), sort_keys=True)}
    if classes is not None:
        metadata[CLASSES_KEY] = json.dumps(classes)
    if data is not None:
        metadata[DATA_KEY] = json.dumps(data, sort_keys=True)
    return metadata


def write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A model's weights file (best, last, encoder): a plain ViT's keys and shapes, a LoRA run's
    adapters merged into their weights (`lora.merged_state_dict`), so `vitkit.load` reads it."""
    write_tensors(path, merged_state_dict(state), metadata)


def write_tensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def write_state(root: str | Path, state: TrainState, metadata: dict[str, str]) -> Path:
    """Write `state` as one checkpoint folder under `root`; the marker goes last. Returns the folder."""
    folder = step_folder(Path(root), state.progress.step)
    if folder.exists():
        # A leftover of an interrupted or damaged save of this same step: never mix old and new files.
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # The live tensors as they are (a LoRA run's adapters unmerged), so that resume restores them bitwise.
    write_tensors(folder / MODEL_NAME, state.model, metadata)
    if state.ema is not None:
        write_tensors(folder / EMA_NAME, state.ema, metadata)
    tensors, rest = split_optimizer_state(state.optimizer)
    atomic_write(folder / OPTIMIZER_NAME, lambda tmp: save_file(tensors, tmp))
    plain = {
        "progress": dataclasses.asdict(state.progress),
        "optimizer": rest,
        "scaler": state.scaler,
        "rng": state.rng,
        "world_size": state.world_size,
        "evaluation_due": state.evaluation_due,
    }
    _write_json(folder / STATE_NAME, plain)
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    _write_json(folder / MARKER, {"sha256": {name: _sha256(folder / name) for name in files}})
    return folder


def apply_retention(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints, and any unfinished older folder."""
    folders = list_checkpoints(root)
    complete = [folder for folder in folders if (folder / MARKER).exists()]
    keep = set(complete[:keep_last])
    newest = complete[0] if complete else None
    removed = []
    for folder in folders:
        unfinished_and_old = not (folder / MARKER).exists() and newest is not None and folder < newest
        if (folder in complete and folder not in keep) or unfinished_and_old:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


# Reading --------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, newest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_FOLDER.match(p.name)), reverse=True)


def _listed_files(folder: Path) -> dict[str, str]:
    """The marker's table (file name -> SHA-256), every file it lists present in the folder; a
    CheckpointError saying why the checkpoint is incomplete otherwise."""
    marker = folder / MARKER
    if not marker.exists():
        raise CheckpointError("no COMPLETE marker (the process stopped while writing it)")
    try:
        expected = read_json(marker).get("sha256")
    except CheckpointError as error:
        raise CheckpointError(f"unreadable marker ({error})") from error
    if not isinstance(expected, dict):
        raise CheckpointError(f"{marker}: unreadable marker (no 'sha256' table)")
    for name in (MODEL_NAME, OPTIMIZER_NAME, STATE_NAME):
        if name not in expected:
            raise CheckpointError(f"{name} is not listed in the marker")
    for name in expected:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing")
        if not path.is_file() or path.parent != folder:
            raise CheckpointError(f"{path}: not a regular file in the checkpoint folder")
    return expected


def _mismatch(path: Path) -> str:
    return f"{path}: checksum mismatch (damaged or truncated)"


def check_checkpoint(folder: Path, checksums: bool = True) -> str | None:
    """None for a complete, undamaged checkpoint; otherwise why it cannot be used. Without
    `checksums`, only whether it is complete: its marker and every file the marker lists."""
    try:
        expected = _listed_files(folder)
    except CheckpointError as error:
        return str(error)
    for name, digest in expected.items():
        if checksums and _sha256(folder / name) != digest:
            return _mismatch(folder / name)
    return None


def find_resumable(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest valid checkpoint under `root` (or None) and why each newer one was passed over."""
    skipped = []
    for folder in list_checkpoints(root):
        reason = check_checkpoint(folder)
        if reason is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {reason}")
    return None, skipped


def _read_checked_json(path: Path, digest: str) -> dict[str, Any]:
    """A JSON object read through one open, parsed from the bytes whose SHA-256 is checked."""
    if check_regular_file(path) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: more than the {MAX_JSON_BYTES} bytes a JSON file may have here")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(_mismatch(path))
    try:
        plain = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as cause:
        raise CheckpointError(f"{path}: invalid JSON: {cause}") from cause
    if not isinstance(plain, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(plain).__name__}")
    return plain


def read_state(folder: str | Path) -> TrainState:
    """Read a checkpoint folder written by `write_state`: each file opened once, its checksum taken on
    the bytes parsed, every field of state.json checked (CheckpointError naming the file, key and
    problem, when it is damaged or tampered with)."""
    folder = Path(folder)
    try:
        expected = _listed_files(folder)
        for name in expected.keys() - {MODEL_NAME, EMA_NAME, OPTIMIZER_NAME, STATE_NAME}:
            if _sha256(folder / name) != expected[name]:
                raise CheckpointError(_mismatch(folder / name))
        weights = {
            name: read_checkpoint(folder / name, layout="vitkit", sha256=expected[name])
            for name in (MODEL_NAME, EMA_NAME, OPTIMIZER_NAME)
            if name in expected
        }
        plain = _read_checked_json(folder / STATE_NAME, expected[STATE_NAME])
    except CheckpointError as error:
        raise CheckpointError(f"{folder}: cannot resume: {error}") from error
    if weights[MODEL_NAME].config is None:
        raise CheckpointError(f"{folder / MODEL_NAME}: no {CONFIG_KEY!r} metadata")
    check_plain_state(folder / STATE_NAME, plain)
    try:
        optimizer = join_optimizer_state(dict(weights[OPTIMIZER_NAME].tensors()), plain["optimizer"])
    except ValueError as error:
        raise CheckpointError(f"{folder / OPTIMIZER_NAME}: not an optimiser state ({error})") from error
    return TrainState(
        model=dict(weights[MODEL_NAME].tensors()),
        optimizer=optimizer,
        progress=Progress(**plain["progress"]),
        rng=plain["rng"],
        ema=dict(weights[EMA_NAME].tensors()) if EMA_NAME in weights else None,
        scaler=plain["scaler"],
        evaluation_due=plain.get("evaluation_due", False),
    )
