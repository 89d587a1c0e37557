"""vitkit's own layout: safetensors weights that carry their ViTConfig.

- `save(model, "m.safetensors")`: one file, the config as JSON in the safetensors metadata.
- `save(model, "folder")`: an HF-style folder, `config.json` + `model.safetensors`.
- `load_native(path, **overrides)`: rebuilds the model with no other argument; overrides such as
  `img_size=384` resample the position embeddings, `num_classes=10` starts a new head.
- `load_state(model, state)`: a native-layout state dict into a model, the last step of every layout.

A native checkpoint's config is validated (`ViTConfig.check_types`) and compared with the tensor
shapes of the file's header before any module or tensor is built. The files themselves are read and
written by `vitkit.files`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..files import CheckpointError, atomic_write, parse_metadata, read_header, read_json, read_weights
from ..models.config import ViTConfig
from ..models.pos_embed import resample_pos_embed
from ..models.vit import VisionTransformer
from .preprocess import attach_preprocessing, preprocessing_metadata

log = logging.getLogger(__name__)

CONFIG_KEY = "vitkit.config"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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

    atomic_write(path / CONFIG_NAME, write_config)
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
    mismatched = [
        f"{key}: file {shapes[key]} vs config {expected[key]}"
        for key in expected
        if key in shapes and shapes[key] != expected[key]
    ]
    if mismatched:
        raise CheckpointError(
            f"{origin}: its config does not describe its tensors; shapes differ: " + "; ".join(mismatched[:8])
        )
    if not strict:
        return
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected]
    if missing or unexpected:
        num_expected = sum(math.prod(shape) for shape in expected.values())
        num_present = sum(math.prod(shape) for shape in shapes.values())
        raise CheckpointError(
            f"{origin}: its config describes {num_expected:,} parameters in {len(expected)} tensors, the file "
            f"holds {num_present:,} in {len(shapes)}; missing: {missing[:5] or 'none'}; "
            f"unexpected: {unexpected[:5] or 'none'}"
        )


def read_folder_config(folder: Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint folder (vitkit's or HuggingFace's)."""
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(f"{folder}: folder has no {CONFIG_NAME}")
    return read_json(config_path)


def read_config(path: str | os.PathLike) -> ViTConfig:
    """The ViTConfig stored with a native checkpoint (file metadata or the folder's config.json)."""
    path = Path(path)
    if path.is_dir():
        data = read_folder_config(path)
        config_path = path / CONFIG_NAME
        if data.pop("model_type", None) != "vitkit":
            raise CheckpointError(f"{config_path}: not a vitkit config (model_type is not 'vitkit')")
        try:
            return ViTConfig.from_dict(data)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: {error}") from error
    _, metadata = read_header(path)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"{path}: no {CONFIG_KEY!r} in the safetensors metadata; not a vitkit checkpoint"
        )
    return config_from_metadata(path, metadata)


def is_native(path: str | os.PathLike) -> bool:
    """Whether `path` is vitkit's own checkpoint: a folder whose config.json says model_type "vitkit",
    or a .safetensors file with the config in its metadata. Paths that cannot be read count as
    native, so that `load` reports them with its own errors."""
    path = Path(path)
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.exists():
            return False
        try:
            return read_json(config_path).get("model_type") == "vitkit"
        except CheckpointError:
            return True
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return not path.exists()
    try:
        with safe_open(str(path), framework="pt") as handle:
            return CONFIG_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return True


def load_native(path: str | os.PathLike, strict: bool = True, **overrides: Any) -> VisionTransformer:
    """Rebuild a model saved by `save`. Overrides change the config: e.g. img_size=384 (position
    embeddings are resampled in 2D), num_classes=10 (a new, zero-initialised head). The config and
    the header's shapes are checked against each other before any tensor is read."""
    path = Path(path)
    weights_path = path / WEIGHTS_NAME if path.is_dir() else path
    source = read_config(path)
    shapes, _ = read_header(weights_path)
    check_header_shapes(source, shapes, str(weights_path), strict=strict)
    state, _ = read_weights(weights_path)
    model = VisionTransformer(source.replace(**overrides))
    load_state(model, state, source_config=source, strict=strict, origin=str(weights_path))
    return attach_preprocessing(model, path, "vitkit")


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
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}"
        for key, value in state.items()
        if key in target and value.shape != target[key].shape
    ]
    if mismatched:
        raise CheckpointError(f"{origin}: shapes do not match: " + "; ".join(mismatched))
    missing = [key for key in target if key not in state and key not in renewed]
    unexpected = [key for key in state if key not in target]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{origin}: keys do not match the model; missing: {missing or 'none'}; unexpected: {unexpected or 'none'}"
        )
    model.load_state_dict(state, strict=False)
    return missing, unexpected
