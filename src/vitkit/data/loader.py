"""build_loader(cfg, split): batches for one split on one rank. The only file that knows samplers,
workers and ranks.

Randomness is a function of (seed, epoch, position), never of process timing: the sampler's shuffle
comes from (seed, epoch), and each sample's augmentation from a generator seeded by (seed, epoch,
its position in the epoch's global order). So every worker and rank augments differently, the same
seed gives the same batches whatever `num_workers` is, and a run resumed mid-epoch with
`set_start` sees the remaining samples, augmented exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from vitkit.data.cache import CachedImages
from vitkit.data.datasets import (
    Digits,
    ImageFolder,
    OnBad,
    ShardDataset,
    Synthetic,
    Transform,
    Verify,
    seeded_generator,
    stratified_split,
)
from vitkit.data.mixup import Mixup
from vitkit.data.transforms import (
    VIT_MEAN,
    VIT_STD,
    Interpolation,
    build_transforms,
    pad_crop_flip_batch,
)
from vitkit.models.config import MAX_IMG_SIZE, check_fields

DatasetName = Literal["digits", "imagefolder", "shards", "synthetic"]
AutoAugment = Literal["none", "randaugment", "3aug"]
EvalResize = Literal["crop", "squash"]
TrainCrop = Literal["inception", "pad"]


# Bounds on the integer fields, so that a data config read from a checkpoint's metadata cannot make
# vitkit allocate absurd images (img_size=100000 is 120 GB per image) or start endless workers.
DATA_INT_LIMITS: dict[str, tuple[int, int]] = {
    "img_size": (1, MAX_IMG_SIZE),
    "batch_size": (1, 1 << 16),
    "num_workers": (0, 256),
    "seed": (0, (1 << 63) - 1),
    "crop_padding": (0, MAX_IMG_SIZE),
    "randaugment_num_ops": (0, 64),
    "repeated_aug": (1, 64),
    "shuffle_buffer": (1, 1 << 24),
    "synthetic_size": (1, 1 << 30),
    "synthetic_classes": (1, 1 << 20),
}


@dataclass(frozen=True)
class DataConfig:
    """Everything the data pipeline needs. Train defaults are the ViT paper's: inception crop and
    flip, nothing else; DeiT adds randaugment, random_erasing=0.25, mixup=0.8, cutmix=1.0,
    label_smoothing=0.1, repeated_aug=3; DeiT III uses auto_augment="3aug", color_jitter=0.3."""

    # What to read. `root`: for "imagefolder", a folder with one ImageFolder per split
    # (root/train, root/test, ...); for "shards", one write_shards output per split.
    dataset: DatasetName = "digits"
    root: str = ""
    img_size: int = 32
    batch_size: int = 128
    num_workers: int = 2
    seed: int = 0
    # Split "val" is this fraction of each class of "train", held out (and removed from "train").
    val_fraction: float = 0.0
    # Decode every image once into one uint8 tensor in memory (images of one size), kept in
    # `cache_dir` as a .npy file when set, so later epochs and runs read no JPEG (see cache.py).
    cache: bool = False
    cache_dir: str = ""
    # Train augmentation. "inception": random-resized crop of `scale` and `ratio`; "pad": the classic
    # CIFAR crop, a random img_size window of the image zero-padded by `crop_padding` pixels.
    train_crop: TrainCrop = "inception"
    crop_padding: int = 4
    # Crop and flip whole uint8 batches in the loading process instead of each image in workers: on a
    # few CPU cores, per-image Python costs more than the arithmetic. Needs cache and train_crop "pad".
    batch_augment: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: AutoAugment = "none"
    randaugment_num_ops: int = 2
    randaugment_magnitude: float = 9.0
    randaugment_magnitude_std: float = 0.5
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    # DeiT's repeated augmentation: each sample appears this many times per epoch, across ranks.
    repeated_aug: int = 1
    drop_last: bool = True
    # Eval: "crop" resizes the shorter side to img_size / crop_pct and centre-crops (timm, DeiT);
    # "squash" resizes both sides to img_size (the official ViT code).
    eval_resize: EvalResize = "crop"
    crop_pct: float = 0.875
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = VIT_MEAN
    std: tuple[float, float, float] = VIT_STD
    # Files.
    on_bad: OnBad = "skip"
    verify: Verify = "none"
    shuffle_buffer: int = 1000
    # The synthetic set.
    synthetic_size: int = 1024
    synthetic_classes: int = 10

    def __post_init__(self) -> None:
        # Lists (from JSON or the CLI) become tuples, which also checks their lengths.
        for name, length in (("scale", 2), ("ratio", 2), ("mean", 3), ("std", 3)):
            given = getattr(self, name)
            if not isinstance(given, (tuple, list)) or not all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in given
            ):
                raise ValueError(f"DataConfig.{name}={given!r}: expected {length} numbers")
            values = tuple(float(value) for value in given)
            if len(values) != length:
                raise ValueError(f"DataConfig.{name}={values}: expected {length} values")
            object.__setattr__(self, name, values)
        self.validate()

    def validate(self) -> None:
        for name, allowed in (
            ("dataset", DatasetName),
            ("auto_augment", AutoAugment),
            ("eval_resize", EvalResize),
            ("train_crop", TrainCrop),
            ("interpolation", Interpolation),
            ("on_bad", OnBad),
            ("verify", Verify),
        ):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(
                    f"DataConfig.{name}={getattr(self, name)!r}: expected one of {get_args(allowed)}"
                )
        for item in dataclasses.fields(self):
            value, default = getattr(self, item.name), item.default
            if isinstance(default, float) and (
                not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            ):
                raise ValueError(f"DataConfig.{item.name}={value!r}: expected a finite number")
            if isinstance(default, (bool, str)) and type(value) is not type(default):
                raise ValueError(f"DataConfig.{item.name}={value!r}: expected a {type(default).__name__}")
        for name, (low, high) in DATA_INT_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"DataConfig.{name}={value!r}: expected an integer in [{low}, {high}]")
        positive = (
            "img_size",
            "batch_size",
            "repeated_aug",
            "shuffle_buffer",
            "synthetic_size",
            "synthetic_classes",
        )
        non_negative = ("num_workers", "seed", "mixup", "cutmix", "color_jitter", "crop_padding")
        probabilities = ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob", "label_smoothing")
        low, high = self.scale
        checks = {
            f"{', '.join(positive)} must be >= 1": all(getattr(self, name) >= 1 for name in positive),
            f"{', '.join(non_negative)} must be >= 0": all(getattr(self, name) >= 0 for name in non_negative),
            f"{', '.join(probabilities)} must be in [0, 1]": all(
                0 <= getattr(self, name) <= 1 for name in probabilities
            ),
            "val_fraction must be in [0, 1)": 0 <= self.val_fraction < 1,
            "crop_pct must be in (0, 1]": 0 < self.crop_pct <= 1,
            "scale must be 0 < low <= high <= 1": 0 < low <= high <= 1,
            "ratio must be 0 < low <= high": 0 < self.ratio[0] <= self.ratio[1],
            "std must be > 0": min(self.std) > 0,
            "datasets 'imagefolder' and 'shards' need a root": bool(self.root)
            or self.dataset in ("digits", "synthetic"),
            "cache does not apply to dataset 'shards' (a stream)": not self.cache or self.dataset != "shards",
            "batch_augment needs cache=True and train_crop='pad', and supports no per-image augmentation "
            "(auto_augment 'none', color_jitter 0, random_erasing 0)": not self.batch_augment
            or (
                self.cache
                and self.train_crop == "pad"
                and self.auto_augment == "none"
                and self.color_jitter == 0
                and self.random_erasing == 0
            ),
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid DataConfig ({'; '.join(failed)})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Build from plain data (e.g. JSON); unknown keys are errors."""
        if not isinstance(data, dict):
            raise TypeError(f"a DataConfig is a JSON object of fields, got {type(data).__name__}")
        check_fields(cls, data, what="DataConfig")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {name: list(value) if isinstance(value, tuple) else value for name, value in data.items()}

    def replace(self, **overrides: Any) -> DataConfig:
        check_fields(DataConfig, overrides, what="DataConfig")
        return dataclasses.replace(self, **overrides)


