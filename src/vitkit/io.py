"""Native checkpoints: safetensors weights that carry their ViTConfig, and safe reading of weight files.

- `save(model, "m.safetensors")`: one file, the config as JSON in the safetensors metadata.
- `save(model, "folder")`: an HF-style folder, `config.json` + `model.safetensors`.
- `load(path, **overrides)`: rebuilds the model with no other argument; overrides such as
  `img_size=384` resample the position embeddings, `num_classes=10` starts a new head.

Reading never unpickles arbitrary objects: .pth/.bin go through `torch.load(weights_only=True)` and
.npz through `numpy.load(allow_pickle=False)`. Writing is atomic (temporary file, fsync, rename), so
an interrupted save leaves the previous file intact.

Reading treats every file as untrusted and bounds the work it can cause: only regular files are
opened (a FIFO would block forever), JSON files are read up to `MAX_JSON_BYTES`, what an archive's
headers claim (.npz array shapes, zip member sizes) is checked against the bytes present before
anything is allocated, and a native checkpoint's config is validated (`ViTConfig.check_types`) and
compared with the tensor shapes of the file's header before any module or tensor is built. Every
refusal is a `CheckpointError` (a ValueError) whose one-line message names the file and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .models.config import ViTConfig
from .models.pos_embed import resample_pos_embed
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)

CONFIG_KEY = "vitkit.config"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# A config or index file is a few KB; this bounds what a hostile one can make vitkit read.
MAX_JSON_BYTES = 64 << 20
# The largest registered model (ViT-H/14, 21k head) is 2.5 GB in fp32; this bounds what an archive's
# directory may claim in all.
MAX_WEIGHT_BYTES = 64 << 30


# Deflate expands at most ~1032:1 (258-byte matches in 2-bit codes); a zip member claiming more lies.
MAX_DEFLATE_RATIO = 1032
NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
NPY_MAX_HEADER_BYTES = 10000  # numpy's own default limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and problem."""


# Untrusted files ------------------------------------------------------------------------------------
def file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, error: type[Exception] = CheckpointError) -> int:
    """The size of `path`, a regular file (symlinks followed); else `error` naming what it is.

    Opening a FIFO blocks until a writer comes, and a device can be endless, so neither is read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as cause:
        raise error(f"{path}: cannot be read: {cause.strerror}") from cause
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: is {file_kind(info.st_mode)}, not a regular file; not read")
    return info.st_size


def read_json(
    path: str | os.PathLike, error: type[Exception] = CheckpointError, max_bytes: int = MAX_JSON_BYTES
) -> dict[str, Any]:
    """A JSON object from a regular file of at most `max_bytes`; `error` names the file otherwise."""
    size = check_regular_file(path, error)
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, more than the {max_bytes} a JSON file may have here")
    try:
        data = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as cause:
        raise error(f"{path}: invalid JSON: {cause}") from cause
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def parse_metadata(path: str | os.PathLike, metadata: dict[str, str], key: str, expected: type = dict) -> Any:
    """The JSON value stored under `key` in a safetensors file's metadata, of type `expected`."""
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as cause:
        raise CheckpointError(f"{path}: metadata {key!r}: invalid JSON: {cause}") from cause
    if not isinstance(value, expected):
        raise CheckpointError(
            f"{path}: metadata {key!r}: expected a JSON {expected.__name__}, found {type(value).__name__}"
        )
    return value


def config_from_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> ViTConfig:
    """The validated ViTConfig stored under CONFIG_KEY (every field typed and bounded)."""
    try:
        return ViTConfig.from_dict(parse_metadata(path, metadata, CONFIG_KEY))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as cause:
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY!r}: {cause}") from cause


