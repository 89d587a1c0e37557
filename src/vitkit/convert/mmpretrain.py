"""mmpretrain (MMClassification) VisionTransformer layout: read and write.

`backbone.patch_embed.projection`, `backbone.cls_token`, `backbone.pos_embed` (with the class slot),
blocks `backbone.layers.{i}.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1}` with
optional LayerScale `attn.gamma1.weight` / `ffn.gamma2.weight`. Files are `{"state_dict": ...}` .pth
as mmpretrain saves them (or .safetensors). Two outputs of the backbone map onto vitkit's pools:

- `out_type='cls_token'`, `final_norm=True`: the final norm `backbone.ln1` on every token, the class
  token to `VisionTransformerClsHead` (`head.layers.{pre_logits,head}`): pool "token".
- `out_type='avg_featmap'`, `final_norm=False` (the MAE and BEiT-style fine-tuning configs): the
  mean of the patch tokens, class token excluded, normalised by `backbone.ln2`, then
  `LinearClsHead` (`head.fc`): pool "gap_fc_norm", `ln2` being timm's `fc_norm`. A
  `VisionTransformerClsHead` on the averaged feature reads too (and is written for a model with a
  pre-logits layer, which `LinearClsHead` lacks).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..files import CheckpointError
from ..models.config import ViTConfig
from .keymap import KeyTable, Layout, State, renamed, rule, save_safetensors, save_torch

_LAYER = "backbone.layers.{i}."

_BACKBONE = [
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
    # final_norm=True: every token; out_type='avg_featmap': the mean of the patch tokens.
    *renamed("norm", "backbone.ln1"),
    *renamed("fc_norm", "backbone.ln2"),
]

MMPRETRAIN_TABLE = KeyTable(
    "mmpretrain",
    [
        *_BACKBONE,
        *renamed("pre_logits.fc", "head.layers.pre_logits"),
        *renamed("head", "head.layers.head"),
    ],
)
MMPRETRAIN_LINEAR_HEAD_TABLE = KeyTable("mmpretrain", [*_BACKBONE, *renamed("head", "head.fc")])


def _choose_table(keys: list[str], config: ViTConfig | None) -> KeyTable:
    """LinearClsHead (`head.fc`) or VisionTransformerClsHead (`head.layers`): by the checkpoint's
    keys when reading; when writing, LinearClsHead for an averaging model without pre-logits layer,
    as mmpretrain's avg_featmap configs have."""
    if config is not None:
        linear = config.pool == "gap_fc_norm" and not config.representation_size
        return MMPRETRAIN_LINEAR_HEAD_TABLE if linear else MMPRETRAIN_TABLE
    names = set(keys)
    if "backbone.ln1.weight" in names and "backbone.ln2.weight" in names:
        raise CheckpointError(
            "mmpretrain: out_type='avg_featmap' with final_norm=True (backbone.ln1 on every token, then "
            "backbone.ln2 on their mean) is not supported; vitkit's averaging pools have one of the two norms"
        )
    return MMPRETRAIN_LINEAR_HEAD_TABLE if "head.fc.weight" in names else MMPRETRAIN_TABLE


def mmpretrain_limits(config: ViTConfig) -> list[str]:
    checks = {
        f"stem {config.stem!r} (mmpretrain's VisionTransformer has a patch stem)": config.stem == "patch",
        "parallel blocks": config.parallel == 1,
        "register tokens": config.num_reg_tokens == 0,
        f"pool {config.pool!r} (the class token maps onto out_type='cls_token', the patch mean normalised "
        "after pooling, 'gap_fc_norm', onto 'avg_featmap')": config.pool in ("token", "gap_fc_norm"),
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
    description="mmpretrain / MMClassification VisionTransformer + VisionTransformerClsHead or LinearClsHead",
    table=MMPRETRAIN_TABLE,
    detect=_mmpretrain_keys,
    limits=mmpretrain_limits,
    save=_save,
    choose_table=_choose_table,
    needs_class_slot=True,
)
