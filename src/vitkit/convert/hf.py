"""HuggingFace transformers folders: ViT (read and write), DINOv2 and DINOv2 with registers (read).

A folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, or shards with an
index). ViT (`ViTForImageClassification`, or `ViTModel` without the `vit.` prefix) keeps query, key
and value as separate Linear layers, which fuse into timm's `qkv`; its `layer_norm_eps` (1e-12 by
default) and `hidden_act` come from config.json. Its `ViTModel` pooler (dense + tanh on the class
token) is the ViT paper's pre-logits layer. DINOv2 (`Dinov2Model`) has patch 14, LayerScale
`layer_scale{1,2}.lambda1`, a position-embedding grid for 518 px (37 x 37 + class slot) resampled
bicubically, and a `mask_token` used only in pre-training. DINOv2 with registers
(`Dinov2WithRegistersModel`) adds `register_tokens` after the class token, without position
embeddings, and resamples its grid with antialiased bicubic interpolation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..files import CheckpointError, atomic_write
from ..models.config import ViTConfig
from .keymap import (
    FUSE_QKV,
    Fix,
    KeyTable,
    Layout,
    Rule,
    State,
    drop_keys,
    rename_prefix,
    renamed,
    rule,
    save_safetensors,
)
from .names import MODEL_CONFIG_NAME, WEIGHTS_NAME

# HF names the activation; vitkit has exact GELU and its tanh approximation.
GELU = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


def attention(layer: str, native: str = "blocks.{i}.") -> list[Rule]:
    """HF's separate query/key/value -> timm's fused qkv; the output projection as is."""
    self_attention = f"{layer}attention.attention."
    return [
        *(
            rule(
                f"{native}attn.qkv.{p}",
                *(f"{self_attention}{n}.{p}" for n in ("query", "key", "value")),
                transform=FUSE_QKV,
            )
            for p in ("weight", "bias")
        ),
        *renamed(f"{native}attn.proj", f"{layer}attention.output.dense"),
    ]


def embeddings(prefix: str) -> list[Rule]:
    return [
        rule("cls_token", f"{prefix}embeddings.cls_token"),
        rule("pos_embed", f"{prefix}embeddings.position_embeddings"),
        *renamed("patch_embed.proj", f"{prefix}embeddings.patch_embeddings.projection"),
    ]


_VIT_LAYER = "vit.encoder.layer.{i}."
HF_VIT_TABLE = KeyTable(
    "hf",
    [
        *embeddings("vit."),
        *renamed("blocks.{i}.norm1", f"{_VIT_LAYER}layernorm_before"),
        *attention(_VIT_LAYER),
        *renamed("blocks.{i}.norm2", f"{_VIT_LAYER}layernorm_after"),
        *renamed("blocks.{i}.mlp.fc1", f"{_VIT_LAYER}intermediate.dense"),
        *renamed("blocks.{i}.mlp.fc2", f"{_VIT_LAYER}output.dense"),
        *renamed("norm", "vit.layernorm"),
        *renamed("pre_logits.fc", "vit.pooler.dense"),
        *renamed("head", "classifier"),
    ],
)

_DINO_LAYER = "encoder.layer.{i}."
DINOV2_TABLE = KeyTable(
    "dinov2",
    [
        *embeddings(""),
        *renamed("blocks.{i}.norm1", f"{_DINO_LAYER}norm1"),
        *attention(_DINO_LAYER),
        rule("blocks.{i}.ls1.gamma", f"{_DINO_LAYER}layer_scale1.lambda1"),
        *renamed("blocks.{i}.norm2", f"{_DINO_LAYER}norm2"),
        *renamed("blocks.{i}.mlp.fc1", f"{_DINO_LAYER}mlp.fc1"),
        *renamed("blocks.{i}.mlp.fc2", f"{_DINO_LAYER}mlp.fc2"),
        rule("blocks.{i}.ls2.gamma", f"{_DINO_LAYER}layer_scale2.lambda1"),
        *renamed("norm", "layernorm"),
    ],
)
DINOV2_REG_TABLE = KeyTable(
    "dinov2_reg", [*DINOV2_TABLE.rules, rule("reg_token", "embeddings.register_tokens")]
)


def _gelu(config_json: dict) -> str:
    act = config_json.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in GELU:
        raise CheckpointError(f"hidden_act {act!r} is not supported (known: {', '.join(GELU)})")
    return GELU[act]


def hf_image_size(config_json: dict) -> tuple[int, int]:
    size = config_json.get("image_size", 224)
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, list) and len(size) == 2 and all(type(side) is int for side in size):
        return (size[0], size[1])
    raise CheckpointError(f"image_size {size!r} is not an integer or two integers")


def vit_folder_config(config_json: dict) -> tuple[dict[str, object], dict[str, object]]:
    structure = {"num_heads": config_json["num_attention_heads"], "img_size": hf_image_size(config_json)}
    numerics = {
        "norm_eps": config_json.get("layer_norm_eps", 1e-12),
        "gelu": _gelu(config_json),
        "pos_embed_resample": "bicubic",
    }
    return structure, numerics


def dinov2_folder_config(config_json: dict) -> tuple[dict[str, object], dict[str, object]]:
    if config_json.get("use_swiglu_ffn"):
        raise CheckpointError("DINOv2 with a SwiGLU MLP (ViT-g) is not supported")
    structure = {
        "num_heads": config_json["num_attention_heads"],
        "img_size": hf_image_size(config_json),
        "layer_scale_init": config_json.get("layerscale_value", 1.0),
    }
    numerics = {
        "norm_eps": config_json.get("layer_norm_eps", 1e-6),
        "gelu": _gelu(config_json),
        "pos_embed_resample": "bicubic",
    }
    return structure, numerics


def dinov2_reg_folder_config(config_json: dict) -> tuple[dict[str, object], dict[str, object]]:
    structure, numerics = dinov2_folder_config(config_json)
    return structure, {**numerics, "pos_embed_resample": "bicubic_antialias"}


def fold_class_position(state: State) -> State:
    """cls + pos[0] as the class token, pos[1:] as the patches' embeddings."""
    state = dict(state)
    pos_embed = state["embeddings.position_embeddings"]
    state["embeddings.cls_token"] = state["embeddings.cls_token"] + pos_embed[:, :1]
    state["embeddings.position_embeddings"] = pos_embed[:, 1:]
    return state


