"""HuggingFace SigLIP and SigLIP 2 image towers (read; write as SiglipVisionModel).

`SiglipVisionModel` folders (model_type `siglip_vision_model`), and the image tower of two-tower
`SiglipModel` / `SiglipForImageClassification` folders (`siglip`, the config under `vision_config`;
SigLIP 2's fixed-resolution checkpoints use these classes too). The tower is a ViT without class
token: a Conv2d patch embedding, one learned position embedding per patch
(`embeddings.position_embedding`, an `nn.Embedding`), blocks `encoder.layers.{i}` with separate
q/k/v projections, `post_layernorm` on every token, and a MAP head (`head.probe`, a packed
`nn.MultiheadAttention`, `head.layernorm`, `head.mlp`): vitkit's pool "map", whose output is
`pooler_output`. `SiglipForImageClassification` instead classifies the mean of all tokens (pool
"gap"); its MAP head does not reach the logits and is dropped. The source computes with tanh GELU
(`gelu_pytorch_tanh`) and LayerNorm eps 1e-6; at another resolution `interpolate_pos_encoding=True`
resamples the grid bicubically (align_corners=False), which is vitkit's "bicubic".

SigLIP 2 NaFlex (`Siglip2VisionModel`, `siglip2_vision_model`; `Siglip2Model`, `siglip2`) embeds
patches flattened as (row, column, channel) with one Linear layer, which is the Conv2d of a patch
stem with its kernel reordered, and resizes the position grid to each image's patch grid with
antialiased bilinear interpolation ("bilinear_antialias"). For one image size per batch, without
padding, vitkit computes the same; variable-length batches with `pixel_attention_mask` padding are
NaFlex's own input format and not supported (feed images, one size per batch).

`vitkit convert --to siglip` writes a SiglipVisionModel folder (a model without class token, pooled by
a MAP head or not at all, no classifier); SigLIP towers convert to vitkit and timm too, and the
layouts that cannot hold them (HF ViT, mmpretrain, vit_jax) refuse in one line.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from ..files import CheckpointError, atomic_write
from ..models.config import ViTConfig
from .hf import GELU
from .keymap import (
    FUSE_QKV,
    Fix,
    KeyTable,
    Layout,
    State,
    Transform,
    drop_keys,
    rename_prefix,
    renamed,
    rule,
    save_safetensors,
)
from .names import MODEL_CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

_LAYER = "encoder.layers.{i}."

# nn.Embedding (patches, D) <-> vitkit's (1, patches, D).
EMBEDDING_ROWS = Transform("embedding_rows", lambda ts: ts[0].unsqueeze(0), lambda t, config: [t.squeeze(0)])

# The MAP head's packed in_proj, split by `split_packed_attention_pool` into the query and the
# key/value projections that vitkit's AttentionPool keeps apart.
_POOL_Q, _POOL_KV = "head.attention.q_in_proj", "head.attention.kv_in_proj"

SIGLIP_TABLE = KeyTable(
    "siglip",
    [
        *renamed("patch_embed.proj", "embeddings.patch_embedding"),
        rule("pos_embed", "embeddings.position_embedding.weight", transform=EMBEDDING_ROWS),
        *renamed("blocks.{i}.norm1", f"{_LAYER}layer_norm1"),
        *(
            rule(
                f"blocks.{{i}}.attn.qkv.{p}",
                *(f"{_LAYER}self_attn.{n}_proj.{p}" for n in ("q", "k", "v")),
                transform=FUSE_QKV,
            )
            for p in ("weight", "bias")
        ),
        *renamed("blocks.{i}.attn.proj", f"{_LAYER}self_attn.out_proj"),
        *renamed("blocks.{i}.norm2", f"{_LAYER}layer_norm2"),
        *renamed("blocks.{i}.mlp.fc1", f"{_LAYER}mlp.fc1"),
        *renamed("blocks.{i}.mlp.fc2", f"{_LAYER}mlp.fc2"),
        *renamed("norm", "post_layernorm"),
        rule("attn_pool.latent", "head.probe"),
        *renamed("attn_pool.q", _POOL_Q),
        *renamed("attn_pool.kv", _POOL_KV),
        *renamed("attn_pool.proj", "head.attention.out_proj"),
        *renamed("attn_pool.norm", "head.layernorm"),
        *renamed("attn_pool.mlp.fc1", "head.mlp.fc1"),
        *renamed("attn_pool.mlp.fc2", "head.mlp.fc2"),
        *renamed("head", "classifier"),
    ],
)


# Fixes ----------------------------------------------------------------------------------------------
def _split_packed_attention_pool(state: State) -> State:
    state = dict(state)
    for suffix in ("weight", "bias"):
        packed = state.pop(f"head.attention.in_proj_{suffix}")
        width = packed.shape[0] // 3
        state[f"{_POOL_Q}.{suffix}"], state[f"{_POOL_KV}.{suffix}"] = packed[:width], packed[width:]
    return state


SPLIT_PACKED_POOL = Fix(
    "split_packed_attention_pool",
    "the MAP head's nn.MultiheadAttention packs query, key and value in in_proj_weight/bias (3D rows); "
    "vitkit's AttentionPool has the query (D rows) and key/value (2D rows) as two Linear layers",
    needed=lambda state: "head.attention.in_proj_weight" in state and "head.attention.in_proj_bias" in state,
    apply=_split_packed_attention_pool,
)


def _unflatten_patch_embedding(state: State) -> State:
    """(D, p*p*C) Linear on (row, column, channel) patches -> the (D, C, p, p) Conv2d kernel."""
    weight = state["embeddings.patch_embedding.weight"]
    width, features = weight.shape
    for channels in (3, 1):
        side = math.isqrt(features // channels)
        if features % channels == 0 and side * side * channels == features:
            break
    else:
        raise CheckpointError(
            f"embeddings.patch_embedding.weight {tuple(weight.shape)}: {features} input features are not "
            "p * p * 3 or p * p * 1 (a square patch of RGB or grey pixels)"
        )
    kernel = weight.reshape(width, side, side, channels).permute(0, 3, 1, 2).contiguous()
    return {**state, "embeddings.patch_embedding.weight": kernel}


UNFLATTEN_NAFLEX_PATCHES = Fix(
    "unflatten_naflex_patch_embedding",
    "SigLIP 2 NaFlex embeds patches flattened as (row, column, channel) with a Linear layer; it is the "
    "Conv2d of vitkit's patch stem with the kernel reordered (the folder's patch_size and num_channels "
    "check the factorisation)",
    needed=lambda state: getattr(state.get("embeddings.patch_embedding.weight"), "ndim", 0) == 2,
    apply=_unflatten_patch_embedding,
)


def _classifier_keys(state: State) -> list[str]:
    return [key for key in state if key.startswith("head.")] if "classifier.weight" in state else []


DROP_UNUSED_MAP_HEAD = Fix(
    "drop_unused_map_head",
    "SiglipForImageClassification classifies the mean of the tokens; the tower's MAP head (head.*) is "
    "not on the path to its logits",
    needed=lambda state: bool(_classifier_keys(state)),
    apply=lambda state: {key: value for key, value in state.items() if key not in _classifier_keys(state)},
)

DROP_TEXT_TOWER = Fix(
    "drop_text_tower",
    "two-tower SiglipModel checkpoints hold the text tower (text_model.*) and the sigmoid loss's "
    "logit_scale / logit_bias beside the image tower",
    needed=lambda state: any(
        key.startswith("text_model.") or key in ("logit_scale", "logit_bias") for key in state
    ),
    apply=lambda state: {
        key: value
        for key, value in state.items()
        if not key.startswith("text_model.") and key not in ("logit_scale", "logit_bias")
    },
)


# config.json ------------------------------------------------------------------------------------------
NAFLEX_TYPES = ("siglip2", "siglip2_vision_model")
TWO_TOWER_TYPES = ("siglip", "siglip2")


def siglip_folder_config(config_json: dict) -> tuple[dict[str, object], dict[str, object]]:
    """(structure, numerics) of a SigLIP folder; two-tower folders nest the tower under vision_config."""
    model_type = config_json.get("model_type")
    vision = config_json.get("vision_config", {}) if model_type in TWO_TOWER_TYPES else config_json
    if not isinstance(vision, dict):
        raise CheckpointError("vision_config is not a JSON object")
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in GELU:
        raise CheckpointError(f"hidden_act {act!r} is not supported (known: {', '.join(GELU)})")
    patch = vision.get("patch_size", 16)
    if type(patch) is not int or patch < 1:
        raise CheckpointError(f"patch_size {patch!r} is not a positive integer")
    if model_type in NAFLEX_TYPES:
        num_patches = vision.get("num_patches", 256)
        side = math.isqrt(num_patches) if type(num_patches) is int and num_patches > 0 else 0
        if side * side != num_patches:
            raise CheckpointError(f"num_patches {num_patches!r} is not a square grid")
        size, resample = side * patch, "bilinear_antialias"
    else:
        size, resample = vision.get("image_size", 224), "bicubic"
        if type(size) is not int or size < patch:
            raise CheckpointError(f"image_size {size!r} is not an integer of at least patch_size {patch}")
        if size % patch:
            # siglip-so400m-patch14-384: 27 patches of 14 px cover 378 of the 384 pixels.
            log.info(
                "image_size %d is not a multiple of patch_size %d: the source's patch convolution ignores "
                "the last %d pixel rows and columns, so the model takes %d px (crop images to it)",
                size,
                patch,
                size % patch,
                size - size % patch,
            )
            size -= size % patch
    structure = {
        "num_heads": vision.get("num_attention_heads", 12),
        "img_size": size,
        "patch_size": patch,
        "in_chans": vision.get("num_channels", 3),
        # Part of what the tower computes, not a rounding detail: a plain load keeps them.
        "gelu": GELU[act],
        "pos_embed_resample": resample,
    }
    numerics = {"norm_eps": vision.get("layer_norm_eps", 1e-6)}
    return structure, numerics


def _siglip_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return any(
        f"{prefix}embeddings.patch_embedding.weight" in keys
        and f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in keys
        for prefix in ("", "vision_model.")
    )


# Writing: a SiglipVisionModel folder ---------------------------------------------------------------------
def siglip_limits(config: ViTConfig) -> list[str]:
    checks = {
        f"stem {config.stem!r} (SigLIP has a patch stem)": config.stem == "patch",
        "parallel blocks": config.parallel == 1,
        "LayerScale": config.layer_scale_init is None,
        "qkv_bias=False (SigLIP's projections have biases)": config.qkv_bias,
        "a class token (SigLIP has none)": not config.class_token,
        f"pool {config.pool!r} (SigLIP's tower has a MAP head, 'map', or none, 'gap')": config.pool
        in ("map", "gap"),
        f"position embedding {config.pos_embed!r}": config.pos_embed == "learn",
        "a pre-logits layer": not config.representation_size,
        "a classifier (SiglipVisionModel has none; load with num_classes=0)": config.num_classes == 0,
        f"a non-square image {config.img_size}": config.img_size[0] == config.img_size[1],
    }
    return [message for message, ok in checks.items() if not ok]


def siglip_config_json(config: ViTConfig) -> dict:
    """config.json of the SiglipVisionModel that computes the same function."""
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": config.embed_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "num_channels": config.in_chans,
        "image_size": config.img_size[0],
        "patch_size": config.patch_size,
        "hidden_act": "gelu" if config.gelu == "exact" else "gelu_pytorch_tanh",
        "layer_norm_eps": config.norm_eps,
        "attention_dropout": config.attn_dropout,
        "vision_use_head": config.pool == "map",
    }


def save_siglip_folder(state: State, path: Path, config: ViTConfig) -> Path:
    """A SiglipVisionModel folder; the MAP head's query and key/value are packed back into in_proj."""
    if path.suffix:
        raise CheckpointError(f"{path}: a SigLIP checkpoint is a folder; give a path without a suffix")
    state = dict(state)
    for suffix in ("weight", "bias"):
        if f"{_POOL_Q}.{suffix}" in state:
            q, kv = state.pop(f"{_POOL_Q}.{suffix}"), state.pop(f"{_POOL_KV}.{suffix}")
            state[f"head.attention.in_proj_{suffix}"] = torch.cat([q, kv])
    save_safetensors(state, path / WEIGHTS_NAME)
    text = json.dumps(siglip_config_json(config), indent=2, sort_keys=True) + "\n"
    atomic_write(path / MODEL_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return path


SIGLIP = Layout(
    name="siglip",
    description="HuggingFace SigLIP / SigLIP 2 image tower (SiglipVisionModel, SiglipModel, NaFlex)",
    table=SIGLIP_TABLE,
    detect=_siglip_keys,
    fixes=(
        rename_prefix(
            "strip_vision_model_prefix",
            "vision_model.",
            "",
            "two-tower SiglipModel checkpoints (and SiglipVisionModel before transformers 5) nest the "
            "image tower under `vision_model.`",
        ),
        DROP_TEXT_TOWER,
        drop_keys(
            "drop_position_ids",
            ("embeddings.position_ids",),
            "old SiglipVisionEmbeddings saved its position_ids buffer (0..N-1), a constant",
        ),
        DROP_UNUSED_MAP_HEAD,
        SPLIT_PACKED_POOL,
        UNFLATTEN_NAFLEX_PATCHES,
    ),
    limits=siglip_limits,
    numerics={"gelu": "tanh"},
    save=save_siglip_folder,
    model_types=("siglip_vision_model", "siglip", *NAFLEX_TYPES),
    folder_config=siglip_folder_config,
)
