"""A picture of one variant's architecture (the ViT paper's Figure 1 with its sizes), and a text summary.

    image -> patches -> patch embedding -> [class] token + positions -> L blocks -> norm -> pool -> head

`stages(config)` lists each stage with its output shape for one image and its parameters, counted on
the meta device (no memory); `summary(config)` prints them with the totals of `analysis.flops.count`;
`draw_architecture(config, path)` draws the pipeline and, below it, one encoder block: sequential
(x + MSA(LN(x)), x + MLP(LN(x))) or parallel with its branches side by side ("Three things" #1).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.config import ViTConfig
from ..models.vit import VisionTransformer
from .flops import count, human

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Stage:
    """One box of the drawing: its output shape for one image (no batch axis) and its parameters."""

    name: str
    shape: tuple[int, ...]
    num_params: int
    detail: str


def _num_params(*modules: torch.nn.Module | torch.nn.Parameter | None) -> int:
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Parameter):
            total += module.numel()
        elif module is not None:
            total += sum(p.numel() for p in module.parameters())
    return total


_POSITIONS = {
    "learn": "learned positions",
    "sincos2d": "fixed sin-cos positions",
    "rope": "rotary positions (in attention)",
    "none": "",
}
_POOLS = {
    "token": "class token",
    "gap": "mean of patches",
    "gap_fc_norm": "mean of patches, then LayerNorm",
    "map": "attention pooling (MAP)",
}


def stages(config: ViTConfig) -> list[Stage]:
    """The stages of Figure 1 for this config, in order; their parameters sum to the model's."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    height, width = config.img_size
    image = Stage("image", (config.in_chans, height, width), 0, f"{height}x{width} RGB")
    return [
        image,
        *_stem_stages(config, model),
        *_encoder_stages(config, model),
        *_head_stages(config, model),
    ]


def _stem_stages(config: ViTConfig, model: VisionTransformer) -> list[Stage]:
    """Image -> patch tokens: the hybrid's ResNet trunk and projection, or patches and their embedding."""
    rows, cols = config.grid_size
    patch, dim, num_patches = config.patch_size, config.embed_dim, config.num_patches
    if config.stem == "hybrid":
        backbone = model.patch_embed.backbone
        layers = "-".join(map(str, config.hybrid_layers))
        return [
            Stage(
                "ResNet trunk",
                (backbone.num_features, rows * patch, cols * patch),
                _num_params(backbone),
                f"BiT ResNetV2 {layers}, stride {config.stride // patch}",
            ),
            Stage(
                "patch embedding",
                (num_patches, dim),
                _num_params(model.patch_embed.proj),
                f"{patch}x{patch} cells -> {dim}",
            ),
        ]
    patch_dim = config.in_chans * patch * patch
    if config.stem == "hmlp":
        embedding = Stage(
            "hMLP stem",
            (num_patches, dim),
            _num_params(model.patch_embed),
            f"{patch // 4}x{patch // 4}, 2x2, 2x2 linear + LN + GELU",
        )
    else:
        embedding = Stage(
            "patch embedding",
            (num_patches, dim),
            _num_params(model.patch_embed),
            f"linear {patch_dim} -> {dim}",
        )
    patches = Stage("patches", (num_patches, patch_dim), 0, f"{rows}x{cols} patches of {patch}x{patch}")
    return [patches, embedding]


