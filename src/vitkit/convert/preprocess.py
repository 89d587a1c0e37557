"""Which preprocessing a checkpoint records, or its layout implies, and writing it back.

Read, first found wins: a training checkpoint's data config (`vitkit.data`: what the run trained
and evaluated with), vitkit's own record (`vitkit.preprocessing`, written by `vitkit.save` and
`vitkit convert` for a model that carries one), an HF folder's
`preprocessor_config.json`; else the documented default of the layout the checkpoint is in
(`vitkit.models.preprocessing.LAYOUT_DEFAULTS`), and the log says which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..files import CheckpointError, atomic_write, parse_metadata, read_header, read_json
from ..models.preprocessing import (
    Preprocessing,
    from_hf_processor,
    from_record,
    layout_default,
    preprocessing_of,
    to_hf_processor,
)
from ..models.vit import VisionTransformer

log = logging.getLogger(__name__)

PREPROCESSING_KEY = "vitkit.preprocessing"
DATA_KEY = "vitkit.data"  # a training checkpoint's whole data config
PROCESSOR_NAME = "preprocessor_config.json"


def _weights_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    return None


def recorded_preprocessing(path: str | Path) -> Preprocessing | None:
    """The preprocessing a checkpoint file or folder records, or None. A record that is not
    valid is an error naming the file and field."""
    path = Path(path)
    weights = _weights_file(path)
    if weights is not None:
        _, metadata = read_header(weights)
        for key in (DATA_KEY, PREPROCESSING_KEY):
            if key in metadata:
                try:
                    return from_record(parse_metadata(weights, metadata, key), f"{weights.name}: {key}")
                except ValueError as error:
                    raise CheckpointError(f"{weights}: metadata {key!r}: {error}") from error
    processor = path / PROCESSOR_NAME if path.is_dir() else None
    if processor is not None and processor.is_file():
        try:
            return from_hf_processor(read_json(processor), source=str(processor))
        except ValueError as error:
            raise CheckpointError(
                str(error) if str(processor) in str(error) else f"{processor}: {error}"
            ) from error
    return None


def attach_preprocessing(
    model: VisionTransformer, path: str | Path, layout: str, fallback: Preprocessing | None = None
) -> VisionTransformer:
    """Set `model.preprocessing`: the checkpoint's record, else `fallback` (a task delta takes its
    base's), else the layout's default, at the size the model runs at (a model loaded with
    img_size=384 evaluates at 384); logged."""
    preprocessing = recorded_preprocessing(path)
    if preprocessing is None:
        preprocessing = fallback or layout_default(layout, tuple(model.config.img_size))
        log.info("%s: no preprocessing recorded; taking %s", path, preprocessing.source)
    if preprocessing.img_size != tuple(model.config.img_size):
        preprocessing = preprocessing.replace(img_size=tuple(model.config.img_size))
    model.preprocessing = preprocessing
    log.info("%s: preprocessing: %s", path, preprocessing.describe())
    return model


def preprocessing_metadata(model: VisionTransformer) -> dict[str, str]:
    """The safetensors metadata entry recording the model's preprocessing (empty for a model built
    in code, which has none of its own)."""
    preprocessing = getattr(model, "preprocessing", None)
    if not isinstance(preprocessing, Preprocessing):
        return {}
    return {PREPROCESSING_KEY: json.dumps(preprocessing.as_dict(), sort_keys=True)}


def write_processor_config(model: VisionTransformer, folder: Path) -> Path | None:
    """An HF folder's `preprocessor_config.json` for the model's preprocessing (or vitkit's default
    at its size), written atomically."""
    text = json.dumps(to_hf_processor(preprocessing_of(model)), indent=2, sort_keys=True) + "\n"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; cannot write {PROCESSOR_NAME}")
    atomic_write(folder / PROCESSOR_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder / PROCESSOR_NAME
