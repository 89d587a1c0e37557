"""Masked-patch pre-training runs: the experiment config and its loop (`vitkit pretrain`).

The model is `models.masked.MaskedPatchModel`: an encoder, a learnable [mask] embedding and a per-patch
head, trained on unlabelled images (labels are ignored). The loop reuses the training system's parts:
the data pipeline, the optimiser's parameter groups (no decay on norms, biases, positions, tokens and
the mask embedding) and its warmup-cosine schedule, one autocast context. Each epoch it writes the
encoder as a native checkpoint, `encoder.safetensors`, which `vitkit finetune` starts from, and the
whole pre-training model (encoder, mask embedding, head) as `masked_model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from ..data import DataConfig, build_loader
from ..data.datasets import derive_seed
from ..io import atomic_write, save
from ..models.config import ViTConfig, check_fields
from ..models.masked import MaskedConfig, MaskedPatchModel
from ..registry import create_model
from . import distributed
from .loop import ModelConfig, OptimConfig, TrainConfig, config_dirs, seed_everything
from .optim import learning_rate, param_groups, set_lr

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        if self.train.precision == "fp16":
            raise ValueError("pre-training supports precision fp32 and bf16")
        if (self.masked.target == "tokens") != bool(self.tokenizer):
            raise ValueError("masked.target='tokens' and tokenizer='module:factory' go together")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, overrides: list[str]) -> PretrainExperiment:
        """`section.field=value` overrides (values parsed as YAML); unknown names are errors."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep:
                raise ValueError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-3")
            parsed = yaml.safe_load(value)
            section, _, name = key.strip().removeprefix("--").partition(".")
            if not name:
                top[section] = parsed
            elif section == "model" and name.startswith("overrides."):
                sections.setdefault("model", {}).setdefault("overrides", dict(self.model.overrides))
                sections["model"]["overrides"][name.removeprefix("overrides.")] = parsed
            else:
                sections.setdefault(section, {})[name] = parsed
        check_fields(PretrainExperiment, {**sections, **top}, what="pretrain experiment section")
        changed = {}
        for section, values in sections.items():
            current = getattr(self, section)
            check_fields(type(current), values, what=f"{section} config")
            changed[section] = dataclasses.replace(current, **values)
        return dataclasses.replace(self, **changed, **top)


def load_pretrain_experiment(config: str, overrides: list[str] = ()) -> PretrainExperiment:
    """A config name in configs/ or a .py file defining `experiment() -> PretrainExperiment`."""
    path = Path(config)
    if path.suffix != ".py":
        found = [folder / f"{config}.py" for folder in config_dirs() if (folder / f"{config}.py").exists()]
        if not found:
            raise FileNotFoundError(f"no config named {config!r} in {', '.join(map(str, config_dirs()))}")
        path = found[0]
    spec = importlib.util.spec_from_file_location(f"vitkit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    experiment = module.experiment()
    if not isinstance(experiment, PretrainExperiment):
        raise TypeError(
            f"{path}: experiment() returned {type(experiment).__name__}, expected PretrainExperiment"
        )
    return experiment.replace(list(overrides))


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
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def pretrain(experiment: PretrainExperiment) -> dict[str, Any]:
    """Run masked-patch pre-training to the end; returns a summary with the encoder's path."""
    cfg = experiment.train
    env = distributed.setup(cfg.device)
    if env.world_size > 1:
        raise ValueError("vitkit pretrain runs on one process; use vitkit train for multi-process runs")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(experiment.to_dict(), indent=1) + "\n"
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(config_json))
    seed_everything(cfg.seed)
    loader = build_loader(experiment.data, "train")
    model = build_masked_model(experiment).to(env.device).train()
    model.encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    optimizer = build_pretrain_optimizer(model, experiment.optim)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = round(experiment.optim.warmup_epochs * steps_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = _DTYPES.get(cfg.precision, torch.float32)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    step, started, row = 0, time.perf_counter(), {}
    for epoch in range(cfg.epochs):
        if step >= last_step:
            break
        loader.set_epoch(epoch)
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for images, _ in bar:
            lr = learning_rate(experiment.optim, step, total_steps, warmup_steps)
            set_lr(optimizer, lr)
            # Masks from (seed, step): a rerun draws the same corruption at every step.
            generator = torch.Generator().manual_seed(derive_seed("masking", cfg.seed, step))
            with torch.autocast(env.device.type, dtype=dtype, enabled=cfg.precision != "fp32"):
                loss, metrics = model(images.to(env.device), generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite pre-training loss {loss.item()} at step {step}")
            loss.backward()
            if experiment.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trainable, experiment.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == last_step:
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "time_s": time.perf_counter() - started,
                    **metrics,
                }
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            if step >= last_step:
                break
        bar.close()
        paths = save_pretrained(model, out_dir)
        print(f"pretrain epoch {epoch + 1}: loss {metrics['loss']:.4f}; wrote {paths[0]}", file=sys.stderr)
    return {
        "out_dir": str(out_dir),
        "steps": step,
        "time_s": round(time.perf_counter() - started, 2),
        "encoder": str(out_dir / "encoder.safetensors"),
        **{key: value for key, value in row.items() if key in ("loss", "accuracy")},
    }


def save_pretrained(model: MaskedPatchModel, out_dir: Path) -> tuple[Path, Path]:
    """The encoder as a native checkpoint, and the whole masked model's tensors beside it."""
    encoder_path = save(model.encoder, out_dir / "encoder.safetensors")
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", "vitkit.masked": json.dumps(model.config.to_dict())}
    whole = out_dir / "masked_model.safetensors"
    atomic_write(whole, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return encoder_path, whole