def _encoder_stages(config: ViTConfig, model: VisionTransformer) -> list[Stage]:
    """Tokens with their prefix and positions, the encoder blocks, the final norm."""
    sequence = (config.num_patches + config.num_prefix_tokens, config.embed_dim)
    registers = f"{config.num_reg_tokens} registers" if config.num_reg_tokens else ""
    class_token = "class token" if config.class_token else ""
    tokens = [text for text in (class_token, registers, _POSITIONS[config.pos_embed]) if text]
    if config.parallel == 1:
        detail = f"{config.depth} x [LN, MSA {config.num_heads} heads, LN, MLP {config.mlp_dim}]"
    else:
        detail = f"{config.depth} x [{config.parallel} x (LN, MSA), {config.parallel} x (LN, MLP)]"
    norm = "LayerNorm" if config.pool != "gap_fc_norm" else "none (norm after pooling)"
    return [
        Stage(
            "tokens",
            sequence,
            _num_params(model.cls_token, model.reg_token, model.pos_embed),
            " + ".join(tokens) or "patches only",
        ),
        Stage(
            "encoder blocks",
            sequence,
            _num_params(model.blocks),
            detail + f", {human(_num_params(model.blocks[0]))} each",
        ),
        Stage("norm", sequence, _num_params(model.norm), norm),
    ]


def _head_stages(config: ViTConfig, model: VisionTransformer) -> list[Stage]:
    """Pooling, the optional tanh pre-logits layer, the classifier head."""
    dim = config.embed_dim
    out = [Stage("pool", (dim,), _num_params(model.attn_pool, model.fc_norm), _POOLS[config.pool])]
    if config.representation_size:
        size = config.representation_size
        out.append(
            Stage("pre-logits", (size,), _num_params(model.pre_logits), f"linear {dim} -> {size} + tanh")
        )
    classes = config.num_classes
    out.append(Stage("head", (classes,), _num_params(model.head), f"linear -> {classes} classes"))
    return out


def summary(config: ViTConfig, name: str = "") -> str:
    """A text table of the stages (shape, parameters) and the totals of `count`."""
    counts = count(config)
    table = stages(config)
    width = max(len(stage.name) for stage in table)
    lines = [f"{name or 'model'} at {config.img_size[0]}x{config.img_size[1]}", ""]
    lines.append(f"{'stage':<{width}}  {'output shape':<16} {'parameters':>13}  detail")
    for stage in table:
        shape = "x".join(map(str, stage.shape))
        lines.append(f"{stage.name:<{width}}  {shape:<16} {stage.num_params:>13,}  {stage.detail}")
    lines.append(f"{'total':<{width}}  {'':<16} {counts.params:>13,}")
    lines.append("")
    lines.append(
        f"MACs {human(counts.macs)} ({counts.macs:,}), FLOPs {human(counts.flops)} ({counts.flops:,}) per image"
    )
    return "\n".join(lines)


# The drawing -------------------------------------------------------------------------------------------
_COLOURS = {
    "image": "#f2f2f2",
    "patches": "#e3eefa",
    "ResNet trunk": "#d5e8d4",
    "hMLP stem": "#d5e8d4",
    "patch embedding": "#fbe5d6",
    "tokens": "#fff2cc",
    "encoder blocks": "#dae8fc",
    "norm": "#eeeeee",
    "pool": "#e1d5e7",
    "pre-logits": "#f8cecc",
    "head": "#f8cecc",
}


def _box(
    axes, x: float, y: float, width: float, height: float, text: str, colour: str, size: float = 8
) -> None:
    from matplotlib.patches import FancyBboxPatch

    axes.add_patch(
        FancyBboxPatch(
            (x - width / 2, y - height / 2),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.015",
            facecolor=colour,
            edgecolor="#444444",
            linewidth=0.8,
        )
    )
    axes.text(x, y, text, ha="center", va="center", fontsize=size, wrap=True)


def _arrow(axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    axes.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="#444444", lw=0.9))


