"""vitkit's own layout: safetensors weights that carry their ViTConfig.

- `save(model, "m.safetensors")`: one file, the config as JSON in the safetensors metadata.
- `save(model, "folder")`: an HF-style folder, `config.json` + `model.safetensors`.
- `check_header_shapes(config, shapes)`: a file's config against the shapes of its header, before any
  module or tensor is built (`vitkit.convert.build_model` checks every vitkit checkpoint so).
- `load_state(model, state)`: a native-layout state dict into a model, the last step of every layout.
- `compare_shapes(expected, present)`: the one comparison of keys and shapes all of these use.

The files themselves are read by `vitkit.convert.checkpoint.read_checkpoint` and written by
`vitkit.files`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import CheckpointError, atomic_write, parse_metadata
from ..models.config import ViTConfig
from ..models.pos_embed import resample_pos_embed
from ..models.vit import VisionTransformer
from .names import CONFIG_KEY, MODEL_CONFIG_NAME, WEIGHTS_NAME
from .preprocessing_files import preprocessing_metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeDiff:
    """How the tensors present differ from the ones expected: each key in at most one list."""

    mismatched: list[str]  # "key: present (a, b) vs expected (c, d)"
    missing: list[str]
    unexpected: list[str]

    def __bool__(self) -> bool:
        return bool(self.mismatched or self.missing or self.unexpected)


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]],
    present: Mapping[str, tuple[int, ...]],
    names: tuple[str, str] = ("checkpoint", "expected"),
    describe: Callable[[str], str] = str,
) -> ShapeDiff:
    """Keys and shapes of `present` against `expected`, in `expected`'s order; `names` label the
    two sides of a mismatch and `describe` names a key (e.g. with its foreign name)."""
    mismatched = [
        f"{describe(key)}: {names[0]} {tuple(present[key])} vs {names[1]} {tuple(shape)}"
        for key, shape in expected.items()
        if key in present and tuple(present[key]) != tuple(shape)
    ]
    missing = [key for key in expected if key not in present]
    unexpected = [key for key in present if key not in expected]
    return ShapeDiff(mismatched, missing, unexpected)


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def config_from_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> ViTConfig:
    """The validated ViTConfig stored under CONFIG_KEY (every field typed and bounded)."""
    try:
        return ViTConfig.from_dict(parse_metadata(path, metadata, CONFIG_KEY))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as cause:
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY!r}: {cause}") from cause


# Writing ---------------------------------------------------------------------------------------------
def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


def save(model: VisionTransformer, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a model: a `.safetensors` path gives one file, any other path an HF-style folder."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"save() takes a VisionTransformer (unwrap DDP/compile first), got {type(model).__name__}"
        )
    path = Path(path)
    config_json = json.dumps(model.config.to_dict(), sort_keys=True)
    meta = {"format": "pt", CONFIG_KEY: config_json, **preprocessing_metadata(model), **(metadata or {})}
    tensors = _tensors(model)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    folder_config = {"model_type": "vitkit", **model.config.to_dict()}

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(folder_config, indent=2, sort_keys=True) + "\n")

    atomic_write(path / MODEL_CONFIG_NAME, write_config)
    return path


# Reading ---------------------------------------------------------------------------------------------
def expected_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes `config` builds, in the model's order, without building it.

    One block is built on the meta device and its keys repeated for every block (all blocks hold the
    same tensors), so the cost does not grow with a claimed depth: building 512 blocks of 16
    parallel branches, even on meta, takes over a minute."""
    with torch.device("meta"):
        one_block = VisionTransformer(config.replace(depth=1)).state_dict()
    block = {
        key.removeprefix("blocks.0."): tuple(value.shape)
        for key, value in one_block.items()
        if key.startswith("blocks.0.")
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in one_block.items():
        if not key.startswith("blocks.0."):
            shapes[key] = tuple(value.shape)
        elif "blocks.0." + next(iter(block)) == key:  # the first block key: every block goes here
            for index in range(config.depth):
                shapes.update({f"blocks.{index}.{name}": shape for name, shape in block.items()})
    return shapes


def check_header_shapes(
    config: ViTConfig, shapes: dict[str, tuple[int, ...]], origin: str, strict: bool = True
) -> None:
    """The tensors a file's header lists are the ones its config builds: same keys (when strict),
    same shapes, same parameter count, from `expected_shapes`: no memory, and no module built per
    claimed block."""
    expected = expected_shapes(config)
    diff = compare_shapes(expected, shapes, names=("file", "config"))
    if diff.mismatched:
        raise CheckpointError(
            f"{origin}: its config does not describe its tensors; shapes differ: "
            + "; ".join(diff.mismatched[:8])
        )
    if not strict:
        return
    missing, unexpected = diff.missing, diff.unexpected
    if any(".parametrizations." in key for key in unexpected):
        raise CheckpointError(
            f"{origin}: a training state with its LoRA adapters unmerged (model.freeze=lora), for resuming "
            "the run; load the run's best.safetensors or last.safetensors, where they are merged"
        )
    if missing or unexpected:
        num_expected = sum(math.prod(shape) for shape in expected.values())
        num_present = sum(math.prod(shape) for shape in shapes.values())
        raise CheckpointError(
            f"{origin}: its config describes {num_expected:,} parameters in {len(expected)} tensors, the file "
            f"holds {num_present:,} in {len(shapes)}; missing: {missing[:5] or 'none'}; "
            f"unexpected: {unexpected[:5] or 'none'}"
        )


def load_state(
    model: VisionTransformer,
    state: dict[str, torch.Tensor],
    source_config: ViTConfig | None = None,
    strict: bool = True,
    origin: str = "state dict",
) -> tuple[list[str], list[str]]:
    """Load a native-layout state dict, resampling position embeddings to the model's grid.

    Head and pre-logits tensors whose shape the target config changed on purpose (other num_classes
    or representation_size) are left at their fresh init, and logged. Anything else that does not fit
    is an error naming the keys and shapes. Returns (missing, unexpected) keys when strict=False.
    """
    config = model.config
    state = dict(state)
    if (
        "pos_embed" in state
        and model.pos_embed is not None
        and state["pos_embed"].shape != model.pos_embed.shape
    ):
        prefix = config.num_prefix_tokens if config.pos_embed_class_slot else 0
        old_grid = source_config.grid_size if source_config is not None else None
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], config.grid_size, old_grid, prefix, config.pos_embed_resample
        )
        log.info(
            "%s: resampled pos_embed to grid %s (%s)", origin, config.grid_size, config.pos_embed_resample
        )
    target = model.state_dict()
    renewed = [
        key
        for key in state
        if key.startswith(("head.", "pre_logits."))
        and (key not in target or target[key].shape != state[key].shape)
    ]
    for key in renewed:
        del state[key]
    if renewed:
        log.info("%s: new head for the target config; not loaded: %s", origin, ", ".join(renewed))
    diff = compare_shapes(shapes_of(target), shapes_of(state), names=("checkpoint", "model"))
    if diff.mismatched:
        raise CheckpointError(f"{origin}: shapes do not match: " + "; ".join(diff.mismatched))
    missing = [key for key in diff.missing if key not in renewed]
    unexpected = diff.unexpected
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{origin}: keys do not match the model; missing: {missing or 'none'}; unexpected: {unexpected or 'none'}"
        )
    model.load_state_dict(state, strict=False)
    return missing, unexpected
