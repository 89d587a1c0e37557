"""The fine-tuning recipe `vitkit finetune` chooses when no config is named: from the number of
labelled training images and the checkpoint's depth, one row of a small table.

Why not the ViT paper's recipe (SGD, lr 0.03 at batch 512): on a few hundred images its lr, scaled
down to a small batch, either barely moves the features or, unscaled, breaks them; either way it
lands below a linear probe of the same frozen features. The choices here are the ones that kept
fine-tuning above the probe on small sets in vitkit's own measurements (README, "Fine-tuning
defaults"; `benchmarks/transfer.py` reruns them):

- AdamW at a small lr stated for the batch actually used (no batch scaling), cosine to lr / 100 after
  a warm-up of a tenth of the run, weight decay 0.05, gradient clipping at norm 1;
- layer-wise lr decay (BEiT; `optim.layer_decay`): block i of L learns at lr x decay ** (L + 1 - i),
  so the early, general layers move least;
- LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): the zero head is first
  fitted as a logistic-regression probe on the frozen features (`fit_probe_head`), so the first
  fine-tuning steps follow a sensible head instead of pushing random-label gradients into the trunk;
  a trunk with BatchNorm (conv and hybrid stems) first gets the new data's statistics
  (`recalibrate_batch_norm`), which training would give it within an epoch anyway;
- the inputs the probe was fitted on: mild crops (scale 0.8-1) and hard labels (no label smoothing:
  smoothed targets pull a fitted head's confident logits down, with large gradients through the trunk
  from the first step; measured on the digits transfer, the first epoch fell 15 points below the
  probe with smoothing 0.1 and crops of scale 0.35-1);
- enough optimiser steps whatever the data's size (`min_steps`), within an epoch cap.

Every field is a config key, so `--set key=value` overrides each one; `describe` is what the run
prints in its first lines.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.vit import VisionTransformer
from .lora import LORA_ALPHA

HeadInit = Literal["probe", "zero"]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class RecipeRow:
    """One row of the table: what a data set of up to `max_images` labelled images gets."""

    max_images: float
    name: str
    batch_size: int
    lr: float
    min_steps: int
    max_epochs: int


# The smaller the set, the smaller the batch (more steps per epoch) and the more epochs it may take to
# reach min_steps. The small row is the one measured (README, "Fine-tuning defaults": two transfers
# of 400 and 1,438 images on a 2-core CPU); the larger rows follow it, not yet measured.
RECIPE_TABLE: tuple[RecipeRow, ...] = (
    RecipeRow(max_images=2_000, name="small", batch_size=32, lr=3e-4, min_steps=500, max_epochs=50),
    RecipeRow(max_images=20_000, name="medium", batch_size=64, lr=3e-4, min_steps=600, max_epochs=20),
    RecipeRow(max_images=math.inf, name="large", batch_size=128, lr=3e-4, min_steps=1_000, max_epochs=10),
)
# Layer decay by depth: a deep trunk's first blocks are damped harder (BEiT uses 0.65-0.75 at depth 12).
SHALLOW_DEPTH = 8
LAYER_DECAY = {"shallow": 0.85, "deep": 0.75}
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class FinetuneRecipe:
    """The resolved recipe: config fields (dotted keys) and the reasons behind them."""

    fields: dict[str, Any]
    head_init: HeadInit
    reasons: tuple[str, ...]
    steps_per_epoch: int


def choose_finetune_recipe(
    num_train_images: int, num_classes: int, depth: int, img_size: int
) -> FinetuneRecipe:
    """The recipe for `num_train_images` labelled images of `num_classes` classes, fine-tuning a
    checkpoint `depth` blocks deep, pre-trained at `img_size` px (kept: no resolution change)."""
    row = next(row for row in RECIPE_TABLE if num_train_images <= row.max_images)
    batch_size = min(row.batch_size, max(num_train_images // 4, 2))  # 4 steps per epoch at least
    steps_per_epoch = max(num_train_images // batch_size, 1)
    epochs = min(max(math.ceil(row.min_steps / steps_per_epoch), 1), row.max_epochs)
    layer_decay = LAYER_DECAY["shallow" if depth <= SHALLOW_DEPTH else "deep"]
    fields = {
        "optim.name": "adamw",
        "optim.lr": row.lr,
        "optim.lr_base_batch": 0,
        "optim.min_lr": row.lr / 100,
        "optim.weight_decay": 0.05,
        "optim.layer_decay": layer_decay,
        "optim.clip_grad": 1.0,
        "optim.schedule": "cosine",
        "optim.warmup_epochs": round(WARMUP_FRACTION * epochs, 3),
        "data.batch_size": batch_size,
        "data.img_size": img_size,
        # None: the probe head is fitted to the hard labels, and smoothed targets would pull its
        # confident logits down with large gradients through the trunk from the first step.
        "data.label_smoothing": 0.0,
        # Mild crops: the probe saw whole images, and strong crops of small images (8x8 digits)
        # give the head other inputs than it was fitted on (measured: README, "Fine-tuning defaults").
        "data.scale": (0.8, 1.0),
        "train.epochs": epochs,
        # About five evaluations a run: many short epochs would otherwise spend more time evaluating.
        "eval.every": max(epochs // 5, 1),
    }
    reasons = (
        f"{num_train_images} training images of {num_classes} classes: the '{row.name}' row "
        f"(<= {row.max_images:g} images): batch {batch_size}, lr {row.lr:g} as applied, "
        f">= {row.min_steps} steps in <= {row.max_epochs} epochs",
        f"depth {depth}: layer decay {layer_decay} ({'<=' if depth <= SHALLOW_DEPTH else '>'} {SHALLOW_DEPTH} blocks)",
        f"the checkpoint's resolution, {img_size} px",
    )
    return FinetuneRecipe(fields, "probe", reasons, steps_per_epoch)


def given_keys(overrides: list[str]) -> set[str]:
    """The config keys that `--set key=value` overrides name (they win over the recipe)."""
    return {override.partition("=")[0].strip().removeprefix("--") for override in overrides}


def apply_fields(experiment: Any, fields: dict[str, Any], skip: set[str] = frozenset()) -> Any:
    """The experiment with each `section.field` of `fields` set, except the keys in `skip`."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        if key not in skip:
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        experiment,
        **{
            section: dataclasses.replace(getattr(experiment, section), **values)
            for section, values in sections.items()
        },
    )