def hf_limits(config: ViTConfig) -> list[str]:
    checks = {
        f"stem {config.stem!r} (HF ViT has a patch stem)": config.stem == "patch",
        "parallel blocks": config.parallel == 1,
        "LayerScale": config.layer_scale_init is None,
        "register tokens": config.num_reg_tokens == 0,
        "a model without class token": config.class_token,
        f"pool {config.pool!r} (HF ViT classifies the class token)": config.pool == "token",
        f"position embedding {config.pos_embed!r}": config.pos_embed == "learn",
        # ViTForImageClassification has no pre-logits layer; ViTModel's pooler is one but has no head.
        "a pre-logits layer with a classifier (load with pre_logits=False to drop it)": not (
            config.representation_size and config.num_classes
        ),
        "a pre-logits layer narrower or wider than the model (HF's pooler keeps the width)": config.representation_size
        in (None, config.embed_dim),
    }
    return [message for message, ok in checks.items() if not ok]


def hf_config_json(config: ViTConfig) -> dict:
    """config.json of the transformers model that computes the same function."""
    headless = config.num_classes == 0
    out = {
        "architectures": ["ViTModel" if headless else "ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu" if config.gelu == "exact" else "gelu_pytorch_tanh",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "layer_norm_eps": config.norm_eps,
        "image_size": config.img_size[0]
        if config.img_size[0] == config.img_size[1]
        else list(config.img_size),
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
        "initializer_range": 0.02,
    }
    if not headless:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    return out


def save_hf_folder(state: State, path: Path, config: ViTConfig) -> Path:
    """An HF folder: model.safetensors + config.json, each written atomically."""
    if path.suffix:
        raise CheckpointError(f"{path}: an HF checkpoint is a folder; give a path without a suffix")
    if config.num_classes == 0:
        # ViTModel names its parameters without the `vit.` prefix of ViTForImageClassification.
        state = {key.removeprefix("vit."): value for key, value in state.items()}
    save_safetensors(state, path / WEIGHTS_NAME)
    text = json.dumps(hf_config_json(config), indent=2, sort_keys=True) + "\n"
    atomic_write(path / MODEL_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return path


def _hf_vit_keys(keys: Iterable[str]) -> bool:
    return any(key.endswith("embeddings.patch_embeddings.projection.weight") for key in keys) and not any(
        "layer_scale1" in key for key in keys
    )


def _dinov2_keys(keys: Iterable[str]) -> bool:
    return any(key.endswith("layer_scale1.lambda1") for key in keys)


def _dinov2_reg_keys(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return _dinov2_keys(keys) and any(key.endswith("embeddings.register_tokens") for key in keys)


HF_VIT = Layout(
    name="hf",
    description="HuggingFace transformers ViT folder (ViTForImageClassification / ViTModel)",
    table=HF_VIT_TABLE,
    detect=_hf_vit_keys,
    fixes=(
        Fix(
            "add_vit_prefix",
            "ViTModel checkpoints (no classifier) name parameters without ViTForImageClassification's `vit.`",
            needed=lambda state: "embeddings.patch_embeddings.projection.weight" in state,
            apply=lambda state: {f"vit.{key}": value for key, value in state.items()},
        ),
    ),
    limits=hf_limits,
    save=save_hf_folder,
    needs_class_slot=True,
    model_types=("vit",),
    folder_config=vit_folder_config,
)

DINOV2 = Layout(
    name="dinov2",
    description="HuggingFace transformers Dinov2Model folder",
    table=DINOV2_TABLE,
    detect=_dinov2_keys,
    fixes=(
        rename_prefix(
            "strip_dinov2_prefix",
            "dinov2.",
            "",
            "Dinov2ForImageClassification nests the backbone under `dinov2.` (its classifier reads "
            "class and mean patch tokens together, which vitkit does not build: it is reported unused)",
        ),
        drop_keys(
            "drop_mask_token",
            ("embeddings.mask_token",),
            "DINOv2's mask token replaces masked patches in iBOT pre-training and is unused at inference",
        ),
    ),
    model_types=("dinov2",),
    folder_config=dinov2_folder_config,
)

DINOV2_REG = Layout(
    name="dinov2_reg",
    description="HuggingFace transformers Dinov2WithRegistersModel folder",
    table=DINOV2_REG_TABLE,
    detect=_dinov2_reg_keys,
    fixes=(
        rename_prefix(
            "strip_dinov2_with_registers_prefix",
            "dinov2_with_registers.",
            "",
            "Dinov2WithRegistersForImageClassification nests the backbone under `dinov2_with_registers.` "
            "(its classifier reads class and mean patch tokens together: it is reported unused)",
        ),
        drop_keys(
            "drop_mask_token",
            ("embeddings.mask_token",),
            "DINOv2's mask token replaces masked patches in iBOT pre-training and is unused at inference",
        ),
        Fix(
            "fold_class_position",
            "DINOv2 with registers adds position embeddings to the class token and the patches, not to "
            "the registers: as timm does, the class token's row is added to the token once, leaving "
            "embeddings for the patches only (pos_embed_class_slot=False); cls + pos[0] is the same sum",
            needed=lambda state: {"embeddings.cls_token", "embeddings.position_embeddings"} <= state.keys(),
            apply=fold_class_position,
        ),
    ),
    # HF resamples with torch's antialiased bicubic kernel (as timm), DINOv2 without registers without.
    numerics={"pos_embed_resample": "bicubic_antialias"},
    model_types=("dinov2_with_registers",),
    folder_config=dinov2_reg_folder_config,
)
