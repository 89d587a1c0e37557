"""Parameters and compute of a model at a resolution, counted per module on the meta device.

Two numbers, named apart:
- `macs`: multiply-accumulates of every dense layer, convolution and attention product (q k^T and
  attention x v), the head included, plus 5 operations per element for each affine normalisation
  (fvcore's estimate; ViT-B/16 at 224: 17.58 G).
- `flops`: floating-point operations, 2 per multiply-accumulate, plus the same normalisation ops.
Biases, activations, softmax and residual additions are not counted. Published tables count in
other conventions (fvcore without the head, MMClassification 0.x without attention, torch's
FlopCounterMode without norms): `analysis.conventions` computes each from the config, and its
`vitkit` convention equals `count(...).macs`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from ..models.config import ViTConfig
from ..models.vit import Attention, AttentionPool, VisionTransformer

NORM_OPS_PER_ELEMENT = 5  # mean, subtract, variance, divide, affine: fvcore's count for an affine norm


@dataclass
class Counts:
    """Totals and a per-component breakdown (stem, attention, mlp, norms, head)."""

    params: int
    macs: int
    flops: int
    img_size: tuple[int, int]
    params_by_component: dict[str, int] = field(default_factory=dict)
    macs_by_component: dict[str, int] = field(default_factory=dict)


def component_of(name: str) -> str:
    """Which part of Figure 1 a module or parameter name belongs to."""
    if name.startswith("patch_embed"):
        return "stem"
    if name in ("cls_token", "reg_token", "pos_embed"):
        return "tokens"
    if name.startswith("blocks."):
        if ".attn" in name:
            return "attention"
        if ".mlp" in name:
            return "mlp"
        return "norms"
    if name.startswith("norm"):
        return "norms"
    return "head"


def _recorder(part: str, macs: dict[str, int], norm_ops: dict[str, int]):
    """A forward hook adding one module's multiply-accumulates (or norm operations) to `part`."""

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            rows = output.numel() // module.out_features
            macs[part] += rows * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            kernel_height, kernel_width = module.kernel_size
            macs[part] += output.numel() * module.in_channels // module.groups * kernel_height * kernel_width
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            norm_ops["norms" if part != "stem" else "stem"] += NORM_OPS_PER_ELEMENT * inputs[0].numel()
        elif isinstance(module, Attention):
            batch, length, dim = inputs[0].shape
            macs[part] += 2 * batch * length * length * dim  # q k^T and attention x v, all heads
        elif isinstance(module, AttentionPool):
            batch, length, dim = inputs[0].shape
            macs[part] += 2 * batch * length * dim  # one query against every token

    return record


def count(
    model_or_config: VisionTransformer | ViTConfig, img_size: int | tuple[int, int] | None = None
) -> Counts:
    """Count a model (or build one from a config on the meta device) for one image at `img_size`: the
    plain model as built, each module called once (not one with `vitkit.fast` paths applied).

    From a config, whose blocks are all alike (one class, built from the same config), the model is
    built with one block and that block counted `depth` times, parameters included: the same numbers
    (a test compares) in a fraction of the time, building a ViT-H on the meta device costing seconds.
    A model passed in runs every block.
    """
    if isinstance(model_or_config, ViTConfig):
        with torch.device("meta"):
            model = VisionTransformer(replace(model_or_config, depth=1))
        repeats = model_or_config.depth
    else:
        model, repeats = model_or_config, 1
    config = model.config
    size = config.img_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)

    macs: dict[str, int] = defaultdict(int)
    norm_ops: dict[str, int] = defaultdict(int)
    block_macs: dict[str, int] = defaultdict(int)
    block_norm_ops: dict[str, int] = defaultdict(int)
    handles = []
    for name, module in model.named_modules():
        in_block = name.startswith("blocks.")
        totals = (block_macs, block_norm_ops) if in_block else (macs, norm_ops)
        handles.append(module.register_forward_hook(_recorder(component_of(name), *totals)))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, config.in_chans, *size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    for totals, block_totals in ((macs, block_macs), (norm_ops, block_norm_ops)):
        for part, value in block_totals.items():
            totals[part] += repeats * value

    params_by_component: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        params_by_component[component_of(name)] += param.numel() * (
            repeats if name.startswith("blocks.") else 1
        )
    total_matmul = sum(macs.values())
    total_norm = sum(norm_ops.values())
    by_component = dict(macs)
    for part, ops in norm_ops.items():
        by_component[part] = by_component.get(part, 0) + ops
    return Counts(
        params=sum(params_by_component.values()),
        macs=total_matmul + total_norm,
        flops=2 * total_matmul + total_norm,
        img_size=size,
        params_by_component=dict(params_by_component),
        macs_by_component=by_component,
    )


def human(number: float, unit: str = "") -> str:
    """86567656 -> '86.57 M'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= scale:
            return f"{number / scale:.2f} {prefix}{unit}"
    return f"{number:.0f} {unit}".rstrip()