def describe(experiment: Any, num_trainable: int, num_params: int, freeze: str, head_init: str) -> list[str]:
    """The lines a fine-tuning run starts with: what trains, how, and for how long."""
    optim, data, train = experiment.optim, experiment.data, experiment.train
    batch = data.batch_size * train.accumulation
    if optim.name == "adamw":
        rule = f"AdamW (betas {optim.betas[0]:g}, {optim.betas[1]:g}), weight decay {optim.weight_decay:g}"
    elif optim.name == "muon":
        filters = " and the stem's filters past the pixels" if optim.muon_filters else ""
        rule = f"Muon on the blocks' matrices{filters}, AdamW (betas {optim.betas[0]:g}, {optim.betas[1]:g}) on the rest, "
        rule += f"weight decay {optim.weight_decay:g}"
    else:
        rule = f"SGD momentum {optim.momentum:g}, weight decay {optim.weight_decay:g}"
    return [
        f"optimizer: {rule}, clip grad norm {optim.clip_grad:g}",
        f"lr: {optim.lr:.3g} as applied at batch {batch} ({optim.lr_note or 'as given'})",
        f"schedule: {optim.schedule}, warm-up {optim.warmup_epochs:g} epochs, to min lr {optim.min_lr:.3g}",
        f"epochs: {train.epochs}" + (f", at most {train.max_steps} steps" if train.max_steps else ""),
        f"layer decay: {optim.layer_decay:g}" + (" (off)" if optim.layer_decay == 1 else ""),
        f"label smoothing: {data.label_smoothing:g}, mixup {data.mixup:g}, cutmix {data.cutmix:g}",
        f"trains: {trained(experiment, freeze)} ({num_trainable:,} of {num_params:,} parameters)",
        f"head: {'fitted as a logistic-regression probe on the frozen features first (LP-FT)' if head_init == 'probe' else 'zero-initialised'}",
    ]


