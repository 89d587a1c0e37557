"""What a run trains, as parts the loop composes: the model, its optimiser, its objective, the
evaluator (or none) and the files it leaves at the end.

The loop (`loop.py`) is the same for every task. Supervised classification is `classification_task`
here; masked-patch pre-training (`pretrain.py`) is another model, optimiser and objective, no
evaluator, and the encoder as its output.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DataConfig
from ..io import load as load_model
from ..models.vit import VisionTransformer
from ..registry import create_model
from .evaluator import Evaluator
from .experiment import Experiment, ModelConfig
from .objectives import get_objective
from .optim import apply_freeze_rule, build_optimizer
from .state import model_metadata, write_weights
from .whiten import whiten_first_conv

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
# (model, batch, step, micro-batch) -> (loss, metrics), under the loop's autocast context.
Objective = Callable[[torch.nn.Module, Batch, int, int], tuple[torch.Tensor, dict]]
# (final weights, final EMA weights or None, run folder) -> the paths written, for the summary.
WriteOutputs = Callable[[dict[str, torch.Tensor], "dict[str, torch.Tensor] | None", Path], dict[str, Any]]


@dataclass
class Task:
    """The parts of a run that differ between tasks. `model` is built on the CPU; the loop moves it,
    applies the fast paths and wraps it. `build_optimizer` takes it after FSDP sharded it."""

    model: torch.nn.Module
    build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    objective: Objective
    metadata: dict[str, str]
    write_outputs: WriteOutputs
    evaluator: Evaluator | None = None
    outputs_use_ema: bool = False  # whether write_outputs is given the EMA weights too


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, img_size: int, num_classes: int) -> VisionTransformer:
    """The model of `cfg` for this data: a registered name, or a checkpoint via `vitkit.load`."""
    overrides = {"img_size": img_size, "num_classes": num_classes, **cfg.overrides}
    if cfg.init_from:
        model = load_model(cfg.init_from, **overrides)
        log.info("model: initialised from %s with overrides %s", cfg.init_from, overrides)
    else:
        model = create_model(cfg.name, **overrides)
    num_trainable = apply_freeze_rule(model, cfg.freeze, cfg.lora_rank)
    rule = f"lora, rank {cfg.lora_rank}" if cfg.freeze == "lora" else cfg.freeze
    log.info("model: %s parameters, %s trainable (%s)", f"{model.num_params():,}", f"{num_trainable:,}", rule)
    return model


def check_classes(data: DataConfig, classes: list[str]) -> None:
    """A classifier needs two classes at least to learn anything: with one, every loss is 0 and every
    prediction right from the first step. (Pre-training reads one unlabelled folder; it has no such need.)"""
    if len(classes) >= 2:
        return
    where = (
        Path(data.root) / "train"
        if data.dataset in ("imagefolder", "shards")
        else f"data.dataset={data.dataset!r}"
    )
    found = f"one class, {classes[0]!r}" if classes else "no class"
    raise ValueError(
        f"{where}: {found}; classification needs 2 classes at least (one sub-folder of images per class)"
    )


def classification_task(experiment: Experiment, env, train_loader) -> Task:
    """Supervised classification: the configured objective, evaluated on eval.split, `last.safetensors`."""
    check_classes(experiment.data, train_loader.classes)
    objective = get_objective(experiment.train.objective)
    evaluator = Evaluator.build(experiment, env, train_loader.classes)
    # The same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
    seed_everything(experiment.train.seed)
    model = build_model(experiment.model, experiment.data.img_size, train_loader.num_classes)
    if experiment.model.whiten_images:
        whiten_first_conv(model, (images for images, _ in train_loader), experiment.model.whiten_images)
    metadata = model_metadata(model.config, train_loader.classes, experiment.data.to_dict())

    def write_outputs(weights: dict[str, torch.Tensor], ema, out_dir: Path) -> dict[str, Any]:
        write_weights(out_dir / "last.safetensors", weights, metadata)
        return {"last": str(out_dir / "last.safetensors")}

    return Task(
        model=model,
        build_optimizer=lambda model: build_optimizer(model, experiment.optim),
        objective=lambda model, batch, step, micro: objective(model, batch),
        metadata=metadata,
        write_outputs=write_outputs,
        evaluator=evaluator,
    )
