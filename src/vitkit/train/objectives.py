"""Training objectives: one step of `(model, batch) -> (loss, metrics)`, chosen by name.

An objective only computes; the loop owns devices, precision, accumulation and the optimiser. To add
one (a masked-patch or distillation objective), write the function and register it in OBJECTIVES.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def supervised(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the logits against labels (B,) or soft targets (B, C) from mixup/smoothing.

    images (B, C, H, W) -> logits (B, classes); the loss is computed in float32 whatever the autocast
    dtype, since a bf16 log-softmax loses the small differences the gradient is made of.
    """
    images, targets = batch
    logits = model(images).float()
    loss = F.cross_entropy(logits, targets)
    labels = targets.argmax(dim=-1) if targets.ndim == 2 else targets
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy}


OBJECTIVES: dict[str, Objective] = {"supervised": supervised}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
