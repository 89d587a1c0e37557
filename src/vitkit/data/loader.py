"""build_loader(cfg, split): batches for one split on one rank. The only file that knows samplers,
workers and ranks.

Randomness is a function of (seed, epoch, position), never of process timing: the sampler's shuffle
comes from (seed, epoch), and each sample's augmentation from a generator seeded by (seed, epoch,
its position in the epoch's global order). So every worker and rank augments differently, the same
seed gives the same batches whatever `num_workers` is, and a run resumed mid-epoch with
`set_start` sees the remaining samples, augmented exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from vitkit.data.cache import CachedImages

# DataConfig and the data root live in config.py; the loader re-exports them, where callers found them.
from vitkit.data.config import DATA_ENV, DataConfig, data_root, resolve_root
from vitkit.data.datasets import (
    ImageFolder,
    ShardDataset,
    Synthetic,
    Transform,
    Unreadable,
    seeded_generator,
    stratified_split,
)
from vitkit.data.digits import Digits
from vitkit.data.mixup import Mixup
from vitkit.data.transforms import build_transforms, pad_crop_flip_batch

__all__ = [
    "DATA_ENV",
    "AugmentedBatches",
    "DataConfig",
    "Loader",
    "ResumableSampler",
    "SeededTransform",
    "build_loader",
    "data_root",
    "open_dataset",
    "resolve_root",
]


# Sampling ---------------------------------------------------------------------------------------


class ResumableSampler(Sampler[tuple[int, int, int]]):
    """This rank's share of an epoch, as (dataset index, epoch, global position) keys.

    The global order is a permutation seeded by (seed, epoch) (or 0..n-1 without shuffle), each
    index repeated `num_repeats` times in a row (DeiT's RASampler: the copies land on different
    ranks), wrapped around to a multiple of world_size when `pad` (DistributedSampler's padding, so
    ranks take equal steps), and dealt to ranks round-robin. With repeats, each rank keeps
    ceil(n / world_size) samples so an epoch has the same length as without. Without `pad` (eval)
    every sample is seen once and ranks may differ by one. `set_start(i)` skips this rank's first
    i samples of the current epoch; `set_epoch` starts the next one from 0.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_repeats: int = 1,
        pad: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if num_repeats > 1 and not pad:
            raise ValueError("repeated augmentation needs padded (train) sampling")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_repeats = num_repeats
        self.pad = pad
        self.epoch = 0
        self.start_index = 0

    @property
    def epoch_length(self) -> int:
        """Samples this rank sees in a full epoch."""
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_index = 0

    def set_start(self, index: int) -> None:
        if not 0 <= index <= self.epoch_length:
            raise ValueError(f"start index {index} outside this rank's epoch of {self.epoch_length}")
        self.start_index = index

    def global_order(self) -> torch.Tensor:
        """Dataset indices in the epoch's global order, repeated and padded."""
        if self.shuffle:
            order = torch.randperm(
                self.num_samples, generator=seeded_generator("sampler", self.seed, self.epoch)
            )
        else:
            order = torch.arange(self.num_samples)
        order = order.repeat_interleave(self.num_repeats)
        if self.pad:
            total = math.ceil(len(order) / self.world_size) * self.world_size
            order = order.repeat(math.ceil(total / len(order)))[:total]
        return order

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.global_order().tolist()
        positions = range(self.rank, len(order), self.world_size)[: self.epoch_length]
        for position in positions[self.start_index :]:
            yield order[position], self.epoch, position

    def __len__(self) -> int:
        return self.epoch_length - self.start_index


class SeededTransform(Dataset):
    """`dataset` read by `ResumableSampler` keys; each sample transformed with a generator seeded
    by (seed, epoch, position), so its augmentation depends on nothing else."""

    def __init__(self, dataset: Dataset, transform: Transform, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int] | Unreadable:
        index, epoch, position = key
        sample = self.dataset[index]
        if isinstance(sample, Unreadable):
            return sample
        image, label = sample
        return self.transform(image, seeded_generator("sample", self.seed, epoch, position)), label

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class AugmentedBatches:
    """Train batches cut from an in-memory uint8 cache and augmented whole in this process.

    The sampler's keys are taken in chunks of batch_size; each chunk's images are gathered by index,
    pad-cropped, flipped and normalised at once, drawing from a generator seeded by (seed, epoch,
    position of the chunk's first sample). Batches so depend on neither timing nor workers, and a run
    resumed at a batch boundary sees the batches of the uninterrupted run.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, cfg: DataConfig) -> None:
        self.indices = None
        if isinstance(dataset, Subset):
            dataset, self.indices = dataset.dataset, torch.as_tensor(dataset.indices)
        if not isinstance(dataset, CachedImages):
            raise TypeError(f"batch augmentation reads a CachedImages, got {type(dataset).__name__}")
        self.images = dataset.images  # (N, 3, H, W) uint8
        self.targets = torch.as_tensor(dataset.targets)
        self.sampler = sampler
        self.cfg = cfg
        # Normalize's (pixel / 255 - mean) / std as one multiply-add over the batch.
        std = torch.tensor(cfg.std)[:, None, None]
        self.scale, self.shift = 1 / (255 * std), -torch.tensor(cfg.mean)[:, None, None] / std

    def __len__(self) -> int:
        if self.cfg.drop_last:
            return len(self.sampler) // self.cfg.batch_size
        return math.ceil(len(self.sampler) / self.cfg.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], list[Unreadable]]]:
        """((images, targets), []): the shape of the DataLoader's batches (`collate_readable`)."""
        cfg = self.cfg
        keys = list(self.sampler)
        for start in range(0, len(keys), cfg.batch_size):
            chunk = keys[start : start + cfg.batch_size]
            if len(chunk) < cfg.batch_size and cfg.drop_last:
                return
            index = torch.tensor([key[0] for key in chunk])
            if self.indices is not None:
                index = self.indices[index]
            _, epoch, position = chunk[0]
            generator = seeded_generator("batch", cfg.seed, epoch, position)
            images = pad_crop_flip_batch(
                self.images[index], cfg.img_size, cfg.crop_padding, cfg.hflip, generator
            )
            yield (torch.addcmul(self.shift, images.float(), self.scale), self.targets[index]), []


