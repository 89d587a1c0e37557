"""Pooled features of a checkpoint's images (`vitkit embed`): the representation its head reads,
`forward_head(forward_features(x), pre_logits=True)`, written in one of two forms, chosen by the
suffix of the path (`check_features_path` refuses any other before an image is read):

- `.npy`: float32 (N, D), and the image paths, in the same order, as a JSON list in a `.json` beside it;
- `.parquet`: one file with columns `path` (string) and `features` (fixed-size list of D float32), in
  the same order, and what produced them (checkpoint, dimension, preprocessing, precision) as JSON
  under the key `vitkit` of its schema metadata. It needs pyarrow (`pip install 'vitkit[parquet]'`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..io import atomic_write
from ..models.vit import VisionTransformer

NUMPY_SUFFIX = ".npy"
PARQUET_SUFFIX = ".parquet"
FEATURE_SUFFIXES = (NUMPY_SUFFIX, PARQUET_SUFFIX)
PARQUET_METADATA_KEY = "vitkit"  # the schema metadata entry describing the features (JSON)


def pooled_features(model: VisionTransformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> the pooled features (B, D) the model's head would read."""

    def features(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True).float()

    return features


def parquet_module(path: Path) -> ModuleType:
    """`pyarrow.parquet`, or a one-line error saying how to install it (an optional dependency)."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ValueError(
            f"--out {path}: writing {PARQUET_SUFFIX} needs pyarrow: pip install 'vitkit[parquet]' "
            f"(or write {NUMPY_SUFFIX})"
        ) from error
    return pyarrow.parquet


def check_features_path(path: str | os.PathLike) -> Path:
    """The `.npy` or `.parquet` path features go to; any other suffix, or `.parquet` without pyarrow,
    is refused before any image is read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FEATURE_SUFFIXES:
        raise ValueError(
            f"--out {path}: expected a {NUMPY_SUFFIX} path (float32 N x D features; the image paths go "
            f"to {path.with_suffix('.json').name} beside it) or a {PARQUET_SUFFIX} path (paths and "
            "features in one file)"
        )
    if suffix == PARQUET_SUFFIX:
        parquet_module(path)
    return path


def names_path(features_path: Path) -> Path:
    """Where the image paths of a `.npy` features file go: `features.npy` -> `features.json`."""
    return features_path.with_suffix(".json")


def write_features(
    path: Path, features: np.ndarray, names: list[str], description: Mapping[str, Any] | None = None
) -> tuple[Path, ...]:
    """Write `features` (N, D) and `names` (N paths, in order) as the suffix of `path` says
    (`check_features_path`), each file atomically; the files written. `description` (JSON-able: the
    checkpoint, preprocessing ...) goes into a `.parquet` file's schema metadata."""
    if len(features) != len(names):
        raise ValueError(f"{len(features)} feature rows for {len(names)} names")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if check_features_path(path).suffix.lower() == PARQUET_SUFFIX:
        return (write_parquet(path, features, names, description or {}),)
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    # The names last, so a names file always describes the features beside it.
    listing = names_path(path)
    atomic_write(listing, lambda tmp: Path(tmp).write_text(json.dumps(names, indent=0) + "\n"))
    return path, listing


def write_parquet(path: Path, features: np.ndarray, names: list[str], description: Mapping[str, Any]) -> Path:
    """One parquet file: `path` (string) and `features` (fixed-size list of D float32) per image, in
    order, and `description` as JSON under the schema metadata key `vitkit`."""
    parquet = parquet_module(path)
    import pyarrow

    num_features = features.shape[1]
    schema = pyarrow.schema(
        [
            pyarrow.field("path", pyarrow.string(), nullable=False),
            pyarrow.field("features", pyarrow.list_(pyarrow.float32(), num_features), nullable=False),
        ],
        metadata={PARQUET_METADATA_KEY: json.dumps(dict(description))},
    )
    rows = pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(features.reshape(-1)), num_features)
    table = pyarrow.Table.from_arrays([pyarrow.array(names, pyarrow.string()), rows], schema=schema)
    atomic_write(path, lambda tmp: parquet.write_table(table, tmp))
    return path


def read_parquet_features(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """A `.parquet` features file -> (features float32 (N, D), the N paths, its description)."""
    parquet = parquet_module(Path(path))
    table = parquet.read_table(path)
    column = table.column("features").combine_chunks()
    features = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    metadata = table.schema.metadata or {}
    description = json.loads(metadata.get(PARQUET_METADATA_KEY.encode(), b"{}"))
    return features.astype(np.float32, copy=False), table.column("path").to_pylist(), description
