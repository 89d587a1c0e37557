"""Masked-patch pre-training runs: the experiment config and its loop (`vitkit pretrain`).

The model is `models.masked.MaskedPatchModel`: an encoder, a learnable [mask] embedding and a per-patch
head, trained on unlabelled images (labels are ignored). It is a task of the training loop of
`loop.py` (`masked_task`: another model, optimiser and objective, no evaluator), so it resumes bitwise from its checkpoints, runs under torchrun
(DDP or FSDP), and has accumulation, EMA, bf16 autocast, a time budget and the metrics logs. The
optimiser's groups add the mask embedding (no decay) and the head to the encoder's. At the end it
writes the encoder as a native checkpoint, `encoder.safetensors`, which `vitkit finetune` starts from,
and the whole pre-training model (encoder, mask embedding, head) as `masked_model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..convert.names import MASKED_KEY
from ..data import DataConfig
from ..data.datasets import derive_seed
from ..models.config import ViTConfig, check_fields
from ..models.masked import MaskedConfig, MaskedPatchModel
from ..registry import create_model
from . import distributed
from .experiment import ModelConfig, TrainConfig, check_train_config, load_experiment
from .loop import train
from .metrics import read_metrics
from .optim import OptimConfig, optimizer_over, param_groups
from .state import model_metadata, write_weights
from .task import Task, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainExperiment:
    """What `vitkit pretrain` runs. `tokenizer` ("package.module:factory") builds the user's tokenizer
    module for masked.target="tokens"; it is called with no arguments and must return an nn.Module."""

    model: ModelConfig = field(default_factory=ModelConfig)
    masked: MaskedConfig = field(default_factory=MaskedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str = ""

    def __post_init__(self) -> None:
        check_fields(ViTConfig, self.model.overrides, what="model.overrides (ViTConfig)")
        failed = check_train_config(self.train)
        if self.train.objective != "supervised":
            failed.append("train.objective is not used by pre-training: its objective is masked.*")
        if self.train.progressive_min_size:
            failed.append("train.progressive_min_size: pre-training trains at data.img_size (0: off)")
        if failed:
            raise ValueError(f"invalid pre-training experiment: {'; '.join(failed)}")
        if (self.masked.target == "tokens") != bool(self.tokenizer):
            raise ValueError("masked.target='tokens' and tokenizer='module:factory' go together")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def load_pretrain_experiment(config: str, overrides: list[str] = ()) -> PretrainExperiment:
    """A config name in configs/ or a .py file defining `experiment() -> PretrainExperiment`, with
    `section.field=value` overrides: `load_experiment`'s, type-checked the same way."""
    return load_experiment(config, overrides, kind=PretrainExperiment)


def build_tokenizer(spec: str) -> torch.nn.Module:
    """'package.module:factory' -> factory(), the user's tokenizer module."""
    module_name, _, factory = spec.partition(":")
    if not factory:
        raise ValueError(f"tokenizer {spec!r}: expected 'package.module:factory'")
    tokenizer = getattr(importlib.import_module(module_name), factory)()
    if not isinstance(tokenizer, torch.nn.Module):
        raise TypeError(f"tokenizer {spec!r} returned {type(tokenizer).__name__}, expected an nn.Module")
    return tokenizer


def build_masked_model(experiment: PretrainExperiment) -> MaskedPatchModel:
    """The encoder (no classifier head) at the data's resolution, with the masked-patch parts."""
    overrides = {"img_size": experiment.data.img_size, **experiment.model.overrides, "num_classes": 0}
    encoder = create_model(experiment.model.name, **overrides)
    tokenizer = build_tokenizer(experiment.tokenizer) if experiment.tokenizer else None
    return MaskedPatchModel(encoder, experiment.masked, tokenizer)


def build_pretrain_optimizer(model: MaskedPatchModel, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The encoder's groups, plus the mask embedding (no decay, like the class token) and the head."""
    groups = param_groups(model.encoder, cfg.weight_decay, cfg.layer_decay)
    groups.append(
        {"params": [model.mask_token], "names": ["mask_token"], "weight_decay": 0.0, "lr_scale": 1.0}
    )
    groups.append({"params": [model.head.weight], "names": ["head.weight"], "weight_decay": cfg.weight_decay})
    groups.append({"params": [model.head.bias], "names": ["head.bias"], "weight_decay": 0.0})
    return optimizer_over(groups, cfg, model.encoder.config.in_chans)


def masked_task(experiment: PretrainExperiment, env: distributed.Env, train_loader) -> Task:
    """Masked-patch pre-training as a task of the loop: the masked model and its optimiser groups, the
    masked objective, no evaluator, and the encoder (and the EMA's) as the run's outputs."""
    seed_everything(experiment.train.seed)
    model = build_masked_model(experiment)
    metadata = model_metadata(model.encoder.config, None, experiment.data.to_dict())
    metadata[MASKED_KEY] = json.dumps(model.config.to_dict())

    def objective(wrapped: torch.nn.Module, batch, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        images, _ = batch  # labels are not used
        # Masks from (seed, rank, step, micro-batch): a resumed run draws the same corruption.
        seed = derive_seed("masking", experiment.train.seed, env.rank, step, micro)
        return wrapped(images, torch.Generator().manual_seed(seed))

    def write_outputs(weights, ema, out_dir: Path) -> dict[str, Any]:
        encoder, whole = save_pretrained(weights, metadata, out_dir)
        written: dict[str, Any] = {"encoder": str(encoder), "masked_model": str(whole)}
        if ema is not None:
            written["encoder_ema"] = str(save_pretrained(ema, metadata, out_dir, "_ema")[0])
        rows = [row for row in read_metrics(out_dir / "metrics.jsonl") if row["kind"] == "train"]
        if rows:
            written.update({key: rows[-1][key] for key in ("loss", "accuracy") if key in rows[-1]})
        return written

    return Task(
        model=model,
        build_optimizer=lambda model: build_pretrain_optimizer(model, experiment.optim),
        objective=objective,
        metadata=metadata,
        write_outputs=write_outputs,
        outputs_use_ema=True,
    )


def pretrain(experiment: PretrainExperiment) -> dict[str, Any]:
    """Run masked-patch pre-training to the end on the training loop (resuming from the run folder's
    newest valid checkpoint, under the run folder's contract); a summary with the encoder's path."""
    return train(experiment, masked_task)


def save_pretrained(
    weights: dict[str, torch.Tensor], metadata: dict[str, str], out_dir: Path, suffix: str = ""
) -> tuple[Path, Path]:
    """The encoder as a native checkpoint (`vitkit.load`, `vitkit finetune`), and the whole masked
    model (encoder, mask embedding, head) beside it."""
    prefix = "encoder."
    encoder = {key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)}
    encoder_metadata = {key: value for key, value in metadata.items() if key != MASKED_KEY}
    encoder_path, whole = (
        out_dir / f"encoder{suffix}.safetensors",
        out_dir / f"masked_model{suffix}.safetensors",
    )
    write_weights(encoder_path, encoder, encoder_metadata)
    write_weights(whole, weights, metadata)
    return encoder_path, whole
