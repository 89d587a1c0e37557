"""2D rotary position embeddings (RoPE) of DINOv3 (Siméoni et al., 2025), pure tensor functions.

Each patch token's query and key are rotated, pair of channels by pair, by angles proportional to
its patch centre's coordinates: no position is added to the tokens themselves, and any grid works
(the coordinates are normalised to [-1, 1], so a bigger image samples the same range more finely).
The class and register tokens are not rotated. The arithmetic follows the reference (transformers'
DINOv3ViT) operation by operation, in float32, so that features agree bit for bit; DINOv3's
training-time coordinate augmentations (shift, jitter, rescale) are not reproduced.
"""

from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim / 4,) inverse frequencies 1 / theta ** (4 k / head_dim), k = 0 .. head_dim / 4 - 1."""
    if head_dim % 4:
        raise ValueError(f"2D rotary embeddings need a head width divisible by 4, got {head_dim}")
    return 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)


def patch_centres(grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) (y, x) centres of the patches of a grid, row-major, scaled to [-1, 1]."""
    height, width = grid
    ys = torch.arange(0.5, height, dtype=torch.float32) / height
    xs = torch.arange(0.5, width, dtype=torch.float32) / width
    centres = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * centres - 1.0


def rope_2d(grid: tuple[int, int], head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (h*w, head_dim) in float32.

    Channels hold [y angles | x angles] at head_dim / 4 frequencies each, repeated once, so that
    channel c and channel c + head_dim / 2 form one rotated pair (`rotate_half`).
    """
    angles = 2 * math.pi * patch_centres(grid)[:, :, None] * rope_frequencies(head_dim, theta)[None, None, :]
    angles = angles.flatten(1, 2).tile(2)  # (h*w, 2, head_dim / 4) -> (h*w, head_dim)
    return torch.cos(angles), torch.sin(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90 degree turn of each pair."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the patch tokens of q and k (B, heads, prefix + h*w, head_dim); prefix tokens stay as
    they are. The number of patches is read from `cos` (h*w, head_dim)."""
    num_patches = cos.shape[0]
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        prefix, patches = x.split((x.shape[-2] - num_patches, num_patches), dim=-2)
        return torch.cat((prefix, patches * cos + rotate_half(patches) * sin), dim=-2)

    return rotate(q), rotate(k)