DATA_ENV = "VITKIT_DATA"


def data_root() -> Path:
    """The folder that holds the named data sets of the configs in configs/ (cifar10/, ...):
    $VITKIT_DATA when set, else the team's shared/data beside the source checkout. Configs name their
    data from here, so they run the same from any working folder."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    return (Path(__file__).resolve().parents[4] / "shared" / "data").resolve()


def resolve_root(root: str, base: Path) -> str:
    """A data root as an absolute path: relative roots are taken from `base` (a config file's folder,
    or the working folder for a root typed on the command line)."""
    if not root:
        return root
    path = Path(root).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


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

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        index, epoch, position = key
        image, label = self.dataset[index]
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
            yield torch.addcmul(self.shift, images.float(), self.scale), self.targets[index]


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
        transform = build_transforms(cfg, self.train)
        drop_last = self.train and cfg.drop_last
        # Torch seeds each worker from this generator: any global-RNG use in a worker is reproducible.
        worker_seeds = seeded_generator("workers", cfg.seed, rank)
        self.sampler: ResumableSampler | None = None
        if cfg.dataset == "shards":
            if cfg.repeated_aug > 1 or cfg.val_fraction > 0:
                raise ValueError("dataset 'shards' supports neither repeated_aug > 1 nor val_fraction")
            self.dataset: Any = ShardDataset(
                Path(cfg.root) / split,
                transform=transform,
                rank=rank,
                world_size=world_size,
                shuffle=self.train,
                shuffle_buffer=cfg.shuffle_buffer,
                seed=cfg.seed,
                on_bad=cfg.on_bad,
            )
            # Not persistent: workers must copy the dataset again at each epoch to see its number.
            self.loader = DataLoader(
                self.dataset,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                drop_last=drop_last,
                pin_memory=pin_memory,
                generator=worker_seeds,
            )
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
            if self.train and cfg.batch_augment:
                self.loader: Any = AugmentedBatches(self.dataset, self.sampler, cfg)
            else:
                self.loader = DataLoader(
                    SeededTransform(self.dataset, transform, cfg.seed),
                    batch_size=cfg.batch_size,
                    sampler=self.sampler,
                    num_workers=cfg.num_workers,
                    drop_last=drop_last,
                    pin_memory=pin_memory,
                    persistent_workers=cfg.num_workers > 0,
                    generator=worker_seeds,
                )
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        self.classes: list[str] = list(base.classes)
        self.class_to_idx: dict[str, int] = dict(base.class_to_idx)
        self.num_classes = len(self.classes)
        self.mixup: Mixup | None = None
        if self.train and (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.label_smoothing > 0):
            self.mixup = Mixup(
                self.num_classes,
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.label_smoothing,
            )

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
        for step, (images, labels) in enumerate(batches, start=first_batch):
            if self.mixup is not None:
                generator = seeded_generator("mixup", self.cfg.seed, self.epoch, self.rank, step)
                images, labels = self.mixup(images, labels, generator)
            yield images, labels


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
