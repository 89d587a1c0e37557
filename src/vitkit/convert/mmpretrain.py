"""mmpretrain (MMClassification) VisionTransformer layout: read and write.

`backbone.patch_embed.projection`, `backbone.cls_token`, `backbone.pos_embed` (with the class slot),
blocks `backbone.layers.{i}.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1}` with
optional LayerScale `attn.gamma1.weight` / `ffn.gamma2.weight`, the final norm `backbone.ln1`
(`final_norm=True`), and `VisionTransformerClsHead` as `head.layers.{pre_logits,head}`. Files are
`{"state_dict": ...}` .pth as mmpretrain saves them (or .safetensors).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..models.config import ViTConfig
from .keymap import KeyTable, Layout, State, renamed, rule, save_safetensors, save_torch

_LAYER = "backbone.layers.{i}."

MMPRETRAIN_TABLE = KeyTable(
    "mmpretrain",
    [
        *renamed("patch_embed.proj", "backbone.patch_embed.projection"),
        rule("cls_token", "backbone.cls_token"),
        rule("pos_embed", "backbone.pos_embed"),
        *renamed("blocks.{i}.norm1", f"{_LAYER}ln1"),
        *renamed("blocks.{i}.attn.qkv", f"{_LAYER}attn.qkv"),
        *renamed("blocks.{i}.attn.proj", f"{_LAYER}attn.proj"),
        rule("blocks.{i}.ls1.gamma", f"{_LAYER}attn.gamma1.weight"),
        *renamed("blocks.{i}.norm2", f"{_LAYER}ln2"),
        *renamed("blocks.{i}.mlp.fc1", f"{_LAYER}ffn.layers.0.0"),
        *renamed("blocks.{i}.mlp.fc2", f"{_LAYER}ffn.layers.1"),
        rule("blocks.{i}.ls2.gamma", f"{_LAYER}ffn.gamma2.weight"),
        *renamed("norm", "backbone.ln1"),
        *renamed("pre_logits.fc", "head.layers.pre_logits"),
        *renamed("head", "head.layers.head"),
    ],
)


def mmpretrain_limits(config: ViTConfig) -> list[str]:
    checks = {
        f"stem {config.stem!r} (mmpretrain's VisionTransformer has a patch stem)": config.stem == "patch",
        "parallel blocks": config.parallel == 1,
        "register tokens": config.num_reg_tokens == 0,
        "a model without class token": config.class_token,
        f"pool {config.pool!r} (only the class token maps onto VisionTransformerClsHead)": config.pool
        == "token",
        f"position embedding {config.pos_embed!r}": config.pos_embed == "learn",
    }
    return [message for message, ok in checks.items() if not ok]


def _mmpretrain_keys(keys: Iterable[str]) -> bool:
    return "backbone.patch_embed.projection.weight" in set(keys)


def _save(state: State, path: Path, config: ViTConfig) -> Path:
    if path.suffix == ".safetensors":
        return save_safetensors(state, path)
    return save_torch({"state_dict": dict(state)}, path)


MMPRETRAIN = Layout(
    name="mmpretrain",
    description="mmpretrain / MMClassification VisionTransformer + VisionTransformerClsHead",
    table=MMPRETRAIN_TABLE,
    detect=_mmpretrain_keys,
    limits=mmpretrain_limits,
    save=_save,
    needs_class_slot=True,
)
