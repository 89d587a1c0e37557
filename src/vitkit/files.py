"""Safe reading and atomic writing of weight files, knowing nothing of checkpoint layouts.

- `read_weights(path)`: (flat tensors, metadata) of a .safetensors, .pth/.pt/.bin/.ckpt or .npz file.
- `read_header(path)`: (tensor shapes, metadata) of a .safetensors file without reading a tensor.
- `read_json(path)`: a bounded JSON object; `atomic_write(path, write)`: a file replaced whole or not at all.

Reading never unpickles arbitrary objects: .pth/.bin go through `torch.load(weights_only=True)` and
.npz through `numpy.load(allow_pickle=False)`. Writing is atomic (temporary file, fsync, rename), so
an interrupted save leaves the previous file intact.

Reading treats every file as untrusted and bounds the work it can cause: only regular files are
opened (a FIFO would block forever), JSON files are read up to `MAX_JSON_BYTES`, and what an
archive's headers claim (.npz array shapes, zip member sizes) is checked against the bytes present
before anything is allocated. Every refusal is a `CheckpointError` (a ValueError) whose one-line
message names the file and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

log = logging.getLogger(__name__)


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


# Writing ---------------------------------------------------------------------------------------------
# How safetensors' Rust writer reports an OS error under its own exception type.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_error(error: Exception, path: Path) -> Exception:
    """A writer's failure of the OS as an OSError naming `path` (the file meant, not the temporary
    one) and its errno: safetensors reports a full disk as `SafetensorError: ... No space left on
    device (os error 28)`, and Python's own writes name no file. Other errors are returned as they are."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), str(path))
    match = _RUST_OS_ERROR.search(str(error))
    if match is None:
        return error
    return OSError(int(match[1]), os.strerror(int(match[1])), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Any failure (a full disk, a file-size limit, the writer's own error) leaves `path` as it was,
    removes the temporary file and raises an OSError naming `path` with the OS's errno."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _write_and_sync(tmp, path, write)
    except (OSError, SafetensorError) as error:
        converted = write_error(error, path)
        if converted is error:
            raise
        raise converted from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_and_sync(tmp: str, path: Path, write: Callable[[str], None]) -> None:
    write(tmp)
    # mkstemp creates the file as 0600; give it the mode a plain open() would (0666 less umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    with open(path, "rb") as handle:  # one open: the zip check and torch.load read the same handle
        if zipfile.is_zipfile(handle):
            try:
                with zipfile.ZipFile(handle) as archive:
                    _check_zip_sizes(path, archive)
            except zipfile.BadZipFile as error:
                raise CheckpointError(
                    f"{path}: not a readable PyTorch file (truncated or corrupt?): {error}"
                ) from error
        handle.seek(0)
        try:
            obj = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors, which could run "
                f"code ({str(error).splitlines()[0]})"
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


def _check_npz(path: Path, handle: BinaryIO) -> None:
    """Every member of an .npz is a .npy array whose header's shape and dtype fit the member's size
    in the zip directory; only the headers are decompressed. A lying header (10**12 floats in a few
    bytes) would otherwise be allocated before numpy finds the data missing."""
    magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise CheckpointError(f"{path}: is a single .npy array, not an .npz archive of named arrays")
    if not zipfile.is_zipfile(handle):
        raise CheckpointError(f"{path}: not a readable .npz file (not a zip archive; truncated or corrupt?)")
    with zipfile.ZipFile(handle) as archive:
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
    with open(path, "rb") as handle:  # one open: the checks and numpy read the same handle
        try:
            _check_npz(path, handle)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise CheckpointError(
                f"{path}: not a readable .npz file (truncated or corrupt?): {error}"
            ) from error
        handle.seek(0)
        try:
            with np.load(handle, allow_pickle=False) as archive:
                return {key: torch.from_numpy(np.ascontiguousarray(archive[key])) for key in archive.files}
        except ValueError as error:
            raise CheckpointError(
                f"{path}: refused: the .npz holds object arrays, which need pickle ({error})"
            ) from error
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise CheckpointError(
                f"{path}: not a readable .npz file (truncated or corrupt?): {error}"
            ) from error
