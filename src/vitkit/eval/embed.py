"""Pooled features of a checkpoint's images (`vitkit embed`): the representation its head reads,
`forward_head(forward_features(x), pre_logits=True)`, written as a float32 (N, D) `.npy` with the
image paths, in the same order, in a `.json` beside it."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from ..models.vit import VisionTransformer

FEATURE_SUFFIX = ".npy"


def pooled_features(model: VisionTransformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> the pooled features (B, D) the model's head would read."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True).float()

    return features


def check_features_path(path: str | os.PathLike) -> Path:
    """The `.npy` path features go to; any other suffix is refused before any image is read."""
    path = Path(path)
    if path.suffix.lower() != FEATURE_SUFFIX:
        raise ValueError(
            f"--out {path}: expected a {FEATURE_SUFFIX} path (float32 N x D features; the image paths go "
            f"to {path.with_suffix('.json').name} beside it)"
        )
    return path


def names_path(features_path: Path) -> Path:
    """Where the image paths of a features file go: `features.npy` -> `features.json`."""
    return features_path.with_suffix(".json")


def write_features(path: Path, features: np.ndarray, names: list[str]) -> tuple[Path, Path]:
    """Write `features` (N, D) as float32 `.npy` and `names` (N paths, in order) as a JSON list,
    each atomically; the names last, so a names file always describes the features beside it."""
    if len(features) != len(names):
        raise ValueError(f"{len(features)} feature rows for {len(names)} names")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(features, dtype=np.float32))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    listing = names_path(path)
    atomic_write(listing, lambda tmp: Path(tmp).write_text(json.dumps(names, indent=0) + "\n"))
    return path, listing
