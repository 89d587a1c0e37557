"""`vitkit.load` and `vitkit.save`: the public way in and out of checkpoints.

- `save(model, "m.safetensors")`: one file, the config as JSON in the safetensors metadata.
- `save(model, "folder")`: an HF-style folder, `config.json` + `model.safetensors`.
- `load(path, **overrides)`: rebuilds the model with no other argument; overrides such as
  `img_size=384` resample the position embeddings, `num_classes=10` starts a new head. Checkpoints
  of other toolkits are detected and converted; `delta=` applies a task delta to the loaded base.

Loading runs one way, each layer importing only those below it:

1. `vitkit.files`: safe reading and atomic writing of weight files, knowing nothing of layouts;
   every refusal is a `CheckpointError` naming the file and the reason.
2. `vitkit.convert`: the layouts, vitkit's own (`vitkit.convert.native`) among the others.
3. `vitkit.loading`: chooses the layout of a checkpoint and loads it.
4. `vitkit.delta`: task models from a base that `vitkit.loading` loads.
5. this module: `load` with `delta=`, and the names of the layers below for their callers.
"""

from __future__ import annotations

import os
from typing import Any

from . import loading
from .convert.native import (
    CONFIG_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_header_shapes,
    config_from_metadata,
    expected_shapes,
    is_native,
    load_state,
    read_config,
    read_folder_config,
    save,
)
from .delta import load_delta
from .files import (
    MAX_DEFLATE_RATIO,
    MAX_JSON_BYTES,
    MAX_WEIGHT_BYTES,
    CheckpointError,
    atomic_write,
    check_regular_file,
    file_kind,
    parse_metadata,
    read_header,
    read_json,
    read_weights,
)
from .models.vit import VisionTransformer


def load(
    path: str | os.PathLike,
    strict: bool = True,
    delta: str | os.PathLike | None = None,
    layout: str | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Rebuild a saved model. Overrides change the config: e.g. img_size=384 (position embeddings are
    resampled in 2D), num_classes=10 (a new, zero-initialised head). With `delta`, `path` is the base
    and the result is the task model saved by `vitkit.delta.save_delta` (its config is the delta's).

    Checkpoints of other toolkits (vit_jax/big_vision .npz, timm, HF folders, mmpretrain, DeiT) are
    detected and converted by `vitkit.convert.load_converted`; `layout=` forces a layout, and its
    options (num_heads=, keep_source_numerics=, pre_logits=) pass through."""
    if delta is None:
        return loading.load(path, strict=strict, layout=layout, **overrides)
    if overrides:
        raise TypeError(f"load(delta=...) takes its config from the delta; got overrides {sorted(overrides)}")
    return load_delta(loading.load(path, strict=strict), delta)


__all__ = [
    "CONFIG_KEY",
    "CONFIG_NAME",
    "MAX_DEFLATE_RATIO",
    "MAX_JSON_BYTES",
    "MAX_WEIGHT_BYTES",
    "WEIGHTS_NAME",
    "CheckpointError",
    "atomic_write",
    "check_header_shapes",
    "check_regular_file",
    "config_from_metadata",
    "expected_shapes",
    "file_kind",
    "is_native",
    "load",
    "load_state",
    "parse_metadata",
    "read_config",
    "read_folder_config",
    "read_header",
    "read_json",
    "read_weights",
    "save",
]
