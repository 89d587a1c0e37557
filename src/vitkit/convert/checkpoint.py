"""A checkpoint read once: `read_checkpoint(path)` -> `CheckpointFile`, the one value every later step
takes (building the model, converting, a classifier's class names, a task delta, the preprocessing).

`read_checkpoint` resolves the path (a weight file, a model folder with its config.json, sharded
weights, a training run's folder), opens every file of it once, and parses what the files say:
layout, tensor names and shapes, vitkit's metadata records (`names.METADATA_KEYS`), the folder's
config.json and preprocessor_config.json, the records beside another toolkit's single file
(`records.py`). The tensors stay in the open files until
`CheckpointFile.tensors()` reads each of them, once. Files other than safetensors (.pth, .bin, .npz)
have no header to read apart from their tensors, so theirs are read at once. A file with a known
SHA-256 (`sha256=`, a training checkpoint's) is mapped once: the digest is checked on the mapped bytes
and the tensors are views of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..files import (
    MAX_JSON_BYTES,
    CheckpointError,
    check_regular_file,
    parse_metadata,
    read_json,
    read_weights,
)
from ..models.config import ViTConfig
from ..models.preprocessing import Preprocessing, from_timm_config
from .detect import LAYOUTS, detect_layout
from .hub import HubSource, download, expected_digests, is_hub_name, log_source
from .keymap import State
from .names import (
    CLASSES_KEY,
    CONFIG_KEY,
    DATA_KEY,
    DELTA_KEY,
    FOLDER_WEIGHTS,
    MODEL_CONFIG_NAME,
    PROCESSOR_NAME,
    RUN_WEIGHTS,
    SHARD_INDEX_NAME,
)
from .native import config_from_metadata
from .preprocessing_files import recorded_preprocessing
from .records import read_sidecar

log = logging.getLogger(__name__)


class _Tensors:
    """The tensors of a checkpoint: open safetensors handles until the first read, then the dict."""

    def __init__(self, handles: Mapping[Path, Any], state: State | None = None):
        self.handles = dict(handles)
        self.state = state

    def read(self) -> State:
        if self.state is None:
            state: State = {}
            for path, handle in self.handles.items():
                try:
                    state.update({key: handle.get_tensor(key) for key in handle.keys()})
                except (SafetensorError, OSError, ValueError) as error:
                    raise CheckpointError(f"{path}: a tensor cannot be read (truncated?): {error}") from error
                finally:
                    handle.__exit__(None, None, None)
            self.state, self.handles = state, {}
        return self.state


@dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint's files say, read once. `layout` is "vitkit" or a key of `LAYOUTS`; the
    records (`config` ... `delta`) are None where the checkpoint has none."""

    path: Path  # the file or folder read (a run folder's weights file, not the run folder)
    layout: str
    weight_files: tuple[Path, ...]
    shapes: Mapping[str, tuple[int, ...]]
    # The first weight file's safetensors metadata, with the entries of a records file beside it.
    metadata: Mapping[str, str] = field(default_factory=dict)
    folder_config: Mapping[str, Any] | None = None  # a model folder's config.json
    config: ViTConfig | None = None  # vitkit's own record of the model
    processor_config: Mapping[str, Any] | None = None  # an HF folder's preprocessor_config.json
    classes: tuple[str, ...] | None = None
    data: Mapping[str, Any] | None = None  # a training run's data config
    delta: Mapping[str, Any] | None = None  # a task delta's record
    source: _Tensors = field(default_factory=lambda: _Tensors({}, {}), repr=False, compare=False)
    hub: HubSource | None = None  # the Hub repo, commit and weight digests of an `hf-hub:` name

    @classmethod
    def from_state(
        cls, path: str | os.PathLike, layout: str, state: State, folder_config: Mapping | None = None
    ) -> CheckpointFile:
        """A checkpoint value of tensors already in memory (tests, other toolkits' objects)."""
        shapes = {key: tuple(value.shape) for key, value in state.items()}
        return cls(Path(path), layout, (), shapes, folder_config=folder_config, source=_Tensors({}, state))

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The recorded preprocessing (not a layout's default), parsed from the records read: a
        training run's data config, vitkit's record, the processor config, else the `pretrained_cfg`
        of the config.json timm publishes on the Hub. None if none."""
        weights = self.weight_files[0] if self.weight_files else self.path
        recorded = recorded_preprocessing(weights, self.metadata, self.processor_config)
        timm_cfg = (self.folder_config or {}).get("pretrained_cfg")
        if recorded is not None or timm_cfg is None:
            return recorded
        source = str(self.path / MODEL_CONFIG_NAME)
        try:
            return from_timm_config(timm_cfg, f"{source}: pretrained_cfg")
        except ValueError as error:
            raise CheckpointError(str(error)) from error

    @property
    def origin(self) -> str:
        """The path that errors and logs name: the weight file of a one-file checkpoint."""
        return str(self.weight_files[0] if len(self.weight_files) == 1 else self.path)

    def tensors(self) -> State:
        """Every tensor, in its own layout; each is read from its file on the first call only."""
        return self.source.read()


# Resolving a path ------------------------------------------------------------------------------------
def _model_folder_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json when it describes a model (it names a `model_type`), else None."""
    if not (folder / MODEL_CONFIG_NAME).is_file():
        return None
    try:
        config = read_json(folder / MODEL_CONFIG_NAME)
    except CheckpointError:
        return None
    return config if "model_type" in config else None


def _resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """(the file or model folder to read, its config.json when already read for the decision)."""
    path = Path(path)
    if path.name in FOLDER_WEIGHTS and path.is_file():
        folder_config = _model_folder_config(path.parent)
        if folder_config is not None:
            log.info("%s: reading its folder %s (config.json beside the weights)", path, path.parent)
            return path.parent, folder_config
        return path, None
    if path.is_dir():
        for name in RUN_WEIGHTS:
            if (path / name).is_file():
                return path / name, None
        # The newest checkpoints first, then a fine-tuning run's start.
        steps = sorted(path.glob("checkpoints/step-*/model.safetensors"), reverse=True)
        started = steps + sorted(path.glob("init-*.safetensors"))
        if started or ((path / MODEL_CONFIG_NAME).is_file() and (path / "checkpoints").is_dir()):
            choices = ", ".join(str(file) for file in started[:3]) or "it has written no weights yet"
            raise CheckpointError(
                f"{path}: a run folder with no best.safetensors or last.safetensors yet (the run has not "
                f"finished); pass one of its weight files: {choices}"
            )
        if any((path / name).is_file() for name in (MODEL_CONFIG_NAME, *FOLDER_WEIGHTS, SHARD_INDEX_NAME)):
            return path, None
        raise CheckpointError(
            f"{path}: neither a run folder (best.safetensors, last.safetensors) nor a checkpoint folder "
            "(config.json, model.safetensors)"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path, None


def checkpoint_path(path: str | os.PathLike) -> Path:
    """What a checkpoint argument names: a run folder's best (else last) weights, a pre-training run's
    encoder, the model folder of `folder/model.safetensors`, the snapshot folder of an `hf-hub:` name;
    any other folder or file as it is."""
    if is_hub_name(path):
        path = download(str(path))[0]
    return _resolve(path)[0]


# Reading the files -----------------------------------------------------------------------------------
def _open_safetensors(path: Path) -> tuple[Any, dict[str, tuple[int, ...]], dict[str, str]]:
    """(open handle, tensor shapes, metadata) from the header alone; the handle reads the tensors later."""
    if check_regular_file(path) == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        return handle, shapes, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error


def _weight_files(folder: Path) -> tuple[Path, ...]:
    """A model folder's weight files: the shards its index names, else its one weights file."""
    index = folder / SHARD_INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
            for name in weight_map.values()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names in the folder")
        return tuple(folder / name for name in sorted(set(weight_map.values())))
    for name in FOLDER_WEIGHTS:
        if (folder / name).exists():
            return (folder / name,)
    raise CheckpointError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index in the folder")


def _read_weight_files(
    files: tuple[Path, ...],
) -> tuple[_Tensors, dict[str, tuple[int, ...]], dict[str, str]]:
    """Headers now (safetensors), tensors later; other formats are read whole."""
    handles: dict[Path, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, str] | None = None
    eager: State = {}
    for path in files:
        if path.suffix.lower() == ".safetensors":
            handles[path], file_shapes, file_metadata = _open_safetensors(path)
        else:
            tensors, file_metadata = read_weights(path)
            eager.update(tensors)
            file_shapes = {key: tuple(value.shape) for key, value in tensors.items()}
        shapes.update(file_shapes)
        metadata = file_metadata if metadata is None else metadata
    if eager and handles:
        eager.update(_Tensors(handles).read())
    return _Tensors(handles, eager if eager or not handles else None), shapes, metadata or {}


# safetensors' dtype names -> torch's.
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _read_checked(path: Path, sha256: str) -> tuple[_Tensors, dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file through one open (a training checkpoint's file, listed in its marker): mapped
    copy-on-write, its SHA-256 checked on the mapped bytes, its tensors views of those very bytes (no
    copy in memory; an in-place update of a tensor never reaches the file)."""
    tensors, shapes, metadata, digest = _read_mapped(path)
    if digest != sha256:
        raise CheckpointError(f"{path}: checksum mismatch (damaged or truncated)")
    return tensors, shapes, metadata


def _read_mapped(path: Path) -> tuple[_Tensors, dict[str, tuple[int, ...]], dict[str, str], str]:
    """(tensors, shapes, metadata, SHA-256) of a safetensors file mapped once, copy-on-write: the digest
    is taken on the mapped bytes and the tensors are views of them."""
    if path.suffix.lower() != ".safetensors" or check_regular_file(path) == 0:
        raise CheckpointError(f"{path}: not a safetensors file, or empty")
    with open(path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    digest = hashlib.sha256(data).hexdigest()
    try:
        state, metadata = _tensor_views(data)
    except (AttributeError, KeyError, TypeError, ValueError, struct.error) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {error!r}"
        ) from error
    return _Tensors({}, state), {key: tuple(value.shape) for key, value in state.items()}, metadata, digest


def _read_hub_files(
    files: tuple[Path, ...], source: HubSource
) -> tuple[_Tensors, dict[str, tuple[int, ...]], dict[str, str], HubSource]:
    """A Hub snapshot's weight files, each mapped once: its SHA-256 taken on the bytes read and compared
    with the digest the Hub records for it (the name of its blob in the cache)."""
    state: State = {}
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, str] | None = None
    digests: dict[str, str] = {}
    for path, expected in expected_digests(files).items():
        tensors, file_shapes, file_metadata, digest = _read_mapped(path)
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"{source.name}: {path.name} is damaged in the cache (sha256 {digest}, the Hub records "
                f"{expected}); delete {os.path.realpath(path)} and load again"
            )
        state.update(tensors.read())
        shapes.update(file_shapes)
        metadata = file_metadata if metadata is None else metadata
        digests[path.name] = digest
    return _Tensors({}, state), shapes, metadata or {}, dataclasses.replace(source, sha256=digests)


def _tensor_views(data: mmap.mmap) -> tuple[State, dict[str, str]]:
    """A safetensors file's tensors, as views of its bytes, and its metadata. Each tensor's byte range
    must hold exactly its shape, and `torch.frombuffer` refuses a range beyond the bytes."""
    (header_size,) = struct.unpack_from("<Q", data)
    start = 8 + header_size
    if start > len(data) or header_size > MAX_JSON_BYTES:  # a header is JSON, bounded as any other
        raise ValueError(f"a header of {header_size} bytes in a file of {len(data)}")
    header = json.loads(data[8:start])
    metadata = header.pop("__metadata__", None) or {}
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()):
        raise ValueError("metadata must map text to text")
    state: State = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]):
            raise ValueError(f"{key}: shape and data_offsets must be counts")
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(
                f"{key}: bytes {begin}..{end} do not hold a {entry['dtype']} tensor of shape {shape}"
            )
        view = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin) if count else None
        state[key] = torch.empty(shape, dtype=dtype) if view is None else view.reshape(shape)
    return state, metadata


def _folder_config(folder: Path, known: dict[str, Any] | None) -> dict[str, Any]:
    if known is not None:
        return known
    if not (folder / MODEL_CONFIG_NAME).exists():
        raise CheckpointError(f"{folder}: folder has no {MODEL_CONFIG_NAME}")
    return read_json(folder / MODEL_CONFIG_NAME)


def read_checkpoint(
    path: str | os.PathLike, layout: str | None = None, sha256: str | None = None
) -> CheckpointFile:
    """Resolve `path`, open each of its files once and parse what they say (`layout=` forces one).
    With `sha256`, `path` is one safetensors file read whole and checked against that digest.
    `hf-hub:org/name[@revision]` names a Hub repo: its snapshot folder is read, and `hub` says which
    commit it is of and the SHA-256 of each weight file (`convert/hub.py`)."""
    if layout is not None and layout != "vitkit" and layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; known: vitkit, {', '.join(LAYOUTS)}")
    hub = None
    if is_hub_name(path):
        path, hub = download(str(path))
    path, folder_config = _resolve(path)
    if path.is_dir():
        folder_config = _folder_config(path, folder_config)
        files = _weight_files(path)
    else:
        files = (path,)
    if hub is not None:
        tensors, shapes, metadata, hub = _read_hub_files(files, hub)
        log_source(hub)
    elif sha256 is None:
        tensors, shapes, metadata = _read_weight_files(files)
    else:
        tensors, shapes, metadata = _read_checked(path, sha256)
    model_type = folder_config.get("model_type") if folder_config is not None else None
    native = model_type == "vitkit" if folder_config is not None else CONFIG_KEY in metadata
    if layout is None:
        layout = "vitkit" if native else detect_layout(shapes, str(path), model_type).name
        log.info("%s: detected the %s layout", path, layout)
    else:
        log.info("%s: reading as the %s layout (forced)", path, layout)
    if folder_config is None and CONFIG_KEY not in metadata and sha256 is None:
        # Another toolkit's file: vitkit's records beside it (a checked file's records are its metadata).
        metadata = {**metadata, **read_sidecar(path)}
    records = _records(path, files, metadata, folder_config)
    return CheckpointFile(
        path, layout, files, shapes, metadata, folder_config, **records, source=tensors, hub=hub
    )


# What the files record -------------------------------------------------------------------------------
def _records(
    path: Path, files: tuple[Path, ...], metadata: Mapping[str, str], folder_config: Mapping | None
) -> dict[str, Any]:
    """The fields of `CheckpointFile` that vitkit's metadata, config.json and the processor config give."""
    weights = files[0]
    processor = None
    if path.is_dir() and (path / PROCESSOR_NAME).is_file():
        processor = read_json(path / PROCESSOR_NAME)
    return {
        "config": _config(path, weights, metadata, folder_config),
        "processor_config": processor,
        "classes": _classes(path, weights, metadata, folder_config),
        "data": parse_metadata(weights, metadata, DATA_KEY) if DATA_KEY in metadata else None,
        "delta": parse_metadata(weights, metadata, DELTA_KEY) if DELTA_KEY in metadata else None,
    }


def _config(path: Path, weights: Path, metadata: Mapping[str, str], folder_config: Mapping | None):
    """vitkit's record of the model: a vitkit folder's config.json, else a file's metadata."""
    if folder_config is not None and folder_config.get("model_type") == "vitkit":
        fields = {key: value for key, value in folder_config.items() if key != "model_type"}
        try:
            return ViTConfig.from_dict(fields)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path / MODEL_CONFIG_NAME}: {error}") from error
    if folder_config is None and CONFIG_KEY in metadata:
        return config_from_metadata(weights, dict(metadata))
    return None


def _classes(
    path: Path, weights: Path, metadata: Mapping[str, str], folder_config: Mapping | None
) -> tuple[str, ...] | None:
    """The class names: vitkit's metadata, else an HF config.json's `id2label`."""
    if CLASSES_KEY in metadata:
        return tuple(parse_metadata(weights, dict(metadata), CLASSES_KEY, list))
    id2label = (folder_config or {}).get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    names = [id2label.get(str(index)) for index in range(len(id2label))]
    if not all(isinstance(name, str) for name in names):
        raise CheckpointError(
            f"{path / MODEL_CONFIG_NAME}: id2label has {len(id2label)} entries but not one name per class "
            "(expected keys '0', '1', ...)"
        )
    return tuple(names)
