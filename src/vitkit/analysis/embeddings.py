"""What the embeddings learned: position-embedding similarity and the patch-embedding filters.

Both are the ViT paper's Figure 7: centre, "similarity of position embeddings of ViT-L/32: tiles show
the cosine similarity between the position embedding of the patch with the indicated row and column
and the position embeddings of all other patches"; left, "filters of the initial linear embedding of
RGB values", shown as their top principal components.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.vit import VisionTransformer


def patch_position_embeddings(model: VisionTransformer) -> torch.Tensor:
    """The position embeddings of the patches on the model's grid, (h, w, D); no class-token slot.

    Learned embeddings come from `model.pos_embed`, fixed sin-cos ones are generated as the forward
    pass does, so both kinds are analysed alike.
    """
    config = model.config
    if config.pos_embed in ("none", "rope"):
        raise ValueError(
            f"the model has no position embeddings to compare (ViTConfig.pos_embed={config.pos_embed!r})"
        )
    with torch.no_grad():
        pos_embed = model.position_embeddings(config.grid_size)  # (1, [prefix +] h*w, D)
    num_prefix = config.num_prefix_tokens if config.pos_embed_class_slot else 0
    patches = pos_embed[0, num_prefix:].detach().float()
    return patches.reshape(*config.grid_size, config.embed_dim)


def position_similarity(pos_embed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch's embedding with every other's: (h, w, D) -> (h, w, h, w).

    Entry [r, c] is the tile of the patch in row r, column c: its similarity to all patches, laid out
    on the grid.
    """
    if pos_embed.ndim != 3:
        raise ValueError(f"position embeddings must be shaped (h, w, D), got {tuple(pos_embed.shape)}")
    rows, cols, _ = pos_embed.shape
    flat = F.normalize(pos_embed.reshape(rows * cols, -1).double(), dim=-1)
    return (flat @ flat.T).reshape(rows, cols, rows, cols).float()


@dataclass
class FilterComponents:
    """Principal components of the patch-embedding filters.

    components: (K, C, P, P), unit norm, ordered by variance; explained: (K,) fraction of the
    filters' variance each component explains; mean: (C, P, P) the mean filter removed first.
    """

    components: torch.Tensor
    explained: torch.Tensor
    mean: torch.Tensor


def patch_filters(model: VisionTransformer) -> torch.Tensor:
    """The linear patch embedding E of equation (1) as filters over pixels: (D, C, P, P)."""
    stem = model.patch_embed
    if model.config.stem != "patch" or not isinstance(getattr(stem, "proj", None), nn.Conv2d):
        raise ValueError(
            f"filters are defined for the linear patch stem only; this model's stem is {model.config.stem!r} "
            "(its first layer does not see whole patches of pixels)"
        )
    return stem.proj.weight.detach().float().cpu()


def filter_components(filters: torch.Tensor, num_components: int = 28) -> FilterComponents:
    """Top principal components of filters (D, C, P, P), each a (C, P, P) patch of pixels.

    PCA over the D filters: remove the mean filter, then the right singular vectors of the (D, C*P*P)
    matrix. A component's sign is arbitrary; it is fixed so that its largest-magnitude pixel is
    positive, which makes the figure reproducible.
    """
    if filters.ndim != 4:
        raise ValueError(f"filters must be shaped (D, C, P, P), got {tuple(filters.shape)}")
    num_filters, *pixel_shape = filters.shape
    flat = filters.reshape(num_filters, -1).double()
    mean = flat.mean(dim=0)
    _, singular, vectors = torch.linalg.svd(flat - mean, full_matrices=False)
    num_components = min(num_components, vectors.shape[0])
    vectors = vectors[:num_components]
    peak = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors = vectors * peak.sign()
    variance = singular**2
    explained = variance[:num_components] / variance.sum().clamp_min(torch.finfo(variance.dtype).tiny)
    return FilterComponents(
        components=vectors.reshape(num_components, *pixel_shape).float(),
        explained=explained.float(),
        mean=mean.reshape(pixel_shape).float(),
    )
