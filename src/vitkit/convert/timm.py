"""timm's VisionTransformer layout (.pth / .safetensors): vitkit's own module names, read and written.

vitkit names its modules as timm does, so this table is the identity; it is still written out key
by key so that it states exactly which timm tensors a model has, and a checkpoint with anything else
(a distillation token, register tokens) is reported instead of silently dropped. It covers the
standard ViT, the R50 hybrids (`patch_embed.backbone.*`, timm's ResNetV2), LayerScale (`ls1.gamma`),
`no_embed_class` models (a position embedding without the class slot; the config is inferred from
its length) and the parallel `*_18x2` models (`blocks.{i}.attns.{b}` / `ffns.{b}`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..models.config import ViTConfig
from .keymap import KeyTable, Layout, Rule, State, renamed, rule, save_safetensors, save_torch


def same(*modules: str, suffixes: tuple[str, ...] = ("weight", "bias")) -> list[Rule]:
    """Identity rules for each module's tensors."""
    return [r for module in modules for r in renamed(module, module, *suffixes)]


def hybrid_trunk() -> list[Rule]:
    trunk = "patch_embed.backbone."
    unit = f"{trunk}stages.{{s}}.blocks.{{u}}."
    return [
        rule(f"{trunk}stem.conv.weight"),
        *same(f"{trunk}stem.norm", f"{unit}norm1", f"{unit}norm2", f"{unit}norm3", f"{unit}downsample.norm"),
        *same(f"{unit}conv1", f"{unit}conv2", f"{unit}conv3", f"{unit}downsample.conv", suffixes=("weight",)),
    ]


def block(prefix: str = "blocks.{i}.") -> list[Rule]:
    """A sequential block; LayerScale and the qkv bias are optional (rules only match what exists)."""
    return [
        *same(f"{prefix}norm1", f"{prefix}attn.qkv", f"{prefix}attn.proj", f"{prefix}norm2"),
        *same(f"{prefix}mlp.fc1", f"{prefix}mlp.fc2"),
        *same(f"{prefix}ls1", f"{prefix}ls2", suffixes=("gamma",)),
    ]


def parallel_block(prefix: str = "blocks.{i}.") -> list[Rule]:
    attn, ffn = f"{prefix}attns.{{b}}.", f"{prefix}ffns.{{b}}."
    return [
        *same(
            f"{attn}norm",
            f"{attn}attn.qkv",
            f"{attn}attn.proj",
            f"{ffn}norm",
            f"{ffn}mlp.fc1",
            f"{ffn}mlp.fc2",
        ),
        *same(f"{attn}ls", f"{ffn}ls", suffixes=("gamma",)),
    ]


HMLP_STEM = same(*(f"patch_embed.proj.{index}" for index in (0, 1, 3, 4, 6, 7)))

HEAD = [
    *same("norm", "fc_norm"),
    rule("attn_pool.latent"),
    *same(
        "attn_pool.q",
        "attn_pool.kv",
        "attn_pool.proj",
        "attn_pool.norm",
        "attn_pool.mlp.fc1",
        "attn_pool.mlp.fc2",
    ),
    *same("pre_logits.fc", "head"),
]

TIMM_TABLE = KeyTable(
    "timm",
    [
        *same("patch_embed.proj"),
        *HMLP_STEM,
        *hybrid_trunk(),
        rule("cls_token"),
        rule("reg_token"),
        rule("pos_embed"),
        *block(),
        *parallel_block(),
        *HEAD,
    ],
)


def timm_limits(config: ViTConfig) -> list[str]:
    checks = {
        f"the {config.stem} stem (timm's VisionTransformer has patch and hybrid stems)": config.stem
        in ("patch", "hybrid"),
        "sin-cos position embeddings (timm stores none for them)": config.pos_embed != "sincos2d",
        "rotary position embeddings (timm's VisionTransformer has none)": config.pos_embed != "rope",
    }
    return [message for message, ok in checks.items() if not ok]


def _timm_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    stem = "patch_embed.proj.weight" in keys or "patch_embed.backbone.stem.conv.weight" in keys
    return stem and any(key.startswith("blocks.0.") for key in keys)


def save_state(state: State, path: Path, config: ViTConfig) -> Path:
    """.safetensors, or a plain torch dict of tensors for any other suffix (.pth, .bin)."""
    if path.suffix == ".safetensors":
        return save_safetensors(state, path)
    return save_torch(dict(state), path)


TIMM = Layout(
    name="timm",
    description="timm VisionTransformer state dict (.pth / .safetensors)",
    table=TIMM_TABLE,
    detect=_timm_keys,
    limits=timm_limits,
    # timm resamples with antialiased bicubic interpolation (resample_abs_pos_embed).
    numerics={"pos_embed_resample": "bicubic_antialias"},
    save=save_state,
)
