"""What a training state read back must be before any of it is copied into a run.

A checkpoint's marker proves that its files are whole, not that they are right: a hand-edited
state.json with its checksum recomputed passes it. So every field is checked here, field by field
(types and ranges), and the tensors against the model they are about to fill (names and shapes).
Each refusal is a `CheckpointError` naming the file, the key and the problem.
"""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path
from typing import Any

import torch

from ..files import CheckpointError

PROGRESS_KEYS = ("step", "epoch", "position", "best_metric", "best_step", "train_time")
PLAIN_KEYS = ("progress", "optimizer", "scaler", "rng", "world_size")
MT_STATE_SIZE = 624  # Mersenne Twister words, in python's and numpy's generators alike
TORCH_RNG_BYTES = torch.get_rng_state().numel()


def _count(value: Any) -> bool:
    """A non-negative int (JSON true/false are not counts)."""
    return type(value) is int and value >= 0


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_progress(path: Path, progress: Any) -> None:
    """step, epoch and position are counts; epoch and the best step cannot run ahead of the steps."""
    if not isinstance(progress, dict) or sorted(progress) != sorted(PROGRESS_KEYS):
        raise CheckpointError(f"{path}: 'progress' must hold exactly {', '.join(PROGRESS_KEYS)}")
    for key in ("step", "epoch", "position"):
        if not _count(progress[key]):
            raise CheckpointError(f"{path}: 'progress.{key}' must be an integer >= 0, not {progress[key]!r}")
    step, best_step, best = progress["step"], progress["best_step"], progress["best_metric"]
    if progress["epoch"] > step:
        raise CheckpointError(f"{path}: 'progress.epoch' {progress['epoch']} is past step {step}")
    if not (_number(progress["train_time"]) and progress["train_time"] >= 0):
        raise CheckpointError(f"{path}: 'progress.train_time' must be seconds >= 0")
    if (best is None) != (best_step is None):
        raise CheckpointError(f"{path}: 'progress.best_metric' and 'progress.best_step' go together")
    if best is not None and not (_number(best) and 0 <= best <= 1):
        raise CheckpointError(f"{path}: 'progress.best_metric' must be an accuracy in [0, 1], not {best!r}")
    if best_step is not None and not (_count(best_step) and best_step <= step):
        raise CheckpointError(
            f"{path}: 'progress.best_step' must be a step in [0, {step}], not {best_step!r}"
        )


def _bytes_of(text: Any) -> int:
    if not isinstance(text, str):
        return -1
    try:
        return len(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return -1


def rng_problem(state: Any) -> str | None:
    """Why one process's RNG states (python, numpy, torch, optionally cuda) cannot be restored."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
        return "must hold the 'python', 'numpy' and 'torch' generator states"
    python = state["python"]
    if not (isinstance(python, list) and len(python) == 3 and isinstance(python[1], list)):
        return "'python' must be [version, words, gauss]"
    words = python[1]
    if len(words) != MT_STATE_SIZE + 1 or not all(type(w) is int and 0 <= w < 2**32 for w in words[:-1]):
        return f"'python' must hold {MT_STATE_SIZE} 32-bit words and a position"
    numpy_state = state["numpy"]
    if not (isinstance(numpy_state, list) and len(numpy_state) == 5 and numpy_state[0] == "MT19937"):
        return "'numpy' must be ['MT19937', keys, position, has_gauss, cached]"
    keys, position = numpy_state[1], numpy_state[2]
    if not (isinstance(keys, list) and len(keys) == MT_STATE_SIZE) or not all(
        type(k) is int and 0 <= k < 2**32 for k in keys
    ):
        return f"'numpy' keys must be {MT_STATE_SIZE} 32-bit words"
    if not (_count(position) and position <= MT_STATE_SIZE):
        return f"'numpy' position must be in [0, {MT_STATE_SIZE}]"
    if _bytes_of(state["torch"]) != TORCH_RNG_BYTES:
        return f"'torch' must be {TORCH_RNG_BYTES} bytes in base64"
    if "cuda" in state and _bytes_of(state["cuda"]) <= 0:
        return "'cuda' must be bytes in base64"
    return None


def check_plain_state(path: Path, plain: dict[str, Any]) -> None:
    """state.json, field by field: the entries, the progress, one valid RNG state per process."""
    absent = [key for key in PLAIN_KEYS if key not in plain]
    if absent:
        raise CheckpointError(f"{path}: not a training state (no {', '.join(map(repr, absent))} entry)")
    check_progress(path, plain["progress"])
    rng, world_size = plain["rng"], plain["world_size"]
    if type(world_size) is not int or world_size < 1 or not isinstance(rng, list) or len(rng) != world_size:
        raise CheckpointError(f"{path}: 'rng' must hold one generator state per process of 'world_size'")
    for rank, state in enumerate(rng):
        problem = rng_problem(state)
        if problem:
            raise CheckpointError(f"{path}: 'rng[{rank}]': {problem}")
    optimizer = plain["optimizer"]
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("param_groups"), list)
        and isinstance(optimizer.get("scalars"), dict)
    ):
        raise CheckpointError(f"{path}: 'optimizer' must hold 'param_groups' and 'scalars'")
    for number, group in enumerate(optimizer["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(params, list) and all(_count(index) for index in params)):
            raise CheckpointError(
                f"{path}: 'optimizer.param_groups[{number}].params' must list parameter numbers"
            )
    if type(plain.get("evaluation_due", False)) is not bool:
        raise CheckpointError(f"{path}: 'evaluation_due' must be true or false")
    if plain["scaler"] is not None and not isinstance(plain["scaler"], dict):
        raise CheckpointError(f"{path}: 'scaler' must be null or an object")


def check_tensors(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """The saved tensors have the names and shapes of the model they are about to fill."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        named = missing[:3] if missing else unexpected[:3]
        what = "lacks" if missing else "has tensors this model does not have:"
        raise CheckpointError(f"{path}: {what} {', '.join(named)} (another model than this run's config)")
    for key, shape in expected.items():
        if tuple(saved[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(saved[key].shape)}, this run's model {tuple(shape)} "
                "(another model than this run's config)"
            )


def check_optimizer(path: Path, saved: dict[str, Any], shapes: list[torch.Size]) -> None:
    """The saved optimiser state numbers as many parameters as this optimiser has, each moment
    shaped like its parameter (`shapes`, in param-group order)."""
    indices = [index for group in saved["param_groups"] for index in group.get("params", [])]
    if sorted(indices) != list(range(len(shapes))):
        raise CheckpointError(
            f"{path}: the optimiser state numbers {len(indices)} parameters, this run's optimiser "
            f"{len(shapes)} (another model or freezing rule?)"
        )
    for index, entry in saved["state"].items():
        if not (_count(index) and index < len(shapes)):
            raise CheckpointError(f"{path}: optimiser state of parameter {index!r}, which this run lacks")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != shapes[index]:
                raise CheckpointError(
                    f"{path}: state.{index}.{name} has shape {tuple(value.shape)}, its parameter "
                    f"{tuple(shapes[index])}"
                )