def _draw_block(axes, config: ViTConfig, top: float) -> None:
    """One encoder block below the pipeline: residual stream left to right, branches hanging off it."""
    stream_y = top - 0.08
    axes.text(
        0.5, top, f"encoder block (x{config.depth})", ha="center", va="center", fontsize=9, weight="bold"
    )
    axes.plot([0.08, 0.92], [stream_y, stream_y], color="#444444", lw=0.9)
    _arrow(axes, (0.9, stream_y), (0.94, stream_y))
    num_branches = config.parallel
    branch_height = min(0.09, 0.3 / num_branches)
    for part, (x_left, label, colour) in enumerate(
        (
            (0.14, f"MSA, {config.num_heads} heads", "#dae8fc"),
            (0.54, f"MLP {config.embed_dim}-{config.mlp_dim}-{config.embed_dim}", "#fbe5d6"),
        )
    ):
        sum_x = x_left + 0.32
        for branch in range(num_branches):
            y = stream_y - 0.1 - branch * (branch_height + 0.02) - branch_height / 2
            _box(axes, x_left + 0.05, y, 0.07, branch_height, "LN", "#eeeeee", 7)
            _box(axes, x_left + 0.18, y, 0.14, branch_height, label, colour, 7)
            _arrow(axes, (x_left + 0.085, y), (x_left + 0.11, y))
            axes.plot([x_left, x_left], [stream_y, y], color="#444444", lw=0.7)
            _arrow(axes, (x_left, y), (x_left + 0.015, y))
            axes.plot([x_left + 0.25, sum_x], [y, y], color="#444444", lw=0.7)
        bottom = stream_y - 0.1 - (num_branches - 1) * (branch_height + 0.02) - branch_height / 2
        axes.plot([sum_x, sum_x], [bottom, stream_y - 0.02], color="#444444", lw=0.7)
        _arrow(axes, (sum_x, stream_y - 0.04), (sum_x, stream_y - 0.015))
        axes.text(
            sum_x,
            stream_y,
            "+",
            ha="center",
            va="center",
            fontsize=11,
            weight="bold",
            bbox=dict(boxstyle="circle,pad=0.1", facecolor="white", edgecolor="#444444", lw=0.8),
        )
        if num_branches > 1:
            axes.text(
                x_left + 0.18,
                bottom - branch_height / 2 - 0.03,
                f"{num_branches} parallel {'attention' if part == 0 else 'MLP'} branches, summed",
                ha="center",
                va="center",
                fontsize=7,
                style="italic",
            )


def architecture_figure(config: ViTConfig, name: str = "") -> Figure:
    """The pipeline of `stages(config)` as boxes with shapes and parameters, and one block below."""
    from matplotlib.figure import Figure

    table = stages(config)
    counts = count(config)
    figure = Figure(figsize=(1.55 * len(table), 5.2))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_axis_off()
    title = f"{name or 'ViT'}: {human(counts.params)} parameters, {human(counts.macs, 'MACs')} at {config.img_size[0]}x{config.img_size[1]}"
    axes.text(0.5, 0.95, title, ha="center", va="center", fontsize=11, weight="bold")
    step = 1 / len(table)
    width, y = step * 0.78, 0.74
    for index, stage in enumerate(table):
        x = step * (index + 0.5)
        shape = " x ".join(map(str, stage.shape))
        params = f"{human(stage.num_params)} params" if stage.num_params else "no params"
        text = f"{stage.name}\n{shape}\n{params}"
        _box(axes, x, y, width, 0.17, text, _COLOURS.get(stage.name, "#ffffff"))
        detail = textwrap.fill(stage.detail, width=max(12, int(200 * step)))
        axes.text(x, y - 0.11, detail, ha="center", va="top", fontsize=6.5, color="#333333")
        if index:
            _arrow(axes, (x - step + width / 2, y), (x - width / 2, y))
    blocks_x = step * ([s.name for s in table].index("encoder blocks") + 0.5)
    axes.plot([blocks_x, 0.5], [y - 0.2, 0.52], color="#888888", lw=0.7, ls="--")
    _draw_block(axes, config, top=0.5)
    return figure


def draw_architecture(config: ViTConfig, path: str | os.PathLike, name: str = "") -> list[Path]:
    """Write the drawing as `path` with suffixes .png and .svg; returns both paths."""
    from .plots import save_figure

    figure = architecture_figure(config, name)
    path = Path(path)
    return [save_figure(figure, path.with_suffix(suffix)) for suffix in (".png", ".svg")]