def trained(experiment: Any, freeze: str) -> str:
    """What a freezing rule trains, in words."""
    if freeze == "lora":
        rank = experiment.model.lora_rank
        return f"lora: rank-{rank} adapters of every attention qkv and proj (scale {LORA_ALPHA / rank:g}), head, positions"
    return "every parameter" if freeze == "none" else freeze


# LP-FT: the head first, fitted on the frozen trunk ------------------------------------------------------
def image_batches(dataset: Dataset, transform: Callable, batch_size: int = 64) -> Iterator[Batch]:
    """Every image of `dataset`, eval-transformed, in order: (images (B, C, H, W), labels (B,))."""
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        yield (
            torch.stack([transform(image, None) for image, _ in samples]),
            torch.tensor([y for _, y in samples]),
        )


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Set the running statistics of every BatchNorm (the conv and hybrid stems) to the new data's
    (AdaBN, Li et al. 2016); returns the number of BatchNorm layers (0: nothing done). Fine-tuning
    moves them there within its first epoch anyway; a probe head fitted on the pre-training data's
    statistics would then meet other features (a CIFAR-10 conv stem on the 8x8 digits: the probe's
    88% fell to 23% when the statistics moved)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch
    was_training = model.training
    model.train()
    for images, _ in batches:
        model.forward_features(images)
    model.train(was_training)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return len(norms)


@torch.no_grad()
def pooled_features(model: VisionTransformer, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (pre-logits, (N, D)) and the labels (N,) of every batch, in eval mode."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    for images, batch_labels in batches:
        features.append(model.forward_head(model.forward_features(images), pre_logits=True).float())
        labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(features), torch.cat(labels)


PROBE_C_VALUES = (0.01, 0.1, 1.0, 10.0)
PROBE_MAX_ITER = 300


def choose_probe_c(z: np.ndarray, labels: np.ndarray, held_out: float = 0.2, seed: int = 0) -> float:
    """The inverse L2 strength C of the best accuracy on a held-out part of the (standardised)
    features, as `vitkit fewshot`'s probe chooses it; ties go to the stronger regularisation."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(z))
    num_held_out = max(1, round(held_out * len(z)))
    val, fit = order[:num_held_out], order[num_held_out:]
    if len(np.unique(labels[fit])) < 2:
        return 1.0
    scores = {}
    with warnings.catch_warnings():
        # A capped lbfgs run is still a fine probe; its warning would repeat once per C.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in PROBE_C_VALUES:
            probe = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER).fit(z[fit], labels[fit])
            scores[c] = float((probe.predict(z[val]) == labels[val]).mean())
    return max(scores, key=lambda c: (scores[c], -c))


def fit_probe_head(
    model: VisionTransformer, features: torch.Tensor, labels: torch.Tensor, c: float | None = None
) -> tuple[float, float]:
    """Set `model.head` to a multinomial logistic regression of `labels` on `features` (standardised,
    L2 strength 1 / C, scikit-learn's objective; C chosen on a held-out fifth when not given), the
    standardisation folded into the weights; the trunk is not touched. Returns (C, the probe's
    training accuracy)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z, y = ((x - mean) / std).numpy(), labels.numpy()
    c = choose_probe_c(z, y) if c is None else c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER).fit(z, y)
    weight = torch.as_tensor(probe.coef_)  # (C, D), or (1, D) for two classes
    bias = torch.as_tensor(probe.intercept_)
    if weight.shape[0] == 1:  # scikit-learn's binary form: class 1's logit minus class 0's
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    full_weight = torch.zeros(model.head.out_features, x.shape[1], dtype=torch.float64)
    full_bias = torch.zeros(model.head.out_features, dtype=torch.float64)  # classes absent from train: 0
    classes = torch.as_tensor(probe.classes_)
    full_weight[classes] = weight / std  # logits = ((x - mean) / std) @ W.T + b = x @ (W / std).T + b'
    full_bias[classes] = bias - (weight / std) @ mean
    with torch.no_grad():
        model.head.weight.copy_(full_weight)
        model.head.bias.copy_(full_bias)
    return c, float((probe.predict(z) == y).mean())
