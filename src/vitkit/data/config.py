"""DataConfig: the closed set of fields that describe a data pipeline, checked when built, and where
the named data sets live (`data_root`). A leaf of the data package: the loader and the transforms
both read it, and it imports neither.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from vitkit.data.datasets import OnBad, Verify
from vitkit.models.config import MAX_IMG_SIZE, check_fields
from vitkit.models.preprocessing import VIT_MEAN, VIT_STD, EvalResize, Interpolation

DatasetName = Literal["digits", "imagefolder", "shards", "synthetic"]
AutoAugment = Literal["none", "randaugment", "3aug"]
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
        # The integer fields were bounded above (DATA_INT_LIMITS); these are the float ones.
        non_negative = ("mixup", "cutmix", "color_jitter")
        probabilities = ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob", "label_smoothing")
        low, high = self.scale
        checks = {
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
