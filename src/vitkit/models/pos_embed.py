"""Position embeddings as pure tensor functions: 2D sin-cos and 2D resampling to a new patch grid.

`resample_pos_embed` is the one function used both when a checkpoint is loaded at another resolution
and when an image of another size is fed at run time (section 3.2 of the ViT paper: "we perform 2D
interpolation of the pre-trained position embeddings, according to their location in the original
image").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Each reference toolkit resamples differently, and the choice moves logits by ~1e-3:
#   bicubic                 HuggingFace ViT and mmpretrain (align_corners=False, no antialias)
#   bicubic_antialias       timm when it loads a checkpoint at another size (resample_abs_pos_embed)
#   bilinear                timm's .npz loader (align_corners=False)
#   bilinear_antialias      SigLIP 2 NaFlex, per image (HF Siglip2VisionEmbeddings)
#   bilinear_align_corners  the official vit_jax code, scipy.ndimage.zoom(order=1) on the grid
_METHODS = {
    "bicubic": dict(mode="bicubic", align_corners=False, antialias=False),
    "bicubic_antialias": dict(mode="bicubic", align_corners=False, antialias=True),
    "bilinear": dict(mode="bilinear", align_corners=False, antialias=False),
    "bilinear_antialias": dict(mode="bilinear", align_corners=False, antialias=True),
    "bilinear_align_corners": dict(mode="bilinear", align_corners=True, antialias=False),
}
RESAMPLE_METHODS = tuple(_METHODS)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
) -> torch.Tensor:
    """Resample position embeddings (1, prefix + Hold*Wold, D) onto a (Hnew, Wnew) patch grid.

    The first `num_prefix_tokens` rows (the class token's slot) are kept as they are. `old_grid`
    defaults to the square grid that the number of patch rows implies. Resampling to the same grid
    returns the input unchanged. Interpolation runs in float32 and the result keeps the input dtype.
    """
    if method not in _METHODS:
        raise ValueError(
            f"unknown position-embedding resample method {method!r}; use one of {RESAMPLE_METHODS}"
        )
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be shaped (1, tokens, dim), got {tuple(pos_embed.shape)}")
    num_patch_rows = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(num_patch_rows**0.5))
        if side * side != num_patch_rows:
            raise ValueError(
                f"cannot infer the grid of {num_patch_rows} position embeddings (not a square); pass old_grid"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != num_patch_rows:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_patch_rows} patch position embeddings")
    if old_grid == new_grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid.float(), size=new_grid, **_METHODS[method])
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings (H*W, D): [sin x, cos x, sin y, cos y], as big_vision.

    Each quarter of the channels holds one of the four functions at dim/4 frequencies spaced
    geometrically from 1 to 1/temperature; rows run over the grid in row-major order.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
    y, x = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    num_frequencies = dim // 4
    omega = torch.arange(num_frequencies, dtype=torch.float32) / max(num_frequencies - 1, 1)
    omega = 1.0 / temperature**omega
    x = x.flatten()[:, None] * omega[None, :]
    y = y.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
