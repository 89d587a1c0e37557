"""Which layout a checkpoint is in, and which ViTConfig its tensors describe.

Detection looks at a few tell-tale keys per layout (`Layout.detect`), in an order where the more
specific layouts come first (DeiT III before timm, whose names it mostly shares). Config inference
runs on the native state dict, after conversion, so one function serves every layout. What tensors
cannot tell is taken from `known` (HF config.json, user overrides): the number of heads (else the
size table), the pooling of a class-token model without `fc_norm`, a non-square grid.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..files import CheckpointError
from ..models.config import SIZES, ViTConfig, check_fields, hybrid_stride
from .deit import DEIT
from .dinov3 import DINOV3
from .google import BIG_VISION, VIT_JAX
from .hf import DINOV2, DINOV2_REG, HF_VIT
from .keymap import Layout
from .mmpretrain import MMPRETRAIN
from .siglip import SIGLIP
from .timm import TIMM

log = logging.getLogger(__name__)

# Most specific first: DeiT III and DINOv2 share names with timm and HF ViT, DINOv2 with registers
# and DINOv3 with DINOv2.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (DINOV3, DINOV2_REG, DINOV2, HF_VIT, SIGLIP, MMPRETRAIN, BIG_VISION, VIT_JAX, DEIT, TIMM)
}

# The LayerScale init only seeds a fresh model; a checkpoint's gammas replace it. DeiT III's value.
LAYER_SCALE_INIT = 1e-5


def detect_layout(keys: Iterable[str], origin: str = "checkpoint", model_type: str | None = None) -> Layout:
    """The layout whose tell-tale keys the checkpoint has (or whose config.json model_type it names)."""
    keys = list(keys)
    if model_type is not None:
        for layout in LAYOUTS.values():
            if model_type in layout.model_types:
                return layout
        known = sorted(t for layout in LAYOUTS.values() for t in layout.model_types)
        raise CheckpointError(
            f"{origin}: config.json model_type {model_type!r} is not supported (known: {known})"
        )
    for layout in LAYOUTS.values():
        if layout.detect(keys):
            return layout
    raise CheckpointError(
        f"{origin}: not a vitkit checkpoint, and no known layout has its keys (first: {sorted(keys)[:6]}); "
        f"pass layout= one of {', '.join(LAYOUTS)}"
    )


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for key in state if (m := regex.match(key))})


def _square_side(rows: int) -> int | None:
    side = math.isqrt(rows)
    return side if side * side == rows and side > 0 else None


def infer_config(state: Mapping[str, torch.Tensor], origin: str = "checkpoint", **known: Any) -> ViTConfig:
    """The ViTConfig of a native-layout state dict. Fields in `known` are taken as given."""
    check_fields(ViTConfig, known, what="ViTConfig")
    notes: list[str] = []
    fields = _stem_fields(state, origin)
    fields.update(_encoder_fields(state, fields["embed_dim"], known, origin, notes))
    fields.update(_head_fields(state, known, notes))
    fields.update(_position_fields(state, fields, known, origin, notes))
    fields.update(known)
    try:
        config = ViTConfig(**fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{origin}: the tensors describe no valid ViTConfig: {error}") from error
    log.info("%s: inferred config (%s): %s", origin, "; ".join(notes) or "all from tensors", config)
    return config


def _stem_fields(state: Mapping[str, torch.Tensor], origin: str) -> dict[str, Any]:
    """The stem, input channels, patch size and width, from the patch projection."""
    if "patch_embed.backbone.stem.conv.weight" in state:
        stages = _indices(state, r"^patch_embed\.backbone\.stages\.(\d+)\.")
        units = [
            len(_indices(state, rf"^patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\.")) for s in stages
        ]
        in_chans = state["patch_embed.backbone.stem.conv.weight"].shape[1]
        fields = dict(stem="hybrid", hybrid_layers=tuple(units), in_chans=in_chans)
        projection = state["patch_embed.proj.weight"]
    elif "patch_embed.proj.0.weight" in state:
        fields = dict(stem="hmlp", in_chans=state["patch_embed.proj.0.weight"].shape[1])
        projection = state["patch_embed.proj.6.weight"]
    elif "patch_embed.proj.weight" in state:
        projection = state["patch_embed.proj.weight"]
        fields = dict(stem="patch", in_chans=projection.shape[1])
    else:
        raise CheckpointError(
            f"{origin}: no patch embedding found (patch_embed.proj.weight or a hybrid trunk)"
        )
    # The hMLP stem's first projection sees (P/4)x(P/4) pixels, its last 2x2 cells.
    if fields["stem"] == "hmlp":
        fields["patch_size"] = 4 * state["patch_embed.proj.0.weight"].shape[-1]
    else:
        fields["patch_size"] = projection.shape[-1]
    fields["embed_dim"] = projection.shape[0]
    return fields


def _encoder_fields(
    state: Mapping[str, torch.Tensor], width: int, known: dict, origin: str, notes: list[str]
) -> dict[str, Any]:
    """Depth, parallel branches, MLP width, qkv bias, LayerScale and the number of heads."""
    depth = _indices(state, r"^blocks\.(\d+)\.")
    if not depth:
        raise CheckpointError(f"{origin}: no encoder blocks found")
    branches = _indices(state, r"^blocks\.0\.attns\.(\d+)\.")
    attn, mlp = ("blocks.0.attns.0.", "blocks.0.ffns.0.") if branches else ("blocks.0.", "blocks.0.")
    fields: dict[str, Any] = dict(
        depth=len(depth), parallel=len(branches) or 1, qkv_bias=f"{attn}attn.qkv.bias" in state
    )
    if f"{mlp}mlp.fc1.weight" in state:
        fields["mlp_dim"] = state[f"{mlp}mlp.fc1.weight"].shape[0]
    if any(f"{attn}{name}.gamma" in state for name in ("ls1", "ls")):
        fields["layer_scale_init"] = LAYER_SCALE_INIT
    if "num_heads" not in known:
        size = next((s for s in SIZES.values() if s["embed_dim"] == width), None)
        if size is None:
            raise CheckpointError(
                f"{origin}: width {width} is not in the size table, so the number of heads is unknown; "
                f"pass num_heads="
            )
        fields["num_heads"] = size["num_heads"]
        notes.append(f"{size['num_heads']} heads from the size table for width {width}")
    return fields


def _head_fields(state: Mapping[str, torch.Tensor], known: dict, notes: list[str]) -> dict[str, Any]:
    """Class and register tokens, the pooling, the pre-logits layer and the number of classes."""
    fields: dict[str, Any] = {"class_token": "cls_token" in state}
    if "reg_token" in state:
        fields["num_reg_tokens"] = state["reg_token"].shape[1]
    if "attn_pool.latent" in state:
        fields["pool"] = "map"
    elif "fc_norm.weight" in state:
        fields["pool"] = "gap_fc_norm"
    elif fields["class_token"]:
        fields["pool"] = "token"
        if "pool" not in known:
            notes.append(
                "pool 'token' (a class token and no fc_norm; pass pool='gap' for a model that averages)"
            )
    else:
        fields["pool"] = "gap"
    if "pre_logits.fc.weight" in state:
        fields["representation_size"] = state["pre_logits.fc.weight"].shape[0]
    fields["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    return fields


def _position_fields(
    state: Mapping[str, torch.Tensor], fields: dict, known: dict, origin: str, notes: list[str]
) -> dict[str, Any]:
    """The grid (and whether the prefix tokens have slots) from the position embedding's length."""
    stride = fields["patch_size"] * (
        hybrid_stride(fields["hybrid_layers"]) if fields["stem"] == "hybrid" else 1
    )
    prefix = int(fields["class_token"]) + fields.get("num_reg_tokens", 0)
    out: dict[str, Any] = {}
    if "pos_embed" in state:
        out["pos_embed"] = "learn"
        rows = state["pos_embed"].shape[1]
        if "img_size" in known:
            size = known["img_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            patches = (size[0] // stride) * (size[1] // stride)
            if rows not in (patches, patches + prefix):
                raise CheckpointError(
                    f"{origin}: pos_embed has {rows} rows, but img_size {size} gives {patches} patches"
                )
            out["pos_embed_class_slot"] = rows == patches + prefix and prefix > 0
        else:
            with_slot = _square_side(rows - prefix) if prefix else None
            side = with_slot or _square_side(rows)
            if side is None:
                raise CheckpointError(
                    f"{origin}: pos_embed has {rows} rows, not a square grid (+ class slot); pass img_size="
                )
            out["pos_embed_class_slot"] = with_slot is not None or not prefix
            out["img_size"] = side * stride
            notes.append(f"grid {side}x{side} from pos_embed {tuple(state['pos_embed'].shape)}")
    elif "pos_embed" not in known:
        raise CheckpointError(
            f"{origin}: no position embedding in the checkpoint; pass pos_embed='sincos2d', 'rope' or 'none'"
        )
    elif "img_size" not in known:
        raise CheckpointError(
            f"{origin}: no learned position embedding to read the grid from; pass img_size="
        )
    if not prefix:
        out["pos_embed_class_slot"] = True  # nothing to give a slot to: keep the default
    return out
