"""LoRA ("Low-Rank Adaptation of Large Language Models", Hu et al., 2022) as a freezing rule.

Each dense layer of multi-head self-attention (`qkv`, `proj`) computes with W + (alpha / r) B A
instead of W: W (out, in) frozen, A (r, in) and B (out, r) trained. The head and the position
embeddings train too, as with `attention-only`.

- Where: a `torch.nn.utils.parametrize` parametrization of each layer's `weight`, so every reader of
  `linear.weight` sees the adapted weight whichever class runs: `Attention`, `FastAttention`'s three
  products, `FusedParallelBlock`'s folded weights and `FastLinear` alike, whether `apply_fast_paths`
  swapped the classes before or after the adapters were added. `models/` knows nothing of it.
- Init (the paper's section 4.1): B zero, so the adapted model starts as the base model exactly;
  A random, Kaiming-uniform as an nn.Linear weight (the paper says Gaussian; its code, `loralib`,
  and peft draw A so).
- Scale: alpha is fixed at `LORA_ALPHA` = 8, the paper's "alpha set to the first r we try, not
  tuned": the scale alpha / r is 1 at the default rank 8, and a run at another rank keeps the lr.
- Cost: the adapted weight is formed at each forward pass (a (out, r) @ (r, in) product and a sum),
  and autograd keeps it for the product's backward as it keeps a trained weight; what LoRA saves is
  the gradients and optimiser moments of W.
- State: the layer's keys become `<layer>.parametrizations.weight.original` (W) and
  `<layer>.parametrizations.weight.0.{lora_A, lora_B, scale}`. A training run's state keeps them so
  (resume restores them bitwise); every weights file a run leaves is `merged_state_dict` of it, a
  plain ViT's keys and shapes with W + scale B A in place of W.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..models.vit import Attention, VisionTransformer

DEFAULT_LORA_RANK = 8
LORA_ALPHA = 8.0
LORA_LAYERS = ("qkv", "proj")  # the dense layers of each attention module that take adapters
ORIGINAL = ".parametrizations.weight.original"
ADAPTER = ".parametrizations.weight.0."


class LowRankUpdate(nn.Module):
    """The parametrization W -> W + scale * B @ A of one dense layer's weight (out, in)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float = LORA_ALPHA):
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        # nn.Linear's init of a (rank, in) weight, as loralib and peft start A.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # B zero: B @ A = 0, so training starts from the base model's function.
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        # A buffer, so that a state dict alone can be merged (`merged_state_dict`).
        self.register_buffer("scale", torch.tensor(alpha / rank, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return merge(weight, self.lora_A, self.lora_B, self.scale)


def merge(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """W + scale * B @ A: (out, in) + (out, r) @ (r, in). The forward pass and the merge use this one
    expression, so a merged model computes what the adapted one did."""
    return weight + scale * (lora_B @ lora_A)


def check_rank(rank: int, width: int) -> None:
    """A rank is a whole number from 1 to the layer's width (beyond it B A is no longer low-rank)."""
    if type(rank) is not int or not 1 <= rank <= width:
        raise ValueError(
            f"LoRA rank {rank!r} (model.lora_rank, --lora-rank): expected a whole number from 1 to the "
            f"model's width {width}"
        )


def add_lora(model: VisionTransformer, rank: int = DEFAULT_LORA_RANK) -> None:
    """The `lora` freezing rule: rank-`rank` adapters on the qkv and proj layers of every attention
    module; they, the head and the position embeddings train, every other weight is frozen. A layer
    that already has an adapter keeps it."""
    check_rank(rank, model.config.embed_dim)
    model.requires_grad_(False)
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        for name in LORA_LAYERS:
            dense = getattr(module, name)
            if not parametrize.is_parametrized(dense, "weight"):
                parametrize.register_parametrization(dense, "weight", LowRankUpdate(dense.weight, rank))
            for adapter in dense.parametrizations.weight:
                adapter.requires_grad_(True)
    model.head.requires_grad_(True)
    if model.pos_embed is not None:
        model.pos_embed.requires_grad_(True)


def merge_lora(model: VisionTransformer) -> VisionTransformer:
    """Fold every adapter into its weight (W <- W + scale B A) and remove it, in place: the model is a
    plain ViT again, computing the same function. Returns the same model."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, LowRankUpdate) for p in module.parametrizations.weight
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with adapters -> the plain model's (pure: dict -> dict): each adapted layer's
    `weight` = W + scale B A, the adapter tensors gone. A dict without adapters comes back as it is."""
    if not any(key.endswith(ORIGINAL) for key in state):
        return state
    merged = {}
    for key, value in state.items():
        if key.endswith(ORIGINAL):
            layer = key.removesuffix(ORIGINAL)
            adapter = [state[f"{layer}{ADAPTER}{name}"] for name in ("lora_A", "lora_B", "scale")]
            merged[f"{layer}.weight"] = merge(value, *adapter).detach()
        elif ADAPTER not in key:
            merged[key] = value
    return merged
