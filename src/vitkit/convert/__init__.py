"""Checkpoint interoperability: every public ViT layout in and out, proven equal.

    model = vitkit.load("ViT-B_16.npz")                     # layout detected and logged
    model = vitkit.load("dinov2-small/", keep_source_numerics=True)
    report = convert("ViT-B_16.npz", "vit-b16-hf", to="hf")  # `vitkit convert SRC DST --to hf`

Layouts (see each module): vitkit's own (native.py), vit_jax and big_vision .npz (google.py), timm
(timm.py), HF ViT and DINOv2 folders (hf.py), SigLIP image towers (siglip.py), mmpretrain
(mmpretrain.py), DeiT III (deit.py). A checkpoint is read once (`checkpoint.read_checkpoint` ->
`CheckpointFile`); `build_model` makes the model of that value: vitkit's own from its recorded
config, a foreign one by `to_native` (the layout's named fixes and its key table, pure dict -> dict,
then the config inferred from the tensors by `detect.infer_config`); `native.load_state` then
resamples position embeddings and checks every key and shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import CheckpointError
from ..models.config import ViTConfig
from ..models.vit import VisionTransformer
from .checkpoint import CheckpointFile, checkpoint_path, read_checkpoint
from .detect import LAYOUTS, detect_layout, infer_config
from .keymap import KeyTable, Layout, State
from .names import CONFIG_KEY, MODEL_CONFIG_NAME
from .native import check_header_shapes, compare_shapes, expected_shapes, load_state, save, shapes_of
from .preprocessing_files import attach_preprocessing
from .records import fit_records, records_metadata, write_folder_records, write_sidecar

log = logging.getLogger(__name__)

# `vitkit convert --to` names -> layouts ("npz" is the official vit_jax format).
TARGETS = {
    "vitkit": None,
    "timm": "timm",
    "hf": "hf",
    "npz": "vit_jax",
    "mmpretrain": "mmpretrain",
    "siglip": "siglip",
}
# The output paths each target writes ("" is a folder); any other suffix is refused, not renamed.
TARGET_SUFFIXES = {
    "vitkit": (".safetensors", ""),
    "timm": (".pth", ".pt", ".bin", ".safetensors"),
    "hf": ("",),
    "npz": (".npz",),
    "mmpretrain": (".pth", ".pt"),
    "siglip": ("",),
}

# Config fields that tensors cannot tell: given by the user, they describe the source checkpoint.
HINT_FIELDS = (
    "num_heads",
    "pool",
    "layer_scale_init",
    "norm_eps",
    "gelu",
    "pos_embed_resample",
    "pos_embed",
    "dropout",
    "attn_dropout",
    "drop_path",
    "zero_head",
)


def _check_keys(
    native: State,
    source: ViTConfig,
    table: KeyTable,
    unused: list[str],
    missing: list[str],
    strict: bool,
    origin: str,
) -> None:
    """Compare the converted tensors with the model the config builds; errors name both layouts' keys."""
    expected = expected_shapes(source)

    def named(key: str) -> str:
        foreign = table.foreign_names(key)
        return f"{key} ({table.name}: {', '.join(foreign)})" if foreign and foreign != [key] else key

    diff = compare_shapes(expected, shapes_of(native), describe=named)
    if diff.mismatched:
        raise CheckpointError(
            f"{origin}: shapes do not match the inferred config: " + "; ".join(diff.mismatched)
        )
    absent = [named(key) for key in diff.missing]
    unexpected = diff.unexpected
    problems = {
        "missing": sorted(set(missing)) + absent,
        "unused": unused + unexpected,
    }
    if any(problems.values()):
        message = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
        if strict:
            raise CheckpointError(
                f"{origin}: keys do not match ({message}); pass strict=False to load anyway"
            )
        log.warning("%s: keys do not match (%s)", origin, message)


