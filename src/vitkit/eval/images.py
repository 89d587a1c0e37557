"""A checkpoint run over image files (`vitkit predict`, `vitkit embed`): files, folders and glob
patterns -> image paths in order -> batches of decoded, transformed images -> one output row per
image, each unreadable file kept in its place with its reason.

Folders are listed as `ImageFolder` lists them (regular image files only, each real folder once) and
files decoded by `decode_image`, so the same hostile files are refused the same way everywhere.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.datasets import BadImageError, decode_image, folder_key, list_image_files

GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class ImageInput:
    """One image to run: its path, and why it cannot be read when that is known before decoding."""

    path: str
    reason: str | None = None


@dataclass(frozen=True)
class ImageOutput:
    """The model's output row for one image, or the reason the image could not be read."""

    path: str
    output: torch.Tensor | None = None
    error: str | None = None


def expand_images(arguments: Sequence[str]) -> list[ImageInput]:
    """Files as given; folders as their image files, sorted; glob patterns (`**` included) as their
    sorted matches. A pattern matching nothing or a folder holding no image is a mistake: ValueError."""
    visited: set[tuple[int, int]] = set()
    inputs: list[ImageInput] = []
    for argument in arguments:
        if os.path.isdir(argument):
            inputs += _folder_images(argument, visited)
        elif not os.path.lexists(argument) and any(char in argument for char in GLOB_CHARACTERS):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise ValueError(f"{argument}: no file matches this pattern")
            for match in matches:
                is_folder = os.path.isdir(match)
                inputs += _folder_images(match, visited) if is_folder else [ImageInput(match)]
        else:
            inputs.append(ImageInput(argument))
    return inputs


def _folder_images(folder: str, visited: set[tuple[int, int]]) -> list[ImageInput]:
    key = folder_key(folder)
    if key in visited:
        return []
    visited.add(key)
    found, special = list_image_files(Path(folder), visited)
    if not found and not special:
        raise ValueError(f"{folder}: no JPEG, PNG, WebP or BMP file inside")
    reasons = dict(special)
    return [ImageInput(path, reasons.get(path)) for path in sorted([*found, *reasons])]


@torch.no_grad()
def run_images(
    function: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[ImageInput],
    transform: Callable[[torch.Tensor, None], torch.Tensor],
    batch_size: int,
    desc: str = "images",
) -> Iterator[ImageOutput]:
    """`function` (images (B, C, H, W) -> rows (B, ...)) over the images, `batch_size` at a time, one
    `ImageOutput` per input in order. A progress bar (rate, ETA) on stderr when there is more than
    one batch."""
    bar = tqdm(total=len(inputs), desc=desc, unit="image", disable=len(inputs) <= batch_size, leave=False)
    with bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            images: dict[int, torch.Tensor] = {}
            errors: dict[int, str] = {}
            for index, item in enumerate(chunk):
                if item.reason is not None:
                    errors[index] = item.reason
                    continue
                try:
                    images[index] = transform(decode_image(item.path), None)
                except BadImageError as error:
                    errors[index] = error.reason
            rows = function(torch.stack(list(images.values()))) if images else []
            outputs = dict(zip(images, rows, strict=True))
            for index, item in enumerate(chunk):
                yield ImageOutput(item.path, outputs.get(index), errors.get(index))
            bar.update(len(chunk))
