"""Data sets that yield `(image, label)`: image a uint8 RGB tensor (3, H, W), label an int.

- `ImageFolder`: one folder per class (sorted names give the class indices), JPEG/PNG/WebP/BMP only.
- `Synthetic`: seeded random images with a learnable label, for tests and benchmarks.
- `write_shards` / `ShardDataset`: webdataset tar shards, streamed split by rank and DataLoader worker.

Hostile files (corrupt, truncated, empty, not an image, decompression bombs, FIFOs and other special
files) raise `BadImageError` naming the file; data sets built with `on_bad="skip"` log and record them
in `bad_files` instead, and a file found unreadable when loaded is returned as an `Unreadable` in place
of its sample, which the loader drops and counts (never another image in its place). Only regular files are opened, and a folder tree is listed following each real
folder once, so symlink loops cannot multiply or endlessly repeat the listing.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import stat
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..files import read_json

logger = logging.getLogger(__name__)

OnBad = Literal["skip", "error"]
Verify = Literal["none", "header", "full"]
Transform = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]

# Pillow only tries these decoders, so a file cannot reach a rarely used (and rarely fuzzed) one.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What Pillow raises for malformed input (its own fuzz tests accept exactly these), plus the
# decompression-bomb guard: above Image.MAX_IMAGE_PIXELS it warns, above twice that it raises.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_PIXEL_LIMIT_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
SHARD_INFO = "dataset.json"


class BadImageError(ValueError):
    """A file that is not a decodable JPEG/PNG/WebP/BMP image: `path` names it, `reason` says why.

    A ValueError, so that the CLI reports it in one line as it does any bad input."""

    def __init__(self, path: str, reason: str = "") -> None:
        if not reason and "\n" in path:
            path, reason = _from_worker_traceback(path)
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"bad image {self.path}: {self.reason}" if self.reason else self.path


@dataclass(frozen=True)
class Unreadable:
    """What a data set in skip mode returns in place of `(image, label)` for a file that fails to
    decode: the loader drops it from its batch and lists it in `Loader.unreadable`."""

    path: str
    reason: str


def _from_worker_traceback(text: str) -> tuple[str, str]:
    """(path, reason) from what a DataLoader worker re-raises: torch rebuilds the exception as
    `BadImageError(formatted traceback)`, whose last line is "...BadImageError: bad image PATH: REASON".
    Recovering them keeps the error one line naming the file, whatever `num_workers` is."""
    last = text.strip().splitlines()[-1].partition("BadImageError: ")[2]
    if last.startswith("bad image "):
        path, _, reason = last.removeprefix("bad image ").partition(": ")
        return path, reason
    return last or text, ""


def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed for the random stream named `tag` at `parts` (e.g. run seed, epoch, position).

    SeedSequence hashes its input, so neighbouring parts (positions 7 and 8) give unrelated streams.
    """
    entropy = [zlib.crc32(tag.encode()), *parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def seeded_generator(tag: str, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(tag, *parts))


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held_out): `fraction` of each class held out, chosen by `seed`, both sorted."""
    targets = torch.as_tensor(targets)
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in torch.unique(targets).tolist():
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held_out += members[: round(fraction * len(members))].tolist()
    held = set(held_out)
    return [i for i in range(len(targets)) if i not in held], sorted(held_out)


# Decoding ---------------------------------------------------------------------------------------


def decode_image(source: bytes | str | os.PathLike, name: str | None = None) -> torch.Tensor:
    """Decode a JPEG/PNG/WebP/BMP file (path or bytes) to a uint8 RGB tensor (3, H, W).

    Grayscale, palette, CMYK, RGBA and 16-bit images become 8-bit RGB. Raises `BadImageError`
    with `name` (default: the path) for anything else, including images over Pillow's pixel limit.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source, name)
    try:
        with stream, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream, formats=IMAGE_FORMATS) as image:
                pixels = _rgb_array(image)
    except _DECODE_ERRORS as error:
        raise BadImageError(name, _decode_error_reason(error)) from error
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class ImageTooLargeError(BadImageError):
    """An image over a pixel limit: Pillow's decompression-bomb guard, or the caller's `max_pixels`."""


