"""Decode a data set once into one uint8 tensor (N, 3, H, W), kept in memory and optionally in a file.

Small images are cheaper to train on than to decode: on 2 CPU cores a 32x32 CIFAR JPEG takes about
0.15 ms to decode, as long as a tiny ViT's whole training step spends on it. `CachedImages` decodes
every image once (on a thread pool: Pillow releases the GIL) and serves slices of one tensor, and
`cache_dir` keeps the decoded array as a .npy file named by a fingerprint of the file list (paths,
labels, sizes, modification times), so a second run loads 150 MB instead of decoding 60,000 files.
A file that fails to decode is left out of the array (never replaced by another image) and listed in
`bad_files`, and beside the cache file in `<name>-<fingerprint>.unreadable.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..files import atomic_write, read_json
from .datasets import ImageFolder, Unreadable

logger = logging.getLogger(__name__)


def fingerprint(dataset: Dataset) -> str | None:
    """A short hash of what an ImageFolder would decode (None for data sets without files)."""
    if not isinstance(dataset, ImageFolder):
        return None
    digest = hashlib.sha256(str(dataset.root.resolve()).encode())
    for path, label in dataset.samples:
        stat = os.stat(path)
        digest.update(
            f"{os.path.relpath(path, dataset.root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:16]


class CachedImages(Dataset):
    """`dataset` decoded once: `images` uint8 (N, 3, H, W), `targets`, and its `classes`.

    All images must share one size (an error names the first file that differs). With `cache_dir`,
    the array is read from (or written to) `cache_dir/<name>-<fingerprint>.npy`; a file whose shape
    does not match the data set is refused by name rather than used. Unreadable files are left out
    and listed in `bad_files`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        cache_dir: str | os.PathLike = "",
        name: str = "images",
        num_threads: int | None = None,
    ) -> None:
        self.classes: list[str] = list(dataset.classes)
        self.class_to_idx: dict[str, int] = dict(dataset.class_to_idx)
        self.bad_files: list[tuple[str, str]] = list(getattr(dataset, "bad_files", []))
        key = fingerprint(dataset) if cache_dir else None
        cache_file = Path(cache_dir) / f"{name}-{key}.npy" if key else None
        if cache_file is not None and cache_file.is_file():
            self.images, unreadable = _load_cache(cache_file, dataset)
        else:
            self.images, unreadable = decode_all(dataset, name, num_threads)
            if cache_file is not None:
                _write_cache(cache_file, self.images, unreadable)
        skipped = {sample.path for sample in unreadable}
        known = {path for path, _ in self.bad_files}
        self.bad_files += [(sample.path, sample.reason) for sample in unreadable if sample.path not in known]
        paths = [path for path, _ in dataset.samples] if skipped else [""] * len(dataset)
        self.targets: list[int] = [
            int(label) for path, label in zip(paths, dataset.targets, strict=True) if path not in skipped
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def _unreadable_file(cache_file: Path) -> Path:
    return cache_file.with_suffix(".unreadable.json")


def _load_cache(cache_file: Path, dataset: Dataset) -> tuple[torch.Tensor, list[Unreadable]]:
    listed = _unreadable_file(cache_file)
    entries = read_json(listed, error=ValueError).get("unreadable", []) if listed.is_file() else []
    unreadable = [Unreadable(str(path), str(reason)) for path, reason in entries]
    images = torch.from_numpy(np.load(cache_file, allow_pickle=False))
    expected = len(dataset) - len(unreadable)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != expected:
        raise ValueError(
            f"cache file {cache_file}: {images.dtype} {tuple(images.shape)} does not hold the "
            f"{expected} uint8 (N, 3, H, W) images of {getattr(dataset, 'root', cache_file.stem)}; delete it"
        )
    logger.info("cache: loaded %s %s", cache_file, tuple(images.shape))
    return images, unreadable


def _write_cache(cache_file: Path, images: torch.Tensor, unreadable: list[Unreadable]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    if unreadable:  # the list first: an array without it would claim the wrong number of images
        text = json.dumps({"unreadable": [[sample.path, sample.reason] for sample in unreadable]})
        atomic_write(_unreadable_file(cache_file), lambda tmp: Path(tmp).write_text(text))
    atomic_write(cache_file, lambda tmp: _save_array(tmp, images.numpy()))
    logger.info("cache: wrote %s", cache_file)


def _save_array(path: str, array: np.ndarray) -> None:
    # A file object, not the name: np.save would append ".npy" to the temporary name.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def decode_all(
    dataset: Dataset, name: str = "images", num_threads: int | None = None
) -> tuple[torch.Tensor, list[Unreadable]]:
    """Every readable image of `dataset` stacked as uint8 (N, 3, H, W), decoded on `num_threads`
    threads, and the samples left out as unreadable (in data set order)."""
    first = next(
        (
            sample
            for sample in map(dataset.__getitem__, range(len(dataset)))
            if not isinstance(sample, Unreadable)
        ),
        None,
    )
    if first is None:
        raise ValueError(f"cache: no readable image in {getattr(dataset, 'root', name)}")
    shape = first[0].shape
    images = torch.empty((len(dataset), *shape), dtype=torch.uint8)
    unreadable: dict[int, Unreadable] = {}

    def decode(index: int) -> None:
        sample = dataset[index]
        if isinstance(sample, Unreadable):
            unreadable[index] = sample
            return
        image, _ = sample
        if image.shape != shape:
            where = dataset.samples[index][0] if isinstance(dataset, ImageFolder) else f"{name}[{index}]"
            raise ValueError(
                f"cache: {where} has shape {tuple(image.shape)}, the first image {tuple(shape)}; "
                "a cache needs images of one size"
            )
        images[index] = image

    started = time.perf_counter()
    with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
        for _ in tqdm(pool.map(decode, range(len(dataset))), total=len(dataset), desc=f"decoding {name}"):
            pass
    logger.info("cache: decoded %d images of %s in %.1f s", len(dataset), name, time.perf_counter() - started)
    if unreadable:
        keep = torch.tensor([index for index in range(len(dataset)) if index not in unreadable])
        images = images[keep]
    return images, [unreadable[index] for index in sorted(unreadable)]
