"""Model names -> ViTConfig. `create_model(name, **overrides)` builds any registered variant.

Registered names follow timm's grammar (see models/variants.py); big_vision's variant strings
("B/16", "R50+B/16", optionally with "@384") are accepted as aliases of the matching timm name.
`create_model(name, pretrained=True)` loads the weights `HUB_SOURCES` names for it from the Hugging
Face Hub (`vitkit.load("hf-hub:...")`).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

from .io import CheckpointError, compare_shapes, expected_shapes, load
from .models.config import SIZE_NAMES, ViTConfig, decode_variant
from .models.variants import VARIANTS
from .models.vit import VisionTransformer

# Registered names -> the Hub repo of their published weights, timm's default tag for each (the
# AugReg ImageNet-21k -> 1k fine-tunes of Steiner et al. 2022, "How to train your ViT?"; the
# original 2020 release where timm keeps no AugReg one), and Meta's DINOv2 with registers.
# `vitkit zoo` lists them; `create_model(name, pretrained=True)` loads them.
HUB_SOURCES: dict[str, str] = {
    "vit_tiny_patch16_224": "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_tiny_patch16_384": "hf-hub:timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch16_384": "hf-hub:timm/vit_small_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch32_224": "hf-hub:timm/vit_small_patch32_224.augreg_in21k_ft_in1k",
    "vit_small_patch32_384": "hf-hub:timm/vit_small_patch32_384.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base_patch16_384": "hf-hub:timm/vit_base_patch16_384.augreg_in21k_ft_in1k",
    "vit_base_patch32_224": "hf-hub:timm/vit_base_patch32_224.augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "hf-hub:timm/vit_base_patch32_384.augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "hf-hub:timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "hf-hub:timm/vit_large_patch16_384.augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "hf-hub:timm/vit_large_patch32_384.orig_in21k_ft_in1k",
    "vit_small_patch14_reg4_dinov2": "hf-hub:facebook/dinov2-with-registers-small",
    "vit_base_patch14_reg4_dinov2": "hf-hub:facebook/dinov2-with-registers-base",
}

_ALIAS = re.compile(r"^(?P<variant>(?:R\d+\+)?[A-Za-z]+/\d+)(?:@(?P<res>\d+))?$")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted: list_models("vit_base_*")."""
    return sorted(name for name in VARIANTS if fnmatch.fnmatchcase(name, pattern))


def resolve_name(name: str) -> str:
    """A registered name, or the registered name of a big_vision alias ("B/16" -> vit_base_patch16_224)."""
    if name in VARIANTS:
        return name
    alias = _ALIAS.match(name)
    if alias:
        decoded = decode_variant(alias["variant"])
        size = alias["variant"].split("+")[-1].split("/")[0]
        res = alias["res"] or "224"
        if decoded.get("stem") == "hybrid":
            stride = alias["variant"].split("/")[-1]
            resnet = alias["variant"].split("+")[0].lower()
            candidate = f"vit_{SIZE_NAMES[size]}_{resnet}_s{stride}_{res}"
        else:
            candidate = f"vit_{SIZE_NAMES[size]}_patch{decoded['patch_size']}_{res}"
        if candidate in VARIANTS:
            return candidate
        raise KeyError(f"model alias {name!r} means {candidate!r}, which is not registered")
    close = difflib.get_close_matches(name, list(VARIANTS), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise KeyError(f"unknown model {name!r}{hint}. `vitkit zoo` lists all {len(VARIANTS)} names")


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The config of a registered name or alias with overrides applied; unknown fields are errors."""
    return VARIANTS[resolve_name(name)].replace(**overrides)


def create_model(name: str | ViTConfig, pretrained: bool = False, **overrides: Any) -> VisionTransformer:
    """Build a model from a registered name, a big_vision alias or a ViTConfig, with field overrides.
    `pretrained=True` loads the name's published weights (`HUB_SOURCES`) as `vitkit.load` does: a
    different `num_classes` starts a new, zero-initialised head, another `img_size` resamples the
    position embeddings.

    >>> model = create_model("vit_base_patch16_384", num_classes=10)
    """
    if pretrained:
        return _pretrained(name, **overrides)
    config = name.replace(**overrides) if isinstance(name, ViTConfig) else get_config(name, **overrides)
    return VisionTransformer(config)


def _pretrained(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """The published weights of a registered name, checked to have the shapes the name's config gives."""
    if not isinstance(name, str):
        raise TypeError("create_model(pretrained=True) takes a registered name, not a ViTConfig")
    registered = resolve_name(name)
    if registered not in HUB_SOURCES:
        known = ", ".join(sorted(HUB_SOURCES)[:3])
        raise ValueError(
            f"{registered!r} has no published weights vitkit knows of; "
            f"{len(HUB_SOURCES)} names have one ({known}, ...): vitkit.registry.HUB_SOURCES, or `hub` in "
            "`vitkit zoo --metafile`; vitkit.load('hf-hub:org/name') reads any Hub repo"
        )
    model = load(HUB_SOURCES[registered], **overrides)
    config = get_config(registered, **overrides)
    diff = compare_shapes(expected_shapes(config), expected_shapes(model.config), names=("hub", registered))
    if diff.mismatched or diff.missing or diff.unexpected:
        found = "; ".join([*diff.mismatched, *diff.missing, *diff.unexpected][:3])
        raise CheckpointError(f"{HUB_SOURCES[registered]}: not the model {registered} describes ({found})")
    return model