def decode_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> torch.Tensor:
    """`decode_image` of received bytes (an upload), with the same checks, and images over
    `max_pixels` refused from their header before any pixel is decoded. Raises `ImageTooLargeError`
    for an image over the limit (the caller's or Pillow's), `BadImageError` for anything else."""
    if max_pixels is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                    width, height = image.size
        except _DECODE_ERRORS as error:
            kind = ImageTooLargeError if isinstance(error, _PIXEL_LIMIT_ERRORS) else BadImageError
            raise kind(name, _decode_error_reason(error)) from error
        if width * height > max_pixels:
            raise ImageTooLargeError(
                name, f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
    try:
        return decode_image(data, name)
    except BadImageError as error:
        if isinstance(error.__cause__, _PIXEL_LIMIT_ERRORS):
            raise ImageTooLargeError(name, error.reason) from error.__cause__
        raise


def _decode_error_reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        # Pillow's own message repeats the file object; the name is already in BadImageError.
        return f"UnidentifiedImageError: not a {'/'.join(IMAGE_FORMATS)} image"
    return f"{type(error).__name__}: {error}"


def special_file_reason(mode: int) -> str | None:
    """None for a regular file, else what it is: a FIFO blocks its reader, a device never ends."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return f"is {kind}, not a regular file"
    return "is a device or other special file, not a regular file"


def open_regular(path: str | os.PathLike, name: str | None = None) -> io.BufferedReader:
    """Open `path` for reading if it is a regular file, else raise BadImageError.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO neither blocks the
    open nor can replace the file between a check and the read."""
    name = str(path) if name is None else name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise BadImageError(name, f"cannot be opened: {error.strerror}") from error
    reason = special_file_reason(os.fstat(fd).st_mode)
    if reason is not None:
        os.close(fd)
        raise BadImageError(name, reason)
    return os.fdopen(fd, "rb")


def _rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8."""
    if image.mode.startswith("I"):
        # 16-bit grayscale ("I;16*", or "I" from older Pillow): Pillow's convert() would clip
        # every value above 255 to white, so keep the 8 most significant bits instead.
        gray = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"))


def check_image(path: str, verify: Verify) -> str | None:
    """None if `path` passes the check, else the reason it fails.

    "header": Pillow identifies the format and `verify()` walks the file structure (PNG chunk CRCs
    included, but not JPEG entropy data: a truncated JPEG passes). "full": decodes every pixel.
    """
    try:
        if verify == "full":
            decode_image(path)
        elif verify == "header":
            with open_regular(path) as stream, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(stream, formats=IMAGE_FORMATS) as image:
                    image.verify()
    except BadImageError as error:
        return error.reason
    except _DECODE_ERRORS as error:
        return _decode_error_reason(error)
    return None


# ImageFolder ------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """`root/<class>/**/<image>` with classes in sorted order (`classes`, `class_to_idx`).

    Files are listed by extension (hidden files such as macOS `._x.jpg` resource forks are ignored).
    `verify` checks every file when the set is built ("none" | "header" | "full", see `check_image`);
    failing files are refused (`on_bad="error"`) or dropped and listed in `bad_files`. A file that
    still fails to decode when loaded raises `BadImageError` in error mode; in skip mode it is logged,
    recorded, and returned as an `Unreadable` (the loader drops it: no other image takes its place).
    """

    def __init__(self, root: str | os.PathLike, *, on_bad: OnBad = "skip", verify: Verify = "none") -> None:
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad={on_bad!r}: expected 'skip' or 'error'")
        if verify not in ("none", "header", "full"):
            raise ValueError(f"verify={verify!r}: expected 'none', 'header' or 'full'")
        self.root = Path(root)
        self.on_bad = on_bad
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a directory")
        self.classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        # Each real folder is listed once: the root and the class folders first, so that a link back
        # to any of them (a symlink loop, or one class linking another) is not followed.
        visited = {folder_key(self.root), *(folder_key(self.root / name) for name in self.classes)}
        samples, special = [], []
        for name, index in self.class_to_idx.items():
            files, not_regular = list_image_files(self.root / name, visited)
            samples += [(path, index) for path in files]
            special += not_regular
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in samples})
        if not self.classes or empty:
            found = f" (only special files: {', '.join(path for path, _ in special[:3])})" if special else ""
            raise FileNotFoundError(
                f"ImageFolder {self.root}: no images for classes {empty or '(no folders)'}{found}"
            )
        # (path, reason) of every file found bad in this process (a DataLoader worker keeps its own).
        self.bad_files: list[tuple[str, str]] = []
        self._bad_paths: set[str] = set()
        failures = list(special)
        if verify != "none":
            with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding
                reasons = list(pool.map(lambda sample: check_image(sample[0], verify), samples))
            failures += [(path, reason) for (path, _), reason in zip(samples, reasons, strict=True) if reason]
        if failures:
            listing = ", ".join(path for path, _ in failures[:5]) + (", ..." if len(failures) > 5 else "")
            if on_bad == "error":
                path, reason = failures[0]
                raise BadImageError(path, f"{reason} ({len(failures)} bad file(s) in all: {listing})")
            logger.warning(
                "ImageFolder %s: skipped %d bad file(s) (listed in .bad_files with reasons): %s",
                self.root,
                len(failures),
                listing,
            )
            for path, reason in failures:
                self._record_bad(path, reason)
            samples = [sample for sample in samples if sample[0] not in self._bad_paths]
        left = {label for _, label in samples}
        emptied = [name for name, index in self.class_to_idx.items() if index not in left]
        if emptied:
            first = next(path for path, _ in failures if Path(path).is_relative_to(self.root / emptied[0]))
            raise BadImageError(
                str(self.root / emptied[0]),
                f"no valid image left in class folder(s) {emptied}: every file failed verification "
                f"(first: {first}: {dict(failures)[first]})",
            )
        self.samples: list[tuple[str, int]] = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        path, label = self.samples[index]
        try:
            return decode_image(path), label
        except BadImageError as error:
            if self.on_bad == "error":
                raise
            self._record_bad(path, error.reason)
            logger.warning("%s; skipped", error)
            return Unreadable(path, error.reason)

    def _record_bad(self, path: str, reason: str) -> None:
        if path in self._bad_paths:
            return
        self.bad_files.append((path, reason))
        self._bad_paths.add(path)


def folder_key(folder: str | os.PathLike) -> tuple[int, int]:
    """A real folder's identity, whatever path (symlink) leads to it."""
    info = os.stat(folder)
    return info.st_dev, info.st_ino


def list_image_files(folder: Path, visited: set[tuple[int, int]]) -> tuple[list[str], list[tuple[str, str]]]:
    """(regular image files, (path, reason) of special ones) under `folder`, by extension, in
    depth-first order of sorted names (files of a folder before those of its subfolders).

    Symlinked folders are followed unless their real folder is in `visited` (which grows), so
    `a/loop -> .` lists nothing twice. Only regular files are kept: a FIFO would block its reader.
    The walk keeps its own stack: `os.walk` recurses, and a tree 1,000 folders deep exceeds Python's
    recursion limit."""
    found, special = [], []
    stack = [str(folder)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            logger.warning("%s: cannot be listed (%s); skipped", directory, error.strerror)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
            try:
                info = entry.stat()  # follows symlinks
            except OSError as error:
                if is_image:
                    special.append((entry.path, f"cannot be read: {error.strerror}"))
                continue
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in visited:
                    logger.info(
                        "%s: already listed (a link to a folder seen before); not followed", entry.path
                    )
                    continue
                visited.add((info.st_dev, info.st_ino))
                subfolders.append(entry.path)
            elif is_image:
                reason = special_file_reason(info.st_mode)
                if reason is None:
                    found.append(entry.path)
                else:
                    special.append((entry.path, reason))
        stack.extend(reversed(subfolders))
    return found, special


class Synthetic(Dataset):
    """Random images with a learnable label: each class owns a fixed random 4x4 colour pattern
    (from `seed`, shared by all splits), and image `i` is its class's pattern, upsampled to
    `img_size`, blended half and half with noise drawn from (seed, split, i). Labels cycle 0..C-1.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        *,
        num_classes: int = 10,
        img_size: int = 32,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        self.num_samples = num_samples
        self.img_size = img_size
        self.classes = [str(label) for label in range(num_classes)]
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.targets = [i % num_classes for i in range(num_samples)]
        self.seed = seed
        self.split_tag = zlib.crc32(split.encode())
        patterns = torch.rand((num_classes, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
        self.patterns = torch.nn.functional.interpolate(patterns * 255, size=(img_size, img_size))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        generator = seeded_generator("synthetic", self.seed, self.split_tag, index)
        noise = torch.rand((3, self.img_size, self.img_size), generator=generator) * 255
        return (0.5 * self.patterns[label] + 0.5 * noise).round().to(torch.uint8), label


# Tar shards -------------------------------------------------------------------------------------


def write_shards(
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_count_per_shard: int = 1000,
    *,
    seed: int | None = 0,
    on_bad: OnBad = "skip",
    verify: Verify = "header",
) -> list[Path]:
    """Write an ImageFolder as webdataset tar shards plus `dataset.json` (classes and counts).

    Each sample keeps its encoded bytes (under its extension, e.g. "jpg") and its class index
    ("cls"). Samples are written in an order shuffled by `seed` (None: folder order) so that every
    shard holds a mix of classes, which a streaming reader's small shuffle buffer cannot provide.
    """
    folder = ImageFolder(image_folder, on_bad=on_bad, verify=verify)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(range(len(folder)))
    if seed is not None:
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    with wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=max_count_per_shard, verbose=0) as writer:
        for key, index in enumerate(order):
            path, label = folder.samples[index]
            extension = Path(path).suffix.lower().lstrip(".")
            writer.write({"__key__": f"{key:09d}", extension: Path(path).read_bytes(), "cls": label})
    num_shards = math.ceil(len(order) / max_count_per_shard)
    shards = [
        {
            "file": f"shard-{shard:06d}.tar",
            "num_samples": min(max_count_per_shard, len(order) - shard * max_count_per_shard),
        }
        for shard in range(num_shards)
    ]
    info = {"classes": folder.classes, "num_samples": len(order), "shards": shards}
    (out_dir / SHARD_INFO).write_text(json.dumps(info, indent=1))
    return [out_dir / shard["file"] for shard in shards]


class ShardDataset(IterableDataset):
    """Streams the shards written by `write_shards`, each sample once per epoch across all
    ranks and DataLoader workers.

    The epoch's shard order (shuffled by seed and epoch, the same on every rank) is dealt to the
    world_size * num_workers reading slots round-robin; each slot shuffles its samples in a buffer
    seeded by (seed, epoch, slot). `transform` gets a generator seeded by (seed, epoch, slot,
    position), so a stream is reproducible whatever the timing of the workers.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Transform | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        on_bad: OnBad = "skip",
    ) -> None:
        self.root = Path(root)
        info_path = self.root / SHARD_INFO
        if not info_path.exists():
            raise FileNotFoundError(
                f"ShardDataset: no {SHARD_INFO} in {self.root} (write it with write_shards)"
            )
        info = read_json(info_path, error=ValueError)
        try:
            self.classes: list[str] = list(info["classes"])
            self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
            self.shard_files = [str(self.root / Path(shard["file"]).name) for shard in info["shards"]]
            self.shard_sizes = [int(shard["num_samples"]) for shard in info["shards"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{info_path}: not a shard index (expected 'classes' and 'shards' of file and num_samples; "
                f"{type(error).__name__}: {error})"
            ) from error
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.on_bad = on_bad
        self.epoch = 0
        self.bad_files: list[tuple[str, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def slot_shards(self, num_workers: int) -> list[list[int]]:
        """Shard indices read by each slot (rank * num_workers + worker) in this epoch."""
        order = list(range(len(self.shard_files)))
        if self.shuffle:
            order = torch.randperm(
                len(order), generator=seeded_generator("shards", self.seed, self.epoch)
            ).tolist()
        num_slots = self.world_size * max(num_workers, 1)
        return [order[slot::num_slots] for slot in range(num_slots)]

    def slot_sizes(self, num_workers: int) -> list[int]:
        """Samples streamed by each slot in this epoch."""
        return [sum(self.shard_sizes[shard] for shard in shards) for shards in self.slot_shards(num_workers)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | Unreadable]:
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        slot = self.rank * num_workers + worker_id
        urls = [self.shard_files[shard] for shard in self.slot_shards(num_workers)[slot]]
        stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
        if self.shuffle:
            seed = derive_seed("shard-buffer", self.seed, self.epoch, slot)
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed))
        for position, sample in enumerate(wds.DataPipeline(*stages)):
            name = f"{sample['__url__']}:{sample['__key__']}"
            encoded = [value for key, value in sample.items() if f".{key}" in IMAGE_EXTENSIONS]
            try:
                if len(encoded) != 1:
                    raise BadImageError(name, f"expected one image entry, found keys {sorted(sample)}")
                image = decode_image(encoded[0], name=name)
            except BadImageError as error:
                if self.on_bad == "error":
                    raise
                self.bad_files.append((error.path, error.reason))
                logger.warning("%s; skipped", error)
                yield Unreadable(error.path, error.reason)  # keeps the positions of the stream
                continue
            if self.transform is not None:
                generator = seeded_generator("shard-sample", self.seed, self.epoch, slot, position)
                image = self.transform(image, generator)
            yield image, int(sample["cls"])
