"""HuggingFace transformers DINOv3 ViT folders (`DINOv3ViTModel`, read only).

DINOv3 (Siméoni et al., 2025) is a pre-norm ViT with LayerScale (`layer_scale{1,2}.lambda1`), a
class token and `register_tokens` after it, and rotary position embeddings instead of learned ones
(`pos_embed="rope"`, `rope_theta` from config.json): nothing positional is stored. Query, key and
value are separate Linear layers (`q_proj`, `k_proj`, `v_proj`) and the released models have no key
bias; they fuse into timm's `qkv` with a zero key bias. Its LayerNorm eps (1e-5) and exact GELU are
the model's own, taken from config.json without being asked. The gated (SwiGLU) MLP of ViT-S+, H+
and 7B is refused. A vitkit model with RoPE can be written only in vitkit's own layout: timm's
VisionTransformer, vit_jax, HF ViT and mmpretrain hold no rotary embeddings, and refuse it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..files import CheckpointError
from .hf import GELU, hf_image_size
from .keymap import FUSE_QKV, Fix, KeyTable, Layout, State, drop_keys, rename_prefix, renamed, rule

_LAYER = "layer.{i}."
_ATTENTION = f"{_LAYER}attention."
DINOV3_TABLE = KeyTable(
    "dinov3_vit",
    [
        *renamed("patch_embed.proj", "embeddings.patch_embeddings"),
        rule("cls_token", "embeddings.cls_token"),
        rule("reg_token", "embeddings.register_tokens"),
        *renamed("blocks.{i}.norm1", f"{_LAYER}norm1"),
        *(
            rule(
                f"blocks.{{i}}.attn.qkv.{p}",
                *(f"{_ATTENTION}{n}_proj.{p}" for n in ("q", "k", "v")),
                transform=FUSE_QKV,
            )
            for p in ("weight", "bias")
        ),
        *renamed("blocks.{i}.attn.proj", f"{_ATTENTION}o_proj"),
        rule("blocks.{i}.ls1.gamma", f"{_LAYER}layer_scale1.lambda1"),
        *renamed("blocks.{i}.norm2", f"{_LAYER}norm2"),
        *renamed("blocks.{i}.mlp.fc1", f"{_LAYER}mlp.up_proj"),
        *renamed("blocks.{i}.mlp.fc2", f"{_LAYER}mlp.down_proj"),
        rule("blocks.{i}.ls2.gamma", f"{_LAYER}layer_scale2.lambda1"),
        *renamed("norm", "norm"),
    ],
)

# Linear layers of a layer whose bias config.json may switch off (query_bias, key_bias, value_bias,
# proj_bias, mlp_bias); vitkit's have one, except that q, k and v have one together or none.
_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_OTHERS = ("attention.o_proj", "mlp.up_proj", "mlp.down_proj")


def _biasless(state: State) -> list[str]:
    """Layers without a bias that vitkit's model has: a zero bias computes the same, x W^T + 0."""
    out = []
    for key in state:
        if not (key.startswith("layer.") and key.endswith(".weight")):
            continue
        module = key.removesuffix(".weight")
        if f"{module}.bias" in state:
            continue
        _, index, name = module.split(".", 2)
        if name in _OTHERS or (name in _QKV and any(f"layer.{index}.{n}.bias" in state for n in _QKV)):
            out.append(module)
    return out


def add_zero_biases(state: State) -> State:
    state = dict(state)
    for module in _biasless(state):
        weight = state[f"{module}.weight"]
        state[f"{module}.bias"] = weight.new_zeros(weight.shape[0])
    return state


def dinov3_folder_config(config_json: dict) -> tuple[dict[str, object], dict[str, object]]:
    if config_json.get("use_gated_mlp"):
        raise CheckpointError("DINOv3 with a gated (SwiGLU) MLP (ViT-S+, H+, 7B) is not supported")
    act = config_json.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in GELU:
        raise CheckpointError(f"hidden_act {act!r} is not supported (known: {', '.join(GELU)})")
    structure = {
        "num_heads": config_json["num_attention_heads"],
        "img_size": hf_image_size(config_json),
        "layer_scale_init": config_json.get("layerscale_value", 1.0),
        "pos_embed": "rope",
        "rope_theta": config_json.get("rope_theta", 100.0),
        # Trained with these: part of the model, not a toolkit's arithmetic.
        "norm_eps": config_json.get("layer_norm_eps", 1e-5),
        "gelu": GELU[act],
    }
    return structure, {}


def _dinov3_keys(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any(key.endswith("attention.q_proj.weight") for key in keys) and any(
        key.endswith("layer_scale1.lambda1") for key in keys
    )


DINOV3 = Layout(
    name="dinov3_vit",
    description="HuggingFace transformers DINOv3ViTModel folder",
    table=DINOV3_TABLE,
    detect=_dinov3_keys,
    fixes=(
        rename_prefix(
            "strip_encoder_prefix",
            "model.layer.",
            "layer.",
            "DINOv3ViTModel's own state_dict() nests the layers under `model.`; save_pretrained and the "
            "released folders name them without it",
        ),
        drop_keys(
            "drop_mask_token",
            ("embeddings.mask_token",),
            "DINOv3's mask token replaces masked patches in pre-training and is unused at inference",
        ),
        Fix(
            "drop_empty_registers",
            "DINOv3 folders without registers still store `register_tokens`, shaped (1, 0, D)",
            needed=lambda state: state.get("embeddings.register_tokens", torch.ones(1)).numel() == 0,
            apply=lambda state: {k: v for k, v in state.items() if k != "embeddings.register_tokens"},
        ),
        Fix(
            "add_zero_biases",
            "DINOv3 has no key bias (key_bias=False), and config.json may switch off others; vitkit's "
            "fused qkv, projection and MLP layers have biases, set to zero",
            needed=lambda state: bool(_biasless(state)),
            apply=add_zero_biases,
        ),
    ),
    model_types=("dinov3_vit",),
    folder_config=dinov3_folder_config,
)