# Writing ---------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file as 0600; give it the mode a plain open() would (0666 less umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    meta = {"format": "pt", CONFIG_KEY: config_json, **(metadata or {})}
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
def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weight file safely: (flat tensors, metadata). Knows .safetensors, .pth/.pt/.bin, .npz."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; use load() for checkpoint folders")
    if check_regular_file(path) == 0:
        raise CheckpointError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _read_safetensors(path)
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            return _read_torch(path), {}
        if suffix == ".npz":
            return _read_npz(path), {}
    except MemoryError as error:
        raise CheckpointError(f"{path}: its tensors need more memory than is available") from error
    raise CheckpointError(
        f"{path}: unknown weight file type {suffix!r} (expected .safetensors, .pth, .bin or .npz)"
    )


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes, metadata) of a .safetensors file from its header alone: no tensor is read.

    The safetensors reader checks that the header's offsets lie within the file, so the shapes are
    ones the file can hold."""
    path = Path(path)
    if check_regular_file(path) == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            return shapes, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error


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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {error}"
        ) from error


def _check_zip_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    """What a zip's directory claims fits the file: stored members hold their bytes, the total is
    bounded. Decompression stops at a member's claimed size, so this bounds the memory it takes."""
    total = 0
    for member in archive.infolist():
        if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} uses compression method {member.compress_type}; "
                ".npz and PyTorch files are stored or deflated"
            )
        if member.compress_type == zipfile.ZIP_STORED and member.compress_size != member.file_size:
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} claims {member.file_size} bytes but stores "
                f"{member.compress_size}"
            )
        if member.file_size > MAX_DEFLATE_RATIO * member.compress_size + 64:
            raise CheckpointError(
                f"{path}: zip member {member.filename!r} claims {member.file_size} bytes from "
                f"{member.compress_size} deflated, more than deflate can expand"
            )
        total += member.file_size
    if total > MAX_WEIGHT_BYTES:
        raise CheckpointError(
            f"{path}: the zip directory claims {total} bytes uncompressed, more than {MAX_WEIGHT_BYTES}"
        )


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                _check_zip_sizes(path, archive)
        except zipfile.BadZipFile as error:
            raise CheckpointError(
                f"{path}: not a readable PyTorch file (truncated or corrupt?): {error}"
            ) from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors, which could run code "
            f"({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch file (truncated or corrupt?): {error}"
        ) from error
    # Training checkpoints nest the weights under a key; these are the usual ones.
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            log.info("%s: reading the weights under key %r", path, key)
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def _check_npz(path: Path) -> None:
    """Every member of an .npz is a .npy array whose header's shape and dtype fit the member's size
    in the zip directory; only the headers are decompressed. A lying header (10**12 floats in a few
    bytes) would otherwise be allocated before numpy finds the data missing."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise CheckpointError(f"{path}: is a single .npy array, not an .npz archive of named arrays")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable .npz file (not a zip archive; truncated or corrupt?)")
    with zipfile.ZipFile(path) as archive:
        _check_zip_sizes(path, archive)
        for member in archive.infolist():
            name = member.filename
            if not name.endswith(".npy"):
                raise CheckpointError(f"{path}: member {name!r} is not a .npy array")
            with archive.open(member) as stream:
                try:
                    version = np.lib.format.read_magic(stream)
                    read_header_of = NPY_HEADER_READERS.get(version)
                    if read_header_of is None:
                        raise ValueError(f"unsupported .npy format version {version}")
                    shape, _, dtype = read_header_of(stream, max_header_size=NPY_MAX_HEADER_BYTES)
                except ValueError as error:
                    raise CheckpointError(
                        f"{path}: member {name!r}: unreadable .npy header: {error}"
                    ) from error
                if dtype.hasobject:
                    raise CheckpointError(
                        f"{path}: refused: the .npz holds object arrays, which need pickle (member {name!r})"
                    )
                claimed = math.prod(shape) * dtype.itemsize
                present = member.file_size - stream.tell()
            if claimed != present:
                raise CheckpointError(
                    f"{path}: member {name!r}: its header claims shape {shape} of {dtype} ({claimed} bytes) "
                    f"but the member holds {present} bytes"
                )


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        _check_npz(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or corrupt?): {error}") from error
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.ascontiguousarray(archive[key])) for key in archive.files}
    except ValueError as error:
        raise CheckpointError(
            f"{path}: refused: the .npz holds object arrays, which need pickle ({error})"
        ) from error
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or corrupt?): {error}") from error


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
    if delta is not None:
        from .delta import load_delta  # delta.py imports this module

        if overrides:
            raise TypeError(
                f"load(delta=...) takes its config from the delta; got overrides {sorted(overrides)}"
            )
        return load_delta(load(path, strict=strict), delta)
    path = Path(path)
    if layout not in (None, "vitkit") or (layout is None and not is_native(path)):
        from .convert import load_converted  # convert imports this module

        return load_converted(path, layout=layout, strict=strict, **overrides)
    weights_path = path / WEIGHTS_NAME if path.is_dir() else path
    source = read_config(path)
    shapes, _ = read_header(weights_path)
    check_header_shapes(source, shapes, str(weights_path), strict=strict)
    state, _ = read_weights(weights_path)
    model = VisionTransformer(source.replace(**overrides))
    load_state(model, state, source_config=source, strict=strict, origin=str(weights_path))
    return model


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
