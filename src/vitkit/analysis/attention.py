"""What the heads look at: attention maps, attention rollout and mean attention distance.

- `attention_weights(model, images)`: every block's softmax(q k^T / sqrt(d)), (B, heads, L, L) each,
  recomputed on request by `VisionTransformer.forward_intermediates`; the fused forward is untouched.
- `mean_attention_distance`: the ViT paper's Figure 7 (right) and Appendix D.7, "the average distance
  in image space across which information is integrated, based on the attention weights".
- `attention_rollout`: Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers", the
  method behind the ViT paper's Figure 6: average the heads, add the identity for the residual
  connection, renormalise the rows and multiply through the layers.

Prefix tokens (the class token) come first in every sequence, as in the model.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..models.vit import VisionTransformer


def attention_weights(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention weights for a batch (B, C, H, W): depth x (B, heads, L, L).

    Parallel blocks give all their branches' heads side by side: (B, parallel * heads, L, L).
    """
    was_training = model.training
    model.eval()
    try:
        out = model.forward_intermediates(images, attention=True)
    finally:
        model.train(was_training)
    return [weights.float() for weights in out["attention"]]


def patch_distances(grid: tuple[int, int], patch_pixels: float = 1.0) -> torch.Tensor:
    """Euclidean distance between the centres of every pair of patches, in pixels: (h*w, h*w).

    Patches are numbered row-major, as the stems emit them; neighbours are `patch_pixels` apart.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1) * patch_pixels  # (N, 2)
    return torch.cdist(centres, centres)


def patch_attention(weights: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, heads, L, L) -> (B, heads, N, N): patch queries over patch keys, rows renormalised to 1.

    The class token is neither a place in the image nor a query about one, so it is dropped as query
    and as key; what a patch gave to it is shared out over the patches in proportion.
    """
    patches = weights[..., num_prefix_tokens:, num_prefix_tokens:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)


def mean_attention_distance(
    weights: list[torch.Tensor], grid: tuple[int, int], patch_pixels: float, num_prefix_tokens: int
) -> torch.Tensor:
    """Mean attention distance in pixels, (depth, heads).

    For each head: sum_k a_qk * ||centre_q - centre_k|| over patch keys k, averaged over patch
    queries q and over the images of the batch. `weights` holds depth x (B, heads, L, L).
    """
    num_patches = grid[0] * grid[1]
    distances = patch_distances(grid, patch_pixels)  # (N, N)
    out = []
    for layer, layer_weights in enumerate(weights):
        if layer_weights.shape[-1] != num_patches + num_prefix_tokens:
            raise ValueError(
                f"attention of block {layer} covers {layer_weights.shape[-1]} tokens, but grid {grid} with "
                f"{num_prefix_tokens} prefix token(s) has {num_patches + num_prefix_tokens}"
            )
        patches = patch_attention(layer_weights.double(), num_prefix_tokens)  # (B, heads, N, N)
        per_query = (patches * distances).sum(dim=-1)  # (B, heads, N)
        out.append(per_query.mean(dim=(0, 2)))
    return torch.stack(out).float()


def attention_rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout through all layers: (B, L, L), row i = how much token i draws on each input.

    Per layer, A = (mean over heads + I) / 2: the identity stands for the residual connection, which
    carries as much of the token forward as attention mixes in, and keeps rows summing to 1.
    The layers compose by matrix product, the first layer applied first.
    """
    rollout = None
    for layer_weights in weights:
        mixed = layer_weights.double().mean(dim=1)  # (B, L, L)
        identity = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention weights of at least one block")
    return rollout.float()


def pooled_patch_map(
    token_weights: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int, pool: str
) -> torch.Tensor:
    """Where the pooled representation looks, as an image-shaped map summing to 1: (..., h, w).

    `token_weights` is (..., L, L) (a rollout, or one layer's per-head weights). With a class token
    (pool "token") the map is the class token's row; otherwise ("gap", "map" without a class token)
    the mean of the patch rows, the same average the pooling takes. Prefix columns are dropped and
    the rest renormalised.
    """
    if pool == "token":
        if num_prefix_tokens == 0:
            raise ValueError("pool 'token' needs a class token, but the model has no prefix tokens")
        row = token_weights[..., 0, num_prefix_tokens:]
    else:
        row = token_weights[..., num_prefix_tokens:, num_prefix_tokens:].mean(dim=-2)
    row = row / row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return row.reshape(*row.shape[:-1], grid[0], grid[1])


def model_attention_distance(
    model: VisionTransformer, images: torch.Tensor, batch_size: int = 32, progress: bool = True
) -> torch.Tensor:
    """Mean attention distance (depth, heads) of a model over images (B, C, H, W), in input pixels.

    Runs `batch_size` images at a time, since the weights of every block for B images take
    depth * B * heads * L^2 floats.
    """
    config = model.config
    grid = (images.shape[-2] // config.stride, images.shape[-1] // config.stride)
    total = None
    for start in tqdm(range(0, len(images), batch_size), desc="attention distance", disable=not progress):
        batch = images[start : start + batch_size]
        weights = attention_weights(model, batch)
        distance = mean_attention_distance(weights, grid, config.stride, config.num_prefix_tokens)
        total = distance * len(batch) if total is None else total + distance * len(batch)
    if total is None:
        raise ValueError("model_attention_distance needs at least one image")
    return total / len(images)
