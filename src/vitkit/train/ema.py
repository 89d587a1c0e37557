"""An exponential moving average of the weights (Polyak averaging), kept by the loop when
train.ema_decay > 0 and evaluated instead of the weights when eval.use_ema."""

from __future__ import annotations

import copy

import torch

from ..models.vit import VisionTransformer


class ModelEma:
    """An exponential moving average of the weights: ema = d * ema + (1 - d) * weights.

    d is `decay`; with `warmup`, it is min(decay, (1 + n) / (10 + n)) at the n-th update (n from 1,
    TensorFlow's ExponentialMovingAverage with num_updates), so that a short run's average is not
    dominated by the initial weights: after 1,000 updates a fixed 0.999 keeps 37% of them, the
    warmup under 1e-20. The warmup reaches a decay of 0.999 at the 8,990th update."""

    def __init__(self, model: VisionTransformer, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: VisionTransformer, num_updates: int = 1) -> None:
        """Average in `model`'s weights as the `num_updates`-th update (1 for the first)."""
        decay = self.decay_at(num_updates)
        for ema, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if ema.is_floating_point():
                ema.lerp_(current, 1.0 - decay)
            else:
                ema.copy_(current)
