"""Patch stems: every stem maps an image (B, C, H, W) to a token sequence (B, L, D) in row-major order.

- PatchEmbed: the ViT paper's linear projection of flattened patches (a conv with stride = kernel).
- HMLPStem: "Three things everyone should know about ViTs", #3, the hierarchical MLP stem.
- HybridStem: the ViT paper's hybrid, a BiT ResNet trunk whose feature map is cut into 1x1 patches.
- ConvStem: "Early Convolutions Help Transformers See Better" (Xiao et al., 2021), stacked stride-2
  3x3 conv-BN-ReLU layers and a 1x1 projection to the width: a small hybrid for small data.
- CnnStem: a small CNN as the hybrid's trunk (the conv groups of ResNet-9 and airbench): a
  full-resolution 3x3 conv, then conv / max-pool groups, each halving the resolution.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ViTConfig
from .resnet import ResNetV2


class PatchEmbed(nn.Module):
    """Split into P x P patches and project each linearly: x_p E of equation (1) in the paper."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map: per pixel, so no mixing between patches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class HMLPStem(nn.Module):
    """Hierarchical MLP stem: (P/4)x(P/4), then 2x2, then 2x2 linear projections, each with a norm (and
    GELU): 4x4, 2x2, 2x2 for the paper's 16-px patches, a per-pixel 1x1 first for 4-px patches.

    Every convolution has stride equal to its kernel and every norm is per pixel, so each PxP patch
    is processed on its own: masking patches before or after the stem gives the same tokens, which
    is what lets BeiT-style masked pre-training use it. Indices of `proj` follow the DeiT code.
    """

    def __init__(self, in_chans: int, embed_dim: int, eps: float = 1e-6, patch_size: int = 16):
        super().__init__()
        if patch_size < 4 or patch_size % 4:
            raise ValueError(f"HMLPStem: patch_size must be a multiple of 4, not {patch_size}")
        self.patch_size = patch_size
        hidden, first = embed_dim // 4, patch_size // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, hidden, kernel_size=first, stride=first),
            LayerNorm2d(hidden, eps=eps),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=2, stride=2),
            LayerNorm2d(hidden, eps=eps),
            nn.GELU(),
            nn.Conv2d(hidden, embed_dim, kernel_size=2, stride=2),
            LayerNorm2d(embed_dim, eps=eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridStem(nn.Module):
    """ResNet feature map -> tokens: the "patches" are 1x1 (or patch_size) cells of the CNN's output."""

    def __init__(self, hybrid_layers: tuple[int, ...], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.backbone = ResNetV2(hybrid_layers, in_chans=in_chans)
        self.proj = nn.Conv2d(
            self.backbone.num_features, embed_dim, kernel_size=patch_size, stride=patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


class ConvBnRelu(nn.Module):
    """3x3 convolution (no bias: the BatchNorm's shift replaces it), BatchNorm, ReLU."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def conv_stem_channels(patch_size: int, embed_dim: int) -> list[int]:
    """Output channels of the log2(patch_size) stride-2 layers: doubling up to the width, as in Xiao et
    al.'s ViT_C stems (e.g. width 384, patch 16: 48, 96, 192, 384)."""
    num_layers = patch_size.bit_length() - 1
    return [max(embed_dim >> (num_layers - 1 - i), 1) for i in range(num_layers)]


class ConvStem(nn.Module):
    """log2(P) stride-2 3x3 conv-BN-ReLU layers take (B, C, H, W) to (B, c, H/P, W/P); a 1x1 conv projects
    to the width. Each token sees a (2P - 1)-pixel window overlapping its neighbours' (patches mix)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        channels = conv_stem_channels(patch_size, embed_dim)
        inputs = [in_chans, *channels[:-1]]
        self.backbone = nn.Sequential(
            *(ConvBnRelu(c_in, c_out, stride=2) for c_in, c_out in zip(inputs, channels, strict=True))
        )
        self.proj = nn.Conv2d(channels[-1], embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


def conv_bn_gelu(in_chans: int, out_chans: int) -> list[nn.Module]:
    """3x3 convolution (no bias: the BatchNorm's shift replaces it), BatchNorm, GELU."""
    return [nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False), nn.BatchNorm2d(out_chans), nn.GELU()]


class ConvGroup(nn.Sequential):
    """Half the resolution: 3x3 conv, 2x2 max-pool, BatchNorm, GELU, then 3x3 conv-BN-GELU."""

    def __init__(self, in_chans: int, out_chans: int):
        conv, norm, act = conv_bn_gelu(in_chans, out_chans)
        super().__init__(conv, nn.MaxPool2d(2), norm, act, *conv_bn_gelu(out_chans, out_chans))


class CnnStem(nn.Module):
    """A conv-BN-GELU at full resolution (channels[0]), then log2(P) `ConvGroup`s (channels[1:]); the
    last group's map is the token grid, projected to the width by a 1x1 conv when their sizes differ.
    On 32-px images, channels (24, 64, 256) and patch 4 give 64 tokens, each a 4x4-px cell seen through
    a 24-px window; channels (24, 64, 128, 256) and patch 8 give 16 tokens of 8x8-px cells whose 52-px
    windows cover the whole image (`configs/cifar10_vit.py`)."""

    # The trunk runs on channels-last (NHWC) maps: oneDNN's convolutions then skip a reorder per layer
    # (training steps of `cifar10_vit` 1.20x faster in bf16 and 1.11x in fp32 on a 2-core EPYC, by
    # benchmarks/conv_layout.py). The weights keep their layout, so checkpoints are unchanged, and the
    # last map's NHWC order is already the (B, h*w, D) token order.
    channels_last: bool = True

    def __init__(self, channels: tuple[int, ...], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        groups = [ConvGroup(c_in, c_out) for c_in, c_out in pairwise(channels)]
        self.backbone = nn.Sequential(*conv_bn_gelu(in_chans, channels[0]), *groups)
        self.proj = nn.Conv2d(channels[-1], embed_dim, 1) if channels[-1] != embed_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


def build_stem(config: ViTConfig) -> nn.Module:
    if config.stem == "patch":
        return PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
    if config.stem == "hmlp":
        return HMLPStem(config.in_chans, config.embed_dim, eps=config.norm_eps, patch_size=config.patch_size)
    if config.stem == "conv":
        return ConvStem(config.patch_size, config.in_chans, config.embed_dim)
    if config.stem == "cnn":
        return CnnStem(config.stem_channels, config.patch_size, config.in_chans, config.embed_dim)
    return HybridStem(config.hybrid_layers, config.patch_size, config.in_chans, config.embed_dim)
