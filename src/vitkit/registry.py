"""Model names -> ViTConfig. `create_model(name, **overrides)` builds any registered variant.

Registered names follow timm's grammar (see models/variants.py); big_vision's variant strings
("B/16", "R50+B/16", optionally with "@384") are accepted as aliases of the matching timm name.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

from .models.config import SIZE_NAMES, ViTConfig, decode_variant
from .models.variants import VARIANTS
from .models.vit import VisionTransformer

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


def create_model(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a model from a registered name, a big_vision alias or a ViTConfig, with field overrides.

    >>> model = create_model("vit_base_patch16_384", num_classes=10)
    """
    config = name.replace(**overrides) if isinstance(name, ViTConfig) else get_config(name, **overrides)
    return VisionTransformer(config)
