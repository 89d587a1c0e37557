"""Decode a data set once into one uint8 tensor (N, 3, H, W), kept in memory and optionally in a file.

Small images are cheaper to train on than to decode: on 2 CPU cores a 32x32 CIFAR JPEG takes about
0.15 ms to decode, as long as a tiny ViT's whole training step spends on it. `CachedImages` decodes
every image once (on a thread pool: Pillow releases the GIL) and serves slices of one tensor, and
`cache_dir` keeps the decoded array as a .npy file named by a fingerprint of the file list (paths,
labels, sizes, modification times), so a second run loads 150 MB instead of decoding 60,000 files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..files import atomic_write
from .datasets import ImageFolder

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
    does not match the data set is refused by name rather than used.
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
        self.bad_files: list[tuple[str, str]] = getattr(dataset, "bad_files", [])
        key = fingerprint(dataset) if cache_dir else None
        cache_file = Path(cache_dir) / f"{name}-{key}.npy" if key else None
        if cache_file is not None and cache_file.is_file():
            images = torch.from_numpy(np.load(cache_file, allow_pickle=False))
            if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(dataset):
                raise ValueError(
                    f"cache file {cache_file}: {images.dtype} {tuple(images.shape)} does not hold the "
                    f"{len(dataset)} uint8 (N, 3, H, W) images of {getattr(dataset, 'root', name)}; delete it"
                )
            logger.info("cache: loaded %s %s", cache_file, tuple(images.shape))
            self.images = images
        else:
            self.images = decode_all(dataset, name, num_threads)
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache_file, lambda tmp: _save_array(tmp, self.images.numpy()))
                logger.info("cache: wrote %s", cache_file)
        self.targets: list[int] = [int(label) for label in dataset.targets]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def _save_array(path: str, array: np.ndarray) -> None:
    # A file object, not the name: np.save would append ".npy" to the temporary name.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def decode_all(dataset: Dataset, name: str = "images", num_threads: int | None = None) -> torch.Tensor:
    """Every image of `dataset` stacked as uint8 (N, 3, H, W), decoded on `num_threads` threads."""
    first, _ = dataset[0]
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)

    def decode(index: int) -> None:
        image, _ = dataset[index]
        if image.shape != first.shape:
            where = dataset.samples[index][0] if isinstance(dataset, ImageFolder) else f"{name}[{index}]"
            raise ValueError(
                f"cache: {where} has shape {tuple(image.shape)}, the first image {tuple(first.shape)}; "
                "a cache needs images of one size"
            )
        images[index] = image

    started = time.perf_counter()
    with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
        for _ in tqdm(pool.map(decode, range(len(dataset))), total=len(dataset), desc=f"decoding {name}"):
            pass
    logger.info("cache: decoded %d images of %s in %.1f s", len(dataset), name, time.perf_counter() - started)
    return images
