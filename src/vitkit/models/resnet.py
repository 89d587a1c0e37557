"""The BiT ResNetV2 trunk of the hybrid ViTs (ViT paper, section 3.1 "Hybrid Architecture").

Weight-standardised convolutions and GroupNorm instead of BatchNorm (Kolesnikov et al., "Big
Transfer"), TensorFlow "SAME" padding, and the non-pre-activation bottleneck that the official
R50+ViT checkpoints use. Module names follow timm's ResNetV2 (`stem.conv`, `stages.{i}.blocks.{j}.
conv1|norm1|...|downsample.conv`) so that timm hybrid checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's "SAME" padding: output size ceil(in / stride), the extra pixel at the bottom/right.

    The total, (ceil(in / stride) - 1) * stride + kernel - in, is computed in integers only: an ONNX
    trace then keeps it tied to the input's size (a float division and ceil made the graph's sizes
    constants, so an exported hybrid could not take other image sizes)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        total = max(kernel_size - 1 - (size - 1) % stride, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """Conv2d whose kernel is standardised (zero mean, unit variance per output channel) at each call."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        flat = weight.reshape(weight.shape[0], -1)
        mean = flat.mean(dim=1, keepdim=True)
        var = flat.var(dim=1, unbiased=False, keepdim=True)
        weight = ((flat - mean) / torch.sqrt(var + self.eps)).reshape_as(weight)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, weight, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups) followed by an optional ReLU."""

    def __init__(self, num_channels: int, apply_act: bool = True, num_groups: int = 32, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.apply_act else x


class DownsampleConv(nn.Module):
    """The projection shortcut: a strided 1x1 convolution and a norm without activation."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chans, out_chans, 1, stride=stride)
        self.norm = GroupNormAct(out_chans, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with GroupNorm; ReLU after the residual sum (non-pre-activation)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        mid_chans = out_chans // 4
        self.downsample = (
            DownsampleConv(in_chans, out_chans, stride) if stride != 1 or in_chans != out_chans else None
        )
        self.conv1 = StdConv2dSame(in_chans, mid_chans, 1)
        self.norm1 = GroupNormAct(mid_chans)
        self.conv2 = StdConv2dSame(mid_chans, mid_chans, 3, stride=stride)
        self.norm2 = GroupNormAct(mid_chans)
        self.conv3 = StdConv2dSame(mid_chans, out_chans, 1)
        # Zero-initialised last norm: each unit starts as the identity (BiT's init).
        self.norm3 = GroupNormAct(out_chans, apply_act=False)
        nn.init.zeros_(self.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                Bottleneck(in_chans if i == 0 else out_chans, out_chans, stride if i == 0 else 1)
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """7x7/2 standardised conv, GroupNorm + ReLU, 3x3/2 max-pool with SAME padding: stride 4."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chans, out_chans, 7, stride=2)
        self.norm = GroupNormAct(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)


class ResNetV2(nn.Module):
    """BiT ResNetV2 trunk without head: (B, C, H, W) -> (B, 256 * 2**(S-1), H / stride, W / stride).

    `layers` gives the units per stage: (3, 4, 6, 3) is ResNet-50, and the ViT paper's R50+ViT-B/16
    uses (3, 4, 9). The first stage keeps the resolution, every later one halves it.
    """

    def __init__(self, layers: tuple[int, ...], in_chans: int = 3, stem_chans: int = 64):
        super().__init__()
        self.stem = Stem(in_chans, stem_chans)
        stages, chans = [], stem_chans
        for index, depth in enumerate(layers):
            out_chans = 256 * 2**index
            stages.append(ResNetStage(chans, out_chans, depth, stride=1 if index == 0 else 2))
            chans = out_chans
        self.stages = nn.Sequential(*stages)
        self.num_features = chans
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
