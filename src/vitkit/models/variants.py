"""Every registered model name, built from the SIZES table. A name is data: it maps to a ViTConfig.

Names follow timm's grammar: vit_{size}_patch{P}_{resolution}, vit_{size}_r50_s{stride}_{resolution}
for hybrids, vit_{size}_patch16_{depth}x{parallel}_224 for parallel blocks,
vit_{size}_patch14_reg{R}_dinov2 for DINOv2 with R registers, plus our own `_hmlp` suffix. `_in21k` names are the ImageNet-21k pre-training models of the ViT paper: 21,843 classes and
the pre-training head with one hidden tanh layer (the pre-logits layer).
"""

from __future__ import annotations

from .config import SIZE_NAMES, ViTConfig, decode_variant

IN21K_CLASSES = 21843


def vit(variant: str, img_size: int, **overrides) -> ViTConfig:
    """A config from a big_vision variant string ("B/16", "R50+L/32") at a resolution."""
    return ViTConfig(img_size=img_size, **{**decode_variant(variant), **overrides})


def in21k(variant: str) -> ViTConfig:
    width = decode_variant(variant)["embed_dim"]
    return vit(variant, 224, num_classes=IN21K_CLASSES, representation_size=width)


def parallel(size: str, depth: int, num_parallel: int) -> ViTConfig:
    # "Three things" trains these with LayerScale (DeiT III recipe); timm registers them the same way.
    return vit(f"{size}/16", 224, depth=depth, parallel=num_parallel, layer_scale_init=1e-5)


def dinov2_registers(size: str, num_reg_tokens: int = 4) -> ViTConfig:
    """DINOv2 with registers (Darcet et al., 2024) as timm builds it: a 37 x 37 grid at 518 px, LayerScale,
    position embeddings for the patches only (the class token's row is folded into the token), and no
    classifier (a feature extractor)."""
    return vit(
        f"{size}/14",
        518,
        num_reg_tokens=num_reg_tokens,
        layer_scale_init=1e-5,
        pos_embed_class_slot=False,
        num_classes=0,
    )


def _standard() -> dict[str, ViTConfig]:
    """Ti/S/B/L/H at patch 32/16/14; pre-training resolution 224, fine-tuning 384 (518 for patch 14,
    the ViT paper's resolution for H/14, since 384 is not a multiple of 14)."""
    names = {}
    for size, size_name in SIZE_NAMES.items():
        for patch in (32, 16, 14):
            for res in (224, 518 if patch == 14 else 384):
                names[f"vit_{size_name}_patch{patch}_{res}"] = vit(f"{size}/{patch}", res)
            names[f"vit_{size_name}_patch{patch}_224_in21k"] = in21k(f"{size}/{patch}")
    return names


VARIANTS: dict[str, ViTConfig] = {
    **_standard(),
    # Hybrids: the ViT paper's R50+ViT-B/16 (stages 3, 4, 9) and R50+ViT-L/32 (3, 4, 6, 3); R26+S/32.
    "vit_base_r50_s16_224": vit("R50+B/16", 224),
    "vit_base_r50_s16_384": vit("R50+B/16", 384),
    "vit_base_r50_s16_224_in21k": in21k("R50+B/16"),
    "vit_large_r50_s32_224": vit("R50+L/32", 224),
    "vit_large_r50_s32_384": vit("R50+L/32", 384),
    "vit_small_r26_s32_224": vit("R26+S/32", 224),
    "vit_small_r26_s32_384": vit("R26+S/32", 384),
    # "Three things" #1: parallel blocks at equal parameters (depth x branches).
    "vit_small_patch16_36x1_224": parallel("S", 36, 1),
    "vit_small_patch16_18x2_224": parallel("S", 18, 2),
    "vit_small_patch16_12x3_224": parallel("S", 12, 3),
    "vit_base_patch16_24x1_224": parallel("B", 24, 1),
    "vit_base_patch16_12x2_224": parallel("B", 12, 2),
    "vit_base_patch16_18x2_224": parallel("B", 18, 2),
    "vit_base_patch16_6x2_224": parallel("B", 6, 2),
    # "Three things" #3: the hierarchical MLP stem.
    "vit_small_patch16_224_hmlp": vit("S/16", 224, stem="hmlp"),
    "vit_base_patch16_224_hmlp": vit("B/16", 224, stem="hmlp"),
    # "Vision Transformers Need Registers": DINOv2 ViT-S/14 and ViT-B/14 with 4 register tokens.
    "vit_small_patch14_reg4_dinov2": dinov2_registers("S"),
    "vit_base_patch14_reg4_dinov2": dinov2_registers("B"),
    # Small-image models (CIFAR-size, 32 px with 4 px patches: 64 tokens).
    "vit_tiny_patch4_32": vit("Ti/4", 32, num_classes=10),
    "vit_small_patch4_32": vit("S/4", 32, num_classes=10),
}
