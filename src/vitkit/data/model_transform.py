"""The eval transform of a loaded model: its checkpoint's preprocessing (`model.preprocessing`,
see `vitkit.models.preprocessing`), with any field overridden, as one transform.

`predict`, `eval`, `fewshot`, `finetune`, `plot` and `serve` all build their eval transform here, so
an image is prepared the same way everywhere a checkpoint is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vitkit.data.datasets import _rgb_array
from vitkit.data.transforms import Compose, Normalize, ResizeCenterCrop, SquashResize
from vitkit.models.preprocessing import Preprocessing, preprocessing_of

log = logging.getLogger(__name__)


def resolve_preprocessing(model: nn.Module | Preprocessing, **overrides: Any) -> Preprocessing:
    """The model's preprocessing with `overrides` (None values are ignored) applied; logged once."""
    base = model if isinstance(model, Preprocessing) else preprocessing_of(model)
    changes = {name: value for name, value in overrides.items() if value is not None}
    preprocessing = (
        base.replace(**changes, source=f"{base.source}, overridden: {', '.join(sorted(changes))}")
        if changes
        else base
    )
    log.info("preprocessing: %s", preprocessing.describe())
    return preprocessing


@dataclass(frozen=True)
class ToImageTensor:
    """A PIL image (any mode, as decoding a file converts it) or a uint8 array (H, W, 3) -> uint8
    tensor (3, H, W); a tensor passes as it is. timm and HF users hold PIL images."""

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, Image.Image):
            image = _rgb_array(image)
        if (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
        ):
            return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
        raise TypeError(
            "an eval transform takes a uint8 tensor (3, H, W), a PIL image or a uint8 array (H, W, 3); got "
            f"{type(image).__name__} {getattr(image, 'shape', '')}".rstrip()
        )


def geometry_of(preprocessing: Preprocessing) -> Compose:
    """The resize (and crop) of a preprocessing alone: uint8 (3, H, W) tensor or PIL image -> uint8
    (3, *img_size), for figures that draw the image the model sees."""
    if preprocessing.eval_resize == "squash":
        resize = SquashResize(preprocessing.img_size, preprocessing.interpolation)
    else:
        resize = ResizeCenterCrop(
            preprocessing.img_size[0], preprocessing.crop_pct, preprocessing.interpolation
        )
    return Compose((ToImageTensor(), resize))


def transform_of(preprocessing: Preprocessing) -> Compose:
    """Preprocessing -> uint8 (3, H, W) (or PIL image) to float (3, *img_size) transform."""
    return Compose((*geometry_of(preprocessing).steps, Normalize(preprocessing.mean, preprocessing.std)))


def data_fields(preprocessing: Preprocessing) -> dict[str, Any]:
    """The DataConfig fields of a preprocessing, for loaders built from a checkpoint (`vitkit eval`,
    `vitkit finetune`)."""
    height, width = preprocessing.img_size
    if height != width:
        raise ValueError(
            f"preprocessing img_size={preprocessing.img_size}: data configs take square images only"
        )
    fields = preprocessing.as_dict()
    fields["img_size"] = height
    return fields


def eval_transform(model: nn.Module | Preprocessing, **overrides: Any) -> Compose:
    """The eval transform of a loaded model (or of a Preprocessing), fields overridable by name:
    img_size, eval_resize, crop_pct, interpolation, mean, std. It takes a uint8 tensor (3, H, W), a
    PIL image or a uint8 array (H, W, 3)."""
    return transform_of(resolve_preprocessing(model, **overrides))
