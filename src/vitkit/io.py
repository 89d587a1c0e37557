"""`vitkit.load` and `vitkit.save`: the public way in and out of checkpoints.

- `save(model, "m.safetensors")`: one file, the config as JSON in the safetensors metadata.
- `save(model, "folder")`: an HF-style folder, `config.json` + `model.safetensors`.
- `load(path, **overrides)`: rebuilds the model with no other argument; overrides such as
  `img_size=384` resample the position embeddings, `num_classes=10` starts a new head. Checkpoints
  of other toolkits are detected and converted; `delta=` applies a task delta to the loaded base.

One load, one value: `read_checkpoint(path)` resolves the path (a file, a model folder, shards, a
training run's folder), opens each file once and returns a `CheckpointFile`; `build_model` makes the
model of it; `load_delta` puts a task delta on top. Loading runs one way, each layer importing only
those below it:

1. `vitkit.files`: safe reading and atomic writing of weight files, knowing nothing of layouts;
   every refusal is a `CheckpointError` naming the file and the reason.
2. `vitkit.convert`: the checkpoint value (`convert.checkpoint`), the layouts (vitkit's own in
   `convert.native`), `build_model`.
3. `vitkit.delta`: task models from a base.
4. this module: `load` (a path or a `CheckpointFile`, with `delta=`), and the names of the layers
   below for their callers.
"""

from __future__ import annotations

import os
from typing import Any

from .convert import CheckpointFile, build_model, checkpoint_path, read_checkpoint
from .convert.names import CONFIG_KEY, MODEL_CONFIG_NAME, WEIGHTS_NAME
from .convert.native import (
    check_header_shapes,
    compare_shapes,
    config_from_metadata,
    expected_shapes,
    load_state,
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
    path: str | os.PathLike | CheckpointFile,
    strict: bool = True,
    delta: str | os.PathLike | None = None,
    layout: str | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Rebuild a saved model. Overrides change the config: e.g. img_size=384 (position embeddings are
    resampled in 2D), num_classes=10 (a new, zero-initialised head). With `delta`, `path` is the base
    and the result is the task model saved by `vitkit.delta.save_delta` (its config is the delta's).

    Checkpoints of other toolkits (vit_jax/big_vision .npz, timm, HF folders, mmpretrain, DeiT) are
    detected and converted (`vitkit.convert.build_model`); `layout=` forces a layout, and its
    options (num_heads=, keep_source_numerics=, pre_logits=) pass through. `path` is anything a
    command takes: a file, a model folder, a training run's folder, a Hub name
    (`hf-hub:org/name[@revision]`), or a `CheckpointFile` already read by
    `vitkit.convert.read_checkpoint`."""
    if delta is not None and overrides:
        raise TypeError(f"load(delta=...) takes its config from the delta; got overrides {sorted(overrides)}")
    checkpoint = path if isinstance(path, CheckpointFile) else read_checkpoint(path, layout)
    model = build_model(checkpoint, strict=strict, **overrides)
    return model if delta is None else load_delta(model, delta)


__all__ = [
    "CONFIG_KEY",
    "MAX_DEFLATE_RATIO",
    "MAX_JSON_BYTES",
    "MAX_WEIGHT_BYTES",
    "MODEL_CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointFile",
    "atomic_write",
    "check_header_shapes",
    "check_regular_file",
    "checkpoint_path",
    "compare_shapes",
    "config_from_metadata",
    "expected_shapes",
    "file_kind",
    "load",
    "load_state",
    "parse_metadata",
    "read_checkpoint",
    "read_header",
    "read_json",
    "read_weights",
    "save",
]
