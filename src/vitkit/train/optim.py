"""The optimiser side of training: parameter groups, learning-rate schedules and freezing rules.

- Parameter groups: no weight decay on norms, biases, LayerScale, position embeddings and the class
  token (ViT paper's code and DeiT); optional layer-wise lr decay (BEiT), each group carrying its
  `lr_scale`.
- Schedules: linear warmup, then cosine or linear decay to `min_lr`; a pure function of the step,
  so the step is the schedule's whole state and a resumed run follows the same curve.
- Freezing rules, chosen by module type: `attention-only` is "Three things everyone should know
  about ViTs" #2 (fine-tune only the multi-head self-attention weights, plus head and positions);
  `lora` trains low-rank adapters of those same weights instead of the weights (`lora.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn

from ..models.vit import Attention, LayerScale, VisionTransformer
from .lora import DEFAULT_LORA_RANK, add_lora
from .muon import MuonWithAdamW

OptimizerName = Literal["adamw", "sgd", "muon"]
ScheduleName = Literal["cosine", "linear", "constant"]
FreezeRule = Literal["none", "attention-only", "head-only", "lora"]


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule. Defaults are DeiT's AdamW recipe scaled to a small batch."""

    name: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    # SGD only: the ViT paper fine-tunes with SGD, momentum 0.9.
    momentum: float = 0.9
    schedule: ScheduleName = "cosine"
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    # BEiT's layer-wise lr decay: block i of L gets lr * layer_decay ** (L - i); 1.0 turns it off.
    layer_decay: float = 1.0
    # Clip the global gradient norm to this value; 0 turns clipping off.
    clip_grad: float = 0.0
    # The batch `lr` (and `min_lr`) are stated for; another effective batch scales them linearly
    # (Goyal et al., DeiT), when the experiment is loaded. 0: the lr is used as given.
    lr_base_batch: int = 0
    # What the loading did to the lr, e.g. "0.03 at batch 512, scaled linearly to batch 16".
    lr_note: str = ""
    # Muon only: the stem's conv filters past the pixels take Muon too (as (O, I*kh*kw) matrices).
    muon_filters: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(beta) for beta in self.betas))
        for name, allowed in (("name", OptimizerName), ("schedule", ScheduleName)):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(
                    f"OptimConfig.{name}={getattr(self, name)!r}: expected one of {get_args(allowed)}"
                )
        checks = {
            "lr must be > 0": self.lr > 0,
            "weight_decay, warmup_epochs, min_lr and clip_grad must be >= 0": min(
                self.weight_decay, self.warmup_epochs, self.min_lr, self.clip_grad
            )
            >= 0,
            "layer_decay must be in (0, 1]": 0 < self.layer_decay <= 1,
            "muon_filters needs name='muon'": not self.muon_filters or self.name == "muon",
            "lr_base_batch must be in [0, 2^24]": isinstance(self.lr_base_batch, int)
            and 0 <= self.lr_base_batch <= 1 << 24,
            "betas must be two values in [0, 1)": len(self.betas) == 2
            and all(0 <= b < 1 for b in self.betas),
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid OptimConfig ({'; '.join(failed)}): {self}")


# Parameter groups -------------------------------------------------------------------------------------
def skips_weight_decay(module: nn.Module, param_name: str) -> bool:
    """Norm scales, biases, LayerScale, position embeddings and tokens are not decayed: decay would
    pull them towards zero, which has no regularising meaning for a shift, a scale or a position."""
    if param_name == "bias" or isinstance(module, (nn.LayerNorm, nn.GroupNorm, LayerScale)):
        return True
    if isinstance(module, VisionTransformer) and param_name in ("pos_embed", "cls_token", "reg_token"):
        return True
    return param_name == "latent"  # the query token of attention pooling


def layer_id(name: str, depth: int) -> int:
    """0 for the stem and tokens, i + 1 for block i, depth + 1 for the final norm, pooling and head."""
    if name.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Trainable parameters grouped by (weight decay, lr scale); frozen ones are left out."""
    depth = model.config.depth
    groups: dict[tuple[float, float], dict] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = 0.0 if skips_weight_decay(module, param_name) else weight_decay
            scale = layer_decay ** (depth + 1 - layer_id(name, depth))
            group = groups.setdefault(
                (decay, scale), {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale}
            )
            group["params"].append(param)
            group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    return list(groups.values())


def build_optimizer(model: VisionTransformer, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, SGD with momentum, or Muon + AdamW over `param_groups`; the lr is set each step by `set_lr`."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return optimizer_over(groups, cfg, model.config.in_chans)


def optimizer_over(groups: list[dict], cfg: OptimConfig, in_chans: int = 3) -> torch.optim.Optimizer:
    """cfg's optimiser over `groups` (`in_chans`: the image's channels, for `muon_filters`). AdamW
    takes torch's fused kernel (one pass over each parameter's tensors instead of a chain of foreach
    ops: 4.6x faster steps for ViT-Ti/16 on a 2-core CPU) where it runs: plain CPU or CUDA tensors of
    one floating dtype; sharded (DTensor) parameters keep foreach."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name == "muon":
        return MuonWithAdamW(groups, cfg.lr, cfg.betas, cfg.muon_filters, in_chans)
    params = [p for group in groups for p in group["params"]]
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    fused = fused and len({p.dtype for p in params}) == 1 and params[0].is_floating_point()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