def to_native(
    checkpoint: CheckpointFile,
    keep_source_numerics: bool = False,
    strict: bool = True,
    progress: bool = False,
    fallback_img_size: int | tuple[int, int] | None = None,
    **known: Any,
) -> tuple[State, ViTConfig]:
    """A foreign checkpoint -> (native state dict, the config it describes), keys and shapes checked.

    `known` gives config fields the tensors cannot tell; `fallback_img_size` is the resolution of a
    checkpoint without a learned position embedding (nothing to read the grid from)."""
    layout = LAYOUTS[checkpoint.layout]
    origin = str(checkpoint.path)
    state = checkpoint.tensors()
    native, unused, missing = layout.read(state, origin, progress=progress)
    if not native:
        raise CheckpointError(
            f"{origin}: no key matches the {layout.name} layout (first keys: {sorted(state)[:4]}); "
            "leave layout= unset to detect it"
        )
    structure, numerics = {}, dict(layout.numerics)
    if checkpoint.folder_config is not None and layout.folder_config is not None:
        config_path = checkpoint.path / MODEL_CONFIG_NAME
        try:
            structure, numerics = layout.folder_config(dict(checkpoint.folder_config))
        except KeyError as error:
            raise CheckpointError(f"{config_path}: no {error.args[0]!r} field") from error
        except (TypeError, ValueError, IndexError) as error:
            raise CheckpointError(f"{config_path}: {error}") from error
    if keep_source_numerics:
        log.info("%s: keeping the source's numerics %s", origin, numerics)
    else:
        differ = {k: v for k, v in numerics.items() if getattr(ViTConfig, k) != v and k not in known}
        if differ:
            log.info(
                "%s: the source computes with %s; pass keep_source_numerics=True to match it", origin, differ
            )
        numerics = {}
    if "pos_embed" not in native and "img_size" not in structure and fallback_img_size is not None:
        structure["img_size"] = fallback_img_size
    source = infer_config(native, origin, **{**structure, **numerics, **known})
    _check_keys(native, source, layout.table_for(state), unused, missing, strict, origin)
    return native, source


def _build_native(checkpoint: CheckpointFile, strict: bool, **overrides: Any) -> VisionTransformer:
    """vitkit's own checkpoint: its recorded config, checked against the header's shapes before any
    tensor is read or module built."""
    source = checkpoint.config
    if source is None:
        raise CheckpointError(
            f"{checkpoint.origin}: no {CONFIG_KEY!r} in the safetensors metadata; not a vitkit checkpoint"
        )
    check_header_shapes(source, dict(checkpoint.shapes), checkpoint.origin, strict=strict)
    model = VisionTransformer(source.replace(**overrides))
    load_state(model, checkpoint.tensors(), source_config=source, strict=strict, origin=checkpoint.origin)
    return model


