"""What a checkpoint knows beyond its tensors (class names, a training run's data config, the
preprocessing), carried into every layout that can hold it:

- vitkit's own: its safetensors metadata (`names.METADATA_KEYS`);
- an HF-style folder (hf, siglip): config.json's `id2label` / `label2id` and `preprocessor_config.json`;
  the data config has no place there, and the conversion says so in one line;
- a single file of another toolkit (timm, vit_jax .npz, mmpretrain): a `.json` beside it
  (`m.pth.json`) holding the same records as vitkit's metadata, read back by `read_checkpoint`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import CheckpointError, atomic_write, read_json
from ..models.vit import VisionTransformer
from .names import CLASSES_KEY, DATA_KEY, MODEL_CONFIG_NAME, PREPROCESSING_KEY, SIDECAR_SUFFIX
from .preprocessing_files import preprocessing_metadata, write_processor_config

log = logging.getLogger(__name__)

SIDECAR_KEYS = (PREPROCESSING_KEY, DATA_KEY, CLASSES_KEY)


def sidecar_path(path: Path) -> Path:
    """The records file beside a single weight file: `m.pth` -> `m.pth.json`."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def fit_records(
    model: VisionTransformer, classes: Sequence[str] | None, data: Mapping[str, Any] | None, origin: str
) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The class names and data config that still describe `model` (a conversion may renew the head
    or change the resolution): names only for as many classes as the head has, the data config at
    the model's size."""
    if classes is not None and len(classes) != model.config.num_classes:
        log.warning(
            "%s: %d class names for a %d-class head; not recorded",
            origin,
            len(classes),
            model.config.num_classes,
        )
        classes = None
    height, width = model.config.img_size
    if data and data.get("img_size", height) != height:
        if height != width:
            log.warning(
                "%s: the data config takes square images only; not recorded at %s", origin, (height, width)
            )
            return list(classes) if classes else None, None
        data = {**data, "img_size": height}
    return (list(classes) if classes else None), (dict(data) if data else None)


def records_metadata(
    model: VisionTransformer, classes: Sequence[str] | None, data: Mapping[str, Any] | None
) -> dict[str, str]:
    """vitkit's metadata entries for the model's preprocessing, class names and data config."""
    metadata = preprocessing_metadata(model)
    if classes:
        metadata[CLASSES_KEY] = json.dumps(list(classes))
    if data:
        metadata[DATA_KEY] = json.dumps(dict(data), sort_keys=True)
    return metadata


def write_sidecar(
    model: VisionTransformer, path: Path, classes: Sequence[str] | None, data: Mapping[str, Any] | None
) -> Path | None:
    """The records file beside a single weight file of another toolkit; None when there is nothing."""
    records = {key: json.loads(value) for key, value in records_metadata(model, classes, data).items()}
    if not records:
        return None
    text = json.dumps(records, indent=2, sort_keys=True) + "\n"
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))
    return sidecar_path(path)


def read_sidecar(path: Path) -> dict[str, str]:
    """The records beside a single weight file, as metadata entries (JSON text per key); {} if none."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    records = read_json(sidecar)
    unknown = sorted(set(records) - set(SIDECAR_KEYS))
    if unknown:
        raise CheckpointError(f"{sidecar}: unknown entries {unknown}; expected some of {list(SIDECAR_KEYS)}")
    return {key: json.dumps(value) for key, value in records.items()}


def write_folder_records(
    model: VisionTransformer, folder: Path, classes: Sequence[str] | None, data: Mapping[str, Any] | None
) -> list[str]:
    """An HF-style folder's labels (config.json) and processor config; returns what it cannot hold."""
    write_processor_config(model, folder)
    if classes:
        config = read_json(folder / MODEL_CONFIG_NAME)
        config["id2label"] = {str(index): name for index, name in enumerate(classes)}
        config["label2id"] = {name: index for index, name in enumerate(classes)}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / MODEL_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return ["the data config"] if data else []