# The loader -------------------------------------------------------------------------------------


class Loader:
    """Batches of one split on one rank: iterate for (images float (B, 3, S, S), targets).

    Train targets are soft (B, num_classes) when mixup, cutmix or label smoothing is on, else
    labels long (B,), as for eval; `F.cross_entropy` takes both. `len()` is the number of batches
    left in the epoch. Call `set_epoch(e)` before each epoch, then `set_start(i)` to resume it
    after this rank's first i samples (for shards, a multiple of batch_size).

    `augment` (default: whether split is "train") turns on the training pipeline: train transforms,
    shuffling, padding to equal shares, drop_last, repeated augmentation and mixup. Without it every
    image of the split is seen once, in order, with the evaluation transform.

    A file that cannot be read (with `on_bad="skip"`) is dropped from its batch, never replaced by
    another sample, and listed in `unreadable` (path, reason), with those the data set refused when
    it was listed or checked; a batch of unreadable files only is not yielded.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        augment: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.split = split
        self.train = split == "train" if augment is None else augment
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0
        self._unreadable: dict[str, str] = {}
        self.sampler: ResumableSampler | None = None
        if cfg.dataset == "shards":
            self.dataset: Any = open_shards(cfg, split, self.train, rank, world_size)
            self.loader: Any = stream_loader(self.dataset, cfg, self.train, rank, pin_memory)
        else:
            self.dataset = open_dataset(cfg, split)
            self.sampler = ResumableSampler(
                len(self.dataset),
                shuffle=self.train,
                seed=cfg.seed,
                rank=rank,
                world_size=world_size,
                num_repeats=cfg.repeated_aug if self.train else 1,
                pad=self.train,
            )
            self.loader = map_loader(self.dataset, self.sampler, cfg, self.train, rank, pin_memory)
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        self.classes: list[str] = list(base.classes)
        self.class_to_idx: dict[str, int] = dict(base.class_to_idx)
        self.num_classes = len(self.classes)
        self.mixup = build_mixup(cfg, self.num_classes) if self.train else None
        if self.train and len(self) == 0:
            self._refuse_empty_epoch()

    def _refuse_empty_epoch(self) -> None:
        """A training epoch of no batch would never step: say which sizes make it so."""
        if self.sampler is not None:
            num_samples = self.sampler.epoch_length
        else:
            num_samples = sum(self.dataset.slot_sizes(self.cfg.num_workers))
        ranks = f" on each of {self.world_size} ranks" if self.world_size > 1 else ""
        raise ValueError(
            f"split {self.split!r} has {num_samples} images{ranks}, fewer than data.batch_size "
            f"{self.cfg.batch_size}: with data.drop_last an epoch has no batch; lower data.batch_size "
            "or set data.drop_last=false"
        )

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """(path, reason) of each file of the split skipped as unreadable so far, each once."""
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        found = dict(getattr(base, "bad_files", []))
        found.update(self._unreadable)
        return sorted(found.items())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_index = 0
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.dataset.set_epoch(epoch)

    def set_start(self, index: int) -> None:
        if self.sampler is not None:
            self.sampler.set_start(index)
        elif index % self.cfg.batch_size:
            raise ValueError(
                f"a shard stream resumes at a multiple of batch_size {self.cfg.batch_size}, not {index}"
            )
        self.start_index = index

    def _stream_batches(self) -> int:
        """Batches of this rank's shard stream in the epoch: on train, the fewest of any rank, so
        that all ranks take the same number of steps."""
        num_workers = max(self.cfg.num_workers, 1)
        batch_size = self.cfg.batch_size
        per_slot = self.dataset.slot_sizes(self.cfg.num_workers)

        def rank_batches(rank: int) -> int:
            sizes = per_slot[rank * num_workers : (rank + 1) * num_workers]
            if self.loader.drop_last:
                return sum(size // batch_size for size in sizes)
            return sum(math.ceil(size / batch_size) for size in sizes)

        if self.train:
            return min(rank_batches(rank) for rank in range(self.world_size))
        return rank_batches(self.rank)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.loader)
        return self._stream_batches() - self.start_index // self.cfg.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first_batch = self.start_index // self.cfg.batch_size
        batches: Iterator = iter(self.loader)
        if self.sampler is None:
            # A stream cannot seek: replay it (it is deterministic) up to the resume point.
            batches = itertools.islice(batches, first_batch, self._stream_batches())
        for step, (batch, unreadable) in enumerate(batches, start=first_batch):
            for sample in unreadable:
                self._unreadable.setdefault(sample.path, sample.reason)
            if batch is None:
                continue
            images, labels = batch
            if self.mixup is not None:
                generator = seeded_generator("mixup", self.cfg.seed, self.epoch, self.rank, step)
                images, labels = self.mixup(images, labels, generator)
            yield images, labels


def collate_readable(samples: list) -> tuple[Any, list[Unreadable]]:
    """(the batch of the readable samples, or None if there is none; the unreadable ones)."""
    unreadable = [sample for sample in samples if isinstance(sample, Unreadable)]
    readable = [sample for sample in samples if not isinstance(sample, Unreadable)]
    return (default_collate(readable) if readable else None), unreadable


def build_mixup(cfg: DataConfig, num_classes: int) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0 and cfg.label_smoothing <= 0:
        return None
    return Mixup(
        num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
    )


def open_shards(cfg: DataConfig, split: str, train: bool, rank: int, world_size: int) -> ShardDataset:
    if cfg.repeated_aug > 1 or cfg.val_fraction > 0:
        raise ValueError("dataset 'shards' supports neither repeated_aug > 1 nor val_fraction")
    return ShardDataset(
        Path(cfg.root) / split,
        transform=build_transforms(cfg, train),
        rank=rank,
        world_size=world_size,
        shuffle=train,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        on_bad=cfg.on_bad,
    )


def stream_loader(
    dataset: ShardDataset, cfg: DataConfig, train: bool, rank: int, pin_memory: bool
) -> DataLoader:
    # Not persistent: workers must copy the dataset again at each epoch to see its number.
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        drop_last=train and cfg.drop_last,
        pin_memory=pin_memory,
        collate_fn=collate_readable,
        # Torch seeds each worker from this generator: any global-RNG use in a worker is reproducible.
        generator=seeded_generator("workers", cfg.seed, rank),
    )


def map_loader(
    dataset: Dataset, sampler: ResumableSampler, cfg: DataConfig, train: bool, rank: int, pin_memory: bool
) -> Any:
    """The batches of a map-style data set: augmented whole from a cache, or a DataLoader."""
    if train and cfg.batch_augment:
        return AugmentedBatches(dataset, sampler, cfg)
    return DataLoader(
        SeededTransform(dataset, build_transforms(cfg, train), cfg.seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=train and cfg.drop_last,
        pin_memory=pin_memory,
        persistent_workers=cfg.num_workers > 0,
        collate_fn=collate_readable,
        generator=seeded_generator("workers", cfg.seed, rank),
    )


def open_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The untransformed map-style data set of `split`; "val" with val_fraction > 0 is held out of "train"."""
    if cfg.val_fraction > 0 and split in ("train", "val"):
        full = open_dataset(cfg.replace(val_fraction=0.0), "train")
        kept, held_out = stratified_split(full.targets, cfg.val_fraction, cfg.seed)
        return Subset(full, kept if split == "train" else held_out)
    dataset = _open_files(cfg, split)
    if cfg.cache:
        return CachedImages(dataset, cache_dir=cfg.cache_dir, name=split)
    return dataset


def _open_files(cfg: DataConfig, split: str) -> Dataset:
    if cfg.dataset == "digits":
        return Digits(split)  # type: ignore[arg-type]
    if cfg.dataset == "synthetic":
        return Synthetic(
            cfg.synthetic_size,
            num_classes=cfg.synthetic_classes,
            img_size=cfg.img_size,
            split=split,
            seed=cfg.seed,
        )
    return ImageFolder(Path(cfg.root) / split, on_bad=cfg.on_bad, verify=cfg.verify)


def build_loader(
    cfg: DataConfig,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_index: int = 0,
    pin_memory: bool = False,
    augment: bool | None = None,
) -> Loader:
    """The loader of `split` for one rank, placed at `epoch`, after this rank's first `start_index`
    samples of it. With `augment` (default: split == "train") it has train transforms, shuffling
    and mixup; without, the evaluation transform over every image in order."""
    loader = Loader(cfg, split, rank=rank, world_size=world_size, pin_memory=pin_memory, augment=augment)
    loader.set_epoch(epoch)
    loader.set_start(start_index)
    return loader
