"""A whitening-initialised first convolution (`model.whiten_images`), as in the airbench CIFAR-10
speed runs: the cnn stem's first conv starts as the ZCA-like whitening of the training images' k x k
patches, so the trunk sees decorrelated, unit-variance inputs from the first step.

The patches' second-moment matrix S (d = channels x k x k entries) has eigenvectors v_i and
eigenvalues l_i; filter i is v_i / sqrt(l_i + eps), for the out/2 largest l_i, each given with both
signs (the GELU after the BatchNorm keeps either half). The filters stay trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.stems import CnnStem
from ..models.vit import VisionTransformer

log = logging.getLogger(__name__)

EPS = 5e-4  # added to each eigenvalue: bounds the gain of the flattest directions


def first_conv(model: VisionTransformer) -> nn.Conv2d:
    stem = model.patch_embed
    if not isinstance(stem, CnnStem):
        raise ValueError(
            f"model.whiten_images needs stem 'cnn' (a first convolution to whiten), not {model.config.stem!r}"
        )
    return stem.backbone[0]


def patch_moments(conv: nn.Conv2d, images: torch.Tensor, max_patches: int = 200_000) -> torch.Tensor:
    """The (d, d) second-moment matrix of the conv's input patches, from at most max_patches of them."""
    patches = F.unfold(images.float(), conv.kernel_size, padding=conv.padding, stride=conv.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N * L, d)
    if len(patches) > max_patches:
        generator = torch.Generator().manual_seed(0)
        patches = patches[torch.randperm(len(patches), generator=generator)[:max_patches]]
    return patches.T @ patches / len(patches)


def whitening_filters(moments: torch.Tensor, out_channels: int, eps: float = EPS) -> torch.Tensor:
    """(out_channels, d) filters: the out/2 leading eigen-directions scaled to unit variance, +/-."""
    dim = moments.shape[0]
    if out_channels % 2 or out_channels > 2 * dim:
        raise ValueError(
            f"model.whiten_images: the first conv's {out_channels} channels must be even and at most "
            f"2 x {dim} (its patch size), to hold each whitening filter with both signs"
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(moments.double())  # ascending
    order = eigenvalues.argsort(descending=True)[: out_channels // 2]
    filters = eigenvectors[:, order].T / (eigenvalues[order].clamp_min(0) + eps).sqrt()[:, None]
    return torch.cat([filters, -filters]).float()


def whiten_first_conv(model: VisionTransformer, batches: Iterable[torch.Tensor], num_images: int) -> int:
    """Set the first conv of `model`'s cnn stem to whiten the patches of about num_images images read
    from `batches` (each (B, C, H, W), as the model sees them); the number of images used."""
    conv = first_conv(model)
    taken, count = [], 0
    for images in batches:
        taken.append(images[: num_images - count])
        count += len(taken[-1])
        if count >= num_images:
            break
    if not count:
        raise ValueError("model.whiten_images: the training data gave no images")
    filters = whitening_filters(patch_moments(conv, torch.cat(taken)), conv.out_channels)
    with torch.no_grad():
        conv.weight.copy_(filters.reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.zero_()
    log.info("model: first conv whitened on %d training images (%d filters)", count, conv.out_channels)
    return count