# Schedules --------------------------------------------------------------------------------------------
def learning_rate(cfg: OptimConfig, step: float, total_steps: int, warmup_steps: int) -> float:
    """The lr at optimiser step `step` (0-based; fractional under a time budget): linear warmup from
    ~0 to cfg.lr over warmup_steps, then cosine, linear or constant decay to cfg.min_lr at total_steps."""
    if step < warmup_steps:  # a time budget's step is fractional: never past cfg.lr
        return cfg.lr * min((step + 1) / warmup_steps, 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def progressive_size(min_size: int, full_size: int, stride: int, progress: float, end: float) -> int:
    """The training image side at `progress` (0..1 of the schedule) under progressive resizing: from
    `min_size` at 0 linearly to `full_size` at `end`, rounded down to a multiple of `stride` (never
    below `min_size`), then `full_size`. `min_size` 0 (off) gives `full_size` throughout."""
    if not min_size or progress >= end:
        return full_size
    size = min_size + (full_size - min_size) * max(progress, 0.0) / end
    return max(min_size, int(size) // stride * stride)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# Freezing rules ----------------------------------------------------------------------------------------
def _train_all(model: VisionTransformer) -> None:
    model.requires_grad_(True)


def _train_attention_only(model: VisionTransformer) -> None:
    """ "Three things" #2: only the qkv and projection weights of every multi-head self-attention
    module learn, plus the new head and the position embeddings (needed at a new resolution)."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, Attention):
            module.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.pos_embed is not None:
        model.pos_embed.requires_grad_(True)


def _train_head_only(model: VisionTransformer) -> None:
    """A linear probe: the features stay fixed, only the classifier learns."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)


FREEZE_RULES: dict[str, Callable[[VisionTransformer], None]] = {
    "none": _train_all,
    "attention-only": _train_attention_only,
    "head-only": _train_head_only,
    "lora": add_lora,  # at DEFAULT_LORA_RANK; apply_freeze_rule passes another
}


def apply_freeze_rule(model: VisionTransformer, rule: str, lora_rank: int = DEFAULT_LORA_RANK) -> int:
    """Set requires_grad by the named rule (`lora` first adds its adapters, of rank `lora_rank`);
    returns the number of trainable parameters."""
    if rule not in FREEZE_RULES:
        raise ValueError(f"unknown freeze rule {rule!r}: expected one of {sorted(FREEZE_RULES)}")
    if rule == "lora":
        add_lora(model, lora_rank)
    else:
        FREEZE_RULES[rule](model)
    return model.num_params(trainable_only=True)
