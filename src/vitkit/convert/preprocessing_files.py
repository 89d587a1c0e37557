"""Which preprocessing a checkpoint records, or its layout implies, and writing it back.

`read_checkpoint` hands over the records its files hold; the first found wins: a training
checkpoint's data config (`vitkit.data`: what the run trained and evaluated with), vitkit's own record
(`vitkit.preprocessing`, written by `vitkit.save` and `vitkit convert` for a model that carries one),
an HF folder's `preprocessor_config.json`; else the documented default of the layout the checkpoint
is in (`vitkit.models.preprocessing.LAYOUT_DEFAULTS`), and the log says which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from ..files import CheckpointError, atomic_write, parse_metadata
from ..models.preprocessing import (
    Preprocessing,
    from_hf_processor,
    from_record,
    layout_default,
    preprocessing_of,
    to_hf_processor,
)
from ..models.vit import VisionTransformer
from .names import DATA_KEY, PREPROCESSING_KEY, PROCESSOR_NAME

log = logging.getLogger(__name__)


def recorded_preprocessing(
    weights: Path, metadata: Mapping[str, str], processor: dict | None, processor_path: Path | None = None
) -> Preprocessing | None:
    """The preprocessing a checkpoint records, or None: its weight file's metadata (`weights` names
    it in errors), else an HF folder's processor config (already parsed). A record that is not
    valid is an error naming the file and field."""
    for key in (DATA_KEY, PREPROCESSING_KEY):
        if key in metadata:
            try:
                return from_record(parse_metadata(weights, dict(metadata), key), f"{weights.name}: {key}")
            except ValueError as error:
                raise CheckpointError(f"{weights}: metadata {key!r}: {error}") from error
    if processor is None:
        return None
    source = str(processor_path or weights.parent / PROCESSOR_NAME)
    try:
        return from_hf_processor(processor, source=source)
    except ValueError as error:
        raise CheckpointError(str(error) if source in str(error) else f"{source}: {error}") from error


def attach_preprocessing(
    model: VisionTransformer,
    recorded: Preprocessing | None,
    layout: str,
    origin: str,
    fallback: Preprocessing | None = None,
) -> VisionTransformer:
    """Set `model.preprocessing`: the checkpoint's record, else `fallback` (a task delta takes its
    base's), else the layout's default, at the size the model runs at (a model loaded with
    img_size=384 evaluates at 384); logged."""
    preprocessing = recorded
    if preprocessing is None:
        preprocessing = fallback or layout_default(layout, tuple(model.config.img_size))
        log.info("%s: no preprocessing recorded; taking %s", origin, preprocessing.source)
    if preprocessing.img_size != tuple(model.config.img_size):
        preprocessing = preprocessing.replace(img_size=tuple(model.config.img_size))
    model.preprocessing = preprocessing
    log.info("%s: preprocessing: %s", origin, preprocessing.describe())
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
