"""Google's Flax layouts: the official vit_jax .npz (read and write) and big_vision .npz (read).

vit_jax (google-research/vision_transformer, `models_vit.py`): `embedding/kernel` (HWIO), `cls`,
`Transformer/posembed_input/pos_embedding` (with the class token's slot), blocks
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
LayerNorm_2, MlpBlock_3/Dense_{0,1}}`, `Transformer/encoder_norm`, optional `pre_logits`, `head`. The
R50 hybrids add the BiT trunk at the top level: `conv_root`, `gn_root`, `block{s}/unit{u}/
{conv,gn}{1,2,3}` and `conv_proj`/`gn_proj` for each stage's first unit, counted from one.

big_vision (google-research/big_vision, `models/vit.py`): everything under `params/`, the position
embedding `pos_embedding` has no class slot (the class token is concatenated after it is added),
blocks name their modules `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`,
pooling is "tok", "gap" or "map" (`MAPHead_0` with a learned `probe`), and `scan=True` training
stores all blocks in one `encoderblock` with a leading depth axis.

Flax attention kernels keep the heads apart: q/k/v are (D, heads, head_dim) and out is
(heads, head_dim, D). Both toolkits' MlpBlock call `flax.linen.gelu`, whose default is the tanh
approximation, and both resample position embeddings with `scipy.ndimage.zoom(order=1)`: that is
what `numerics` restores on request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from ..models.config import ViTConfig
from .keymap import (
    CONV,
    HEADS_OUT,
    KV_BIAS,
    KV_KERNEL,
    Q_BIAS,
    Q_KERNEL,
    QKV_BIAS,
    QKV_KERNEL,
    Fix,
    KeyTable,
    Layout,
    Rule,
    State,
    linear,
    norm,
    rename_prefix,
    rule,
    save_npz,
)

log = logging.getLogger(__name__)

FLAX_NUMERICS = {"gelu": "tanh", "pos_embed_resample": "bilinear_align_corners"}


def encoder_block(prefix: str, attention: int, second_norm: int, mlp: int) -> list[Rule]:
    """One encoder block; the Flax module indices differ between vit_jax (1, 2, 3) and big_vision
    (0, 1, 0) because Flax numbers submodules per type in creation order."""
    block = f"{prefix}Transformer/encoderblock_{{i}}/"
    attn = f"{block}MultiHeadDotProductAttention_{attention}/"
    return [
        *norm("blocks.{i}.norm1", f"{block}LayerNorm_0"),
        rule(
            "blocks.{i}.attn.qkv.weight",
            *(f"{attn}{n}/kernel" for n in ("query", "key", "value")),
            transform=QKV_KERNEL,
        ),
        rule(
            "blocks.{i}.attn.qkv.bias",
            *(f"{attn}{n}/bias" for n in ("query", "key", "value")),
            transform=QKV_BIAS,
        ),
        *linear("blocks.{i}.attn.proj", f"{attn}out", kernel=HEADS_OUT),
        *norm("blocks.{i}.norm2", f"{block}LayerNorm_{second_norm}"),
        *linear("blocks.{i}.mlp.fc1", f"{block}MlpBlock_{mlp}/Dense_0"),
        *linear("blocks.{i}.mlp.fc2", f"{block}MlpBlock_{mlp}/Dense_1"),
    ]


def _hybrid_trunk() -> list[Rule]:
    """The BiT ResNetV2 trunk of R50+ViT: vit_jax counts stages and units from one."""
    unit = "block{s+1}/unit{u+1}/"
    native = "patch_embed.backbone.stages.{s}.blocks.{u}."
    rules = [
        rule("patch_embed.backbone.stem.conv.weight", "conv_root/kernel", transform=CONV),
        *norm("patch_embed.backbone.stem.norm", "gn_root"),
        rule(f"{native}downsample.conv.weight", f"{unit}conv_proj/kernel", transform=CONV),
        *norm(f"{native}downsample.norm", f"{unit}gn_proj"),
    ]
    for r in (1, 2, 3):
        rules += [rule(f"{native}conv{r}.weight", f"{unit}conv{r}/kernel", transform=CONV)]
        rules += norm(f"{native}norm{r}", f"{unit}gn{r}")
    return rules


VIT_JAX_TABLE = KeyTable(
    "vit_jax",
    [
        *linear("patch_embed.proj", "embedding", kernel=CONV),
        *_hybrid_trunk(),
        rule("cls_token", "cls"),
        rule("pos_embed", "Transformer/posembed_input/pos_embedding"),
        *encoder_block("", attention=1, second_norm=2, mlp=3),
        *norm("norm", "Transformer/encoder_norm"),
        *linear("pre_logits.fc", "pre_logits"),
        *linear("head", "head"),
    ],
)

BIG_VISION_TABLE = KeyTable(
    "big_vision",
    [
        *linear("patch_embed.proj", "params/embedding", kernel=CONV),
        rule("cls_token", "params/cls"),
        rule("pos_embed", "params/pos_embedding"),
        *encoder_block("params/", attention=0, second_norm=1, mlp=0),
        *norm("norm", "params/Transformer/encoder_norm"),
        # MAP head: a learned probe attends to the tokens (keys and values fused as timm's `kv`).
        rule("attn_pool.latent", "params/MAPHead_0/probe"),
        rule(
            "attn_pool.q.weight",
            "params/MAPHead_0/MultiHeadDotProductAttention_0/query/kernel",
            transform=Q_KERNEL,
        ),
        rule(
            "attn_pool.q.bias", "params/MAPHead_0/MultiHeadDotProductAttention_0/query/bias", transform=Q_BIAS
        ),
        rule(
            "attn_pool.kv.weight",
            *(f"params/MAPHead_0/MultiHeadDotProductAttention_0/{n}/kernel" for n in ("key", "value")),
            transform=KV_KERNEL,
        ),
        rule(
            "attn_pool.kv.bias",
            *(f"params/MAPHead_0/MultiHeadDotProductAttention_0/{n}/bias" for n in ("key", "value")),
            transform=KV_BIAS,
        ),
        *linear("attn_pool.proj", "params/MAPHead_0/MultiHeadDotProductAttention_0/out", kernel=HEADS_OUT),
        *norm("attn_pool.norm", "params/MAPHead_0/LayerNorm_0"),
        *linear("attn_pool.mlp.fc1", "params/MAPHead_0/MlpBlock_0/Dense_0"),
        *linear("attn_pool.mlp.fc2", "params/MAPHead_0/MlpBlock_0/Dense_1"),
        *linear("pre_logits.fc", "params/pre_logits"),
        *linear("head", "params/head"),
    ],
)


# Fixes -----------------------------------------------------------------------------------------------
def _warn_zeroed_head(state: State) -> State:
    log.warning(
        "the checkpoint's classifier is all zeros (the 2020 vit_jax ImageNet-21k release zeroed it): its "
        "logits are all zero; fine-tune a new head (e.g. num_classes=...) or use the pre-logits features"
    )
    return state


ZEROED_HEAD = Fix(
    "warn_zeroed_head",
    "the 2020 ImageNet-21k vit_jax files keep the pre-logits layer but ship a zeroed classifier",
    needed=lambda state: "head/kernel" in state and not bool(state["head/kernel"].any()),
    apply=_warn_zeroed_head,
)

_SCANNED = re.compile(r"^(?P<prefix>.*Transformer/)encoderblock/(?P<rest>.+)$")


def _unstack_scanned_blocks(state: State) -> State:
    out: State = {}
    for key, value in state.items():
        match = _SCANNED.match(key)
        if match is None:
            out[key] = value
            continue
        for index, layer in enumerate(value.unbind(0)):
            out[f"{match['prefix']}encoderblock_{index}/{match['rest']}"] = layer
    return out


UNSTACK_SCAN = Fix(
    "unstack_scanned_blocks",
    "big_vision models trained with scan=True store all blocks in one `encoderblock` with a leading depth axis",
    needed=lambda state: any(_SCANNED.match(key) for key in state),
    apply=_unstack_scanned_blocks,
)


# Limits ----------------------------------------------------------------------------------------------
def vit_jax_limits(config: ViTConfig) -> list[str]:
    """What the official vit_jax VisionTransformer cannot express."""
    checks = {
        f"stem {config.stem!r} (vit_jax has patch and R50 hybrid stems)": config.stem in ("patch", "hybrid"),
        "parallel blocks": config.parallel == 1,
        "LayerScale": config.layer_scale_init is None,
        "register tokens": config.num_reg_tokens == 0,
        "qkv_bias=False (Flax attention always has biases)": config.qkv_bias,
        f"position embedding {config.pos_embed!r} (vit_jax learns them)": config.pos_embed == "learn",
        # vit_jax averages tokens ('gap') exactly when it has no class token.
        f"pool {config.pool!r} with class_token={config.class_token}": (config.pool, config.class_token)
        in (("token", True), ("gap", False)),
    }
    return [message for message, ok in checks.items() if not ok]


def _vit_jax_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "embedding/kernel" in keys or "opt/target/embedding/kernel" in keys


def _big_vision_keys(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "params/embedding/kernel" in keys or "params/img/embedding/kernel" in keys


def _save_vit_jax(state: State, path: Path, config: ViTConfig) -> Path:
    return save_npz(state, path.with_suffix(".npz") if path.suffix != ".npz" else path)


VIT_JAX = Layout(
    name="vit_jax",
    description="official google-research/vision_transformer .npz",
    table=VIT_JAX_TABLE,
    detect=_vit_jax_keys,
    fixes=(
        rename_prefix(
            "strip_optimizer_prefix",
            "opt/target/",
            "",
            "vit_jax checkpoints saved with their optimizer nest the parameters under opt/target/",
        ),
        ZEROED_HEAD,
    ),
    limits=vit_jax_limits,
    numerics=FLAX_NUMERICS,
    save=_save_vit_jax,
    needs_class_slot=True,
)

BIG_VISION = Layout(
    name="big_vision",
    description="google-research/big_vision .npz (params/..., GAP/MAP heads, scan layout)",
    table=BIG_VISION_TABLE,
    detect=_big_vision_keys,
    fixes=(
        rename_prefix(
            "strip_image_tower_prefix",
            "params/img/",
            "params/",
            "two-tower (LiT, SigLIP) checkpoints hold the image ViT under params/img/",
        ),
        UNSTACK_SCAN,
    ),
    numerics=FLAX_NUMERICS,
)
