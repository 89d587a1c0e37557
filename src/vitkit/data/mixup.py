"""Mixup and CutMix as batch -> batch, with label smoothing (timm's `Mixup`, batch mode).

(images float (B, 3, H, W), labels long (B,)) -> (images, soft targets float (B, num_classes)).
Each image is mixed with its mirror in the batch (`flip(0)`), and the targets with the same weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) -> (B, num_classes): 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """lam * target(label) + (1 - lam) * target(mirror's label); each row sums to 1."""
    targets = one_hot(labels, num_classes, smoothing)
    return lam * targets + (1 - lam) * targets.flip(0)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[tuple[int, int, int, int], float]:
    """A box of side fraction sqrt(1 - lam) around a uniform centre, clipped to the image.

    Returns ((top, bottom, left, right), lam corrected to the clipped box: 1 - box area / image area).
    """
    cut_height, cut_width = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    center_y = int(torch.randint(0, height, (), generator=generator))
    center_x = int(torch.randint(0, width, (), generator=generator))
    top, bottom = max(center_y - cut_height // 2, 0), min(center_y + cut_height // 2, height)
    left, right = max(center_x - cut_width // 2, 0), min(center_x + cut_width // 2, width)
    return (top, bottom, left, right), 1 - (bottom - top) * (right - left) / (height * width)


class Mixup:
    """With probability `prob` a batch is mixed: by CutMix with probability `switch_prob` when both
    alphas are positive (else by whichever is), lam ~ Beta(alpha, alpha). Targets are always soft
    and smoothed, so with both alphas 0 this is label smoothing alone. Defaults are DeiT's."""

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam = 1 means no mixing."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return 1.0, False
        if torch.rand((), generator=generator) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(torch.rand((), generator=generator) < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        # torch's Beta sampler takes no generator; numpy's, seeded from ours, keeps runs reproducible.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
        return float(rng.beta(alpha, alpha)), use_cutmix

    def mix(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        lam: float,
        use_cutmix: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix with the given lam; CutMix pastes the mirror's box and corrects lam to its area."""
        if lam < 1 and use_cutmix:
            (top, bottom, left, right), lam = cutmix_box(*images.shape[-2:], lam, generator)
            images = images.clone()
            images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        elif lam < 1:
            images = lam * images + (1 - lam) * images.flip(0)
        return images, mix_targets(labels, self.num_classes, lam, self.label_smoothing)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self.sample(generator)
        return self.mix(images, labels, lam, use_cutmix, generator)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c * log softmax(logits)_c; targets (B, C) rows sum to 1."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
