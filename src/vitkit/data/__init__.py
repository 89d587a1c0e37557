"""Data: `DataConfig` (config.py), data sets yielding (uint8 image, label), a decoded-image cache,
tensor transforms, mixup, and `build_loader`."""

from vitkit.data.cache import CachedImages
from vitkit.data.config import DataConfig, data_root
from vitkit.data.datasets import (
    BadImageError,
    ImageFolder,
    ShardDataset,
    Synthetic,
    Unreadable,
    decode_image,
    write_shards,
)
from vitkit.data.digits import Digits
from vitkit.data.loader import Loader, ResumableSampler, build_loader
from vitkit.data.mixup import Mixup, soft_target_cross_entropy
from vitkit.data.model_transform import eval_transform, preprocessing_of, resolve_preprocessing
from vitkit.data.transforms import build_transforms
from vitkit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, VIT_MEAN, VIT_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_MEAN",
    "VIT_STD",
    "BadImageError",
    "CachedImages",
    "DataConfig",
    "Digits",
    "ImageFolder",
    "Loader",
    "Mixup",
    "ResumableSampler",
    "ShardDataset",
    "Synthetic",
    "Unreadable",
    "build_loader",
    "build_transforms",
    "data_root",
    "decode_image",
    "eval_transform",
    "preprocessing_of",
    "resolve_preprocessing",
    "soft_target_cross_entropy",
    "write_shards",
]
