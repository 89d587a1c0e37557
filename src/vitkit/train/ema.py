"""An exponential moving average of the weights (Polyak averaging), kept by the loop when
train.ema_decay > 0 and evaluated instead of the weights when eval.use_ema."""

from __future__ import annotations

import copy

import torch

from ..models.vit import VisionTransformer


class ModelEma:
    """An exponential moving average of the weights: ema = decay * ema + (1 - decay) * weights."""

    def __init__(self, model: VisionTransformer, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: VisionTransformer) -> None:
        for ema, current in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if ema.is_floating_point():
                ema.lerp_(current, 1.0 - self.decay)
            else:
                ema.copy_(current)