def build_model(
    checkpoint: CheckpointFile,
    strict: bool = True,
    keep_source_numerics: bool = False,
    pre_logits: bool = True,
    progress: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """The model a checkpoint describes, of any layout (`vitkit.load` = `read_checkpoint` + this).

    - `keep_source_numerics`: compute as the source toolkit does (tanh GELU for vit_jax/big_vision,
      HF's LayerNorm eps, the source's position-embedding resampling).
    - `pre_logits=False`: drop the pre-logits layer of ImageNet-21k checkpoints.
    - `overrides`: config fields. Those tensors cannot tell (num_heads, pool, ...) describe the
      source; the others change the model built (img_size=384 resamples, num_classes=10 renews the
      head).
    """
    if checkpoint.layout == "vitkit":
        if not pre_logits:
            overrides["representation_size"] = None
        model = _build_native(checkpoint, strict, **overrides)
        return attach_preprocessing(model, checkpoint.preprocessing, "vitkit", str(checkpoint.path))
    known = {key: value for key, value in overrides.items() if key in HINT_FIELDS}
    native, source = to_native(
        checkpoint,
        keep_source_numerics,
        strict,
        progress,
        fallback_img_size=overrides.get("img_size"),
        **known,
    )
    if not pre_logits and source.representation_size:
        # timm and the 2021 vit_jax fine-tuning code drop it too: the head then sees the pooled token.
        native = {key: value for key, value in native.items() if not key.startswith("pre_logits.")}
        overrides["representation_size"] = None
        log.info("%s: dropped the pre-logits layer (pre_logits=False)", checkpoint.path)
    model = VisionTransformer(source.replace(**overrides))
    load_state(model, native, source_config=source, strict=strict, origin=str(checkpoint.path))
    return attach_preprocessing(model, checkpoint.preprocessing, checkpoint.layout, str(checkpoint.path))


@dataclass
class ConversionReport:
    source_layout: str
    target: str
    path: Path
    config: ViTConfig
    num_tensors: int
    not_held: tuple[str, ...] = ()  # what the source recorded that the target layout cannot hold


def write_layout(
    model: VisionTransformer,
    path: str | os.PathLike,
    to: str,
    progress: bool = False,
    classes: Sequence[str] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model in another layout, with its preprocessing, `classes` and `data` config where the
    layout can hold them (`records.py`; a warning names what it cannot). The converted tensors are
    mapped back and compared bitwise with the model's before anything is written."""
    return _write_layout(model, Path(path), to, progress, classes, data)[0]


def _write_layout(
    model: VisionTransformer,
    path: Path,
    to: str,
    progress: bool,
    classes: Sequence[str] | None,
    data: Mapping[str, Any] | None,
) -> tuple[Path, list[str]]:
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; use one of {', '.join(TARGETS)}")
    classes, data = fit_records(model, classes, data, str(path))
    if TARGETS[to] is None:
        return save(model, path, metadata=records_metadata(model, classes, data)), []
    layout: Layout = LAYOUTS[TARGETS[to]]
    state, config = layout.prepare(model.state_dict(), model.config)
    foreign = layout.write(state, config, progress=progress)
    back, _, _ = layout.table_for(config=config).to_native(foreign)
    different = [key for key, value in state.items() if key not in back or not torch.equal(back[key], value)]
    if different:
        raise CheckpointError(f"{layout.name}: converting back does not give the same tensors: {different}")
    written = layout.save(foreign, path, config)
    if not written.is_dir():
        write_sidecar(model, written, classes, data)
        return written, []
    not_held = write_folder_records(model, written, classes, data)
    if not_held:
        log.warning(
            "%s: the %s layout cannot hold %s; not recorded", written, layout.name, ", ".join(not_held)
        )
    return written, not_held


def check_target_path(path: Path, to: str) -> None:
    """Refuse an output path whose suffix does not fit the target's format, before any work."""
    allowed = TARGET_SUFFIXES[to]
    if path.suffix.lower() not in allowed:
        kinds = [suffix or "a folder (no suffix)" for suffix in allowed]
        raise CheckpointError(
            f"{path}: a {to} checkpoint is written as {' or '.join(kinds)}, not {path.suffix or 'a folder'}"
        )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    layout: str | None = None,
    strict: bool = True,
    keep_source_numerics: bool = False,
    pre_logits: bool = True,
    progress: bool = False,
    **overrides: Any,
) -> ConversionReport:
    """Convert a checkpoint of any layout into `to` (vitkit, timm, hf, npz, mmpretrain, siglip).

    Everything is read, converted and checked in memory first; files are written atomically, so a
    failed conversion leaves no partial output and an existing `dst` as it was.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; use one of {', '.join(TARGETS)}")
    check_target_path(Path(dst), to)
    checkpoint = read_checkpoint(src, layout)
    model = build_model(checkpoint, strict, keep_source_numerics, pre_logits, progress, **overrides)
    path, not_held = _write_layout(model, Path(dst), to, progress, checkpoint.classes, checkpoint.data)
    return ConversionReport(
        checkpoint.layout, to, path, model.config, len(model.state_dict()), tuple(not_held)
    )


__all__ = [
    "LAYOUTS",
    "TARGETS",
    "CheckpointFile",
    "ConversionReport",
    "build_model",
    "checkpoint_path",
    "convert",
    "detect_layout",
    "infer_config",
    "read_checkpoint",
    "to_native",
    "write_layout",
]
