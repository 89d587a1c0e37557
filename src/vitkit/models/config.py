"""ViTConfig: the one description of a Vision Transformer, and the size table of the ViT paper.

A config is plain data. Every deviation from the paper's model (LayerScale, global average pooling,
sin-cos or rotary position embeddings, register tokens, tanh GELU, a LayerNorm eps other than 1e-6)
is a named field, so reading a config tells exactly which model it builds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal

# Table 1 of the ViT paper (Dosovitskiy et al., 2021), plus Ti and S from DeiT (Touvron et al., 2021)
# and the big_vision grammar: width, depth, MLP width, heads.
SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(embed_dim=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(embed_dim=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(embed_dim=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(embed_dim=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(embed_dim=1280, depth=32, mlp_dim=5120, num_heads=16),
}
SIZE_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}

PoolType = Literal["token", "gap", "gap_fc_norm", "map"]
PosEmbedType = Literal["learn", "sincos2d", "rope", "none"]
GeluType = Literal["exact", "tanh"]
StemType = Literal["patch", "hmlp", "hybrid", "conv", "cnn"]
ResampleMethod = Literal[
    "bicubic", "bicubic_antialias", "bilinear", "bilinear_antialias", "bilinear_align_corners"
]

# Bounds on every size a config can claim, so that a config read from an untrusted file cannot make
# vitkit build an absurd model (depth 10**9 or width 10**7 would exhaust memory before any check of
# the tensors). Each holds every registered model (at most width 1280, depth 36, MLP 5120, 16 heads,
# 518 px, 21,843 classes) with a wide margin.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "patch_size": (1, 1024),
    "in_chans": (1, 64),
    "embed_dim": (1, 16384),
    "depth": (1, 512),
    "num_heads": (1, 1024),
    "mlp_dim": (1, 65536),
    "parallel": (1, 16),
    "num_classes": (0, 1_000_000),
    "num_reg_tokens": (0, 256),
}
MAX_IMG_SIZE = 4096
MAX_NUM_PATCHES = 65536  # a 256 x 256 token grid
MAX_HYBRID_STAGES = 4
MAX_HYBRID_UNITS = 64
MAX_STEM_CHANNELS = 4096
BOOL_FIELDS = ("qkv_bias", "class_token", "pos_embed_class_slot", "zero_head")


@dataclass(frozen=True)
class ViTConfig:
    """Every hyper-parameter of a VisionTransformer. Defaults give the ViT paper's ViT-B/16 at 224."""

    # Input and patches.
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    stem: StemType = "patch"
    # BiT ResNetV2 stage depths of a hybrid stem, e.g. (3, 4, 9) for R50+ViT-B/16.
    hybrid_layers: tuple[int, ...] = ()
    # Channels of a "cnn" stem: its full-resolution conv, then each of its log2(patch_size) pooled
    # groups, e.g. (24, 64, 256) for patch 4.
    stem_channels: tuple[int, ...] = ()
    # Encoder (Table 1 of the paper).
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    # "Three things", #1: each layer sums `parallel` attention branches, then `parallel` MLP branches.
    parallel: int = 1
    gelu: GeluType = "exact"
    norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    # Tokens and positions.
    class_token: bool = True
    # "Vision Transformers Need Registers" (Darcet et al., 2024): learned tokens after the class
    # token, attended to by every token, dropped by every pooling (timm's `reg_token`).
    num_reg_tokens: int = 0
    # "rope": no absolute embedding; queries and keys of patch tokens are rotated by their patch
    # centre's coordinates in [-1, 1] (DINOv3), at frequencies 1 / rope_theta ** (4 k / head_dim).
    pos_embed: PosEmbedType = "learn"
    # True: the class token (and register tokens, as timm) has its own position embedding (vit_jax,
    # timm); False: only patches do (DeiT III, big_vision, DINOv2 with registers).
    pos_embed_class_slot: bool = True
    pos_embed_resample: ResampleMethod = "bicubic"
    rope_theta: float = 100.0
    # Head.
    pool: PoolType = "token"
    # Width of the pre-logits layer (Linear + tanh), the paper's pre-training head; None for none.
    representation_size: int | None = None
    num_classes: int = 1000
    # The paper zero-initialises the classifier (fine-tuning head and the official code's default).
    zero_head: bool = True
    # Regularisation.
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        size = self.img_size
        if _is_int(size):
            size = (size, size)
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(s) for s in size):
            raise ValueError(f"ViTConfig.img_size={self.img_size!r}: expected an integer or two integers")
        object.__setattr__(self, "img_size", tuple(int(s) for s in size))
        layers = self.hybrid_layers
        if not isinstance(layers, (tuple, list)) or not all(_is_int(d) for d in layers):
            raise ValueError(f"ViTConfig.hybrid_layers={layers!r}: expected a list of integers")
        object.__setattr__(self, "hybrid_layers", tuple(int(d) for d in layers))
        channels = self.stem_channels
        if not isinstance(channels, (tuple, list)) or not all(_is_int(c) for c in channels):
            raise ValueError(f"ViTConfig.stem_channels={channels!r}: expected a list of integers")
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in channels))
        self.check_types()
        self.validate()

    def check_types(self) -> None:
        """Each field has its type and lies within its bounds (INT_LIMITS); integers are normalised
        to `int`. Runs before any derived size is computed, so a hostile value fails here."""
        for name, (low, high) in INT_LIMITS.items():
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"ViTConfig.{name}={value!r}: expected an integer")
            if not low <= value <= high:
                raise ValueError(f"ViTConfig.{name}={value!r}: expected an integer in [{low}, {high}]")
            object.__setattr__(self, name, int(value))
        if not all(1 <= s <= MAX_IMG_SIZE for s in self.img_size):
            raise ValueError(f"ViTConfig.img_size={self.img_size}: each side must be in [1, {MAX_IMG_SIZE}]")
        if not 0 <= len(self.hybrid_layers) <= MAX_HYBRID_STAGES or not all(
            1 <= units <= MAX_HYBRID_UNITS for units in self.hybrid_layers
        ):
            raise ValueError(
                f"ViTConfig.hybrid_layers={self.hybrid_layers}: at most {MAX_HYBRID_STAGES} stages "
                f"of 1 to {MAX_HYBRID_UNITS} units"
            )
        if len(self.stem_channels) > 16 or not all(1 <= c <= MAX_STEM_CHANNELS for c in self.stem_channels):
            raise ValueError(
                f"ViTConfig.stem_channels={self.stem_channels}: at most 16 entries of 1 to {MAX_STEM_CHANNELS}"
            )
        width = self.representation_size
        if width is not None and (not _is_int(width) or not 1 <= width <= INT_LIMITS["embed_dim"][1]):
            raise ValueError(
                f"ViTConfig.representation_size={width!r}: expected None or an integer in "
                f"[1, {INT_LIMITS['embed_dim'][1]}]"
            )
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ViTConfig.{name}={getattr(self, name)!r}: expected true or false")
        for name, low, high in (
            ("norm_eps", 0.0, 1.0),
            ("dropout", 0.0, 1.0),
            ("attn_dropout", 0.0, 1.0),
            ("drop_path", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not _is_real(value) or not low <= value < high or (name == "norm_eps" and value == 0):
                bounds = f"(0, {high})" if name == "norm_eps" else f"[{low}, {high})"
                raise ValueError(f"ViTConfig.{name}={value!r}: expected a number in {bounds}")
        theta = self.rope_theta
        if not _is_real(theta) or not math.isfinite(theta) or not 1.0 < theta <= 1e9:
            raise ValueError(f"ViTConfig.rope_theta={theta!r}: expected a number in (1, 1e9]")
        scale = self.layer_scale_init
        if scale is not None and (not _is_real(scale) or not math.isfinite(scale)):
            raise ValueError(f"ViTConfig.layer_scale_init={scale!r}: expected None or a finite number")

    def validate(self) -> None:
        size, stride = self.img_size, self.stride
        checks = {
            f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}": self.embed_dim
            % self.num_heads
            == 0,
            "stem 'hybrid' needs hybrid_layers": self.stem != "hybrid" or len(self.hybrid_layers) > 0,
            "hybrid_layers are only used by stem 'hybrid'": self.stem == "hybrid" or not self.hybrid_layers,
            f"stem 'hmlp' needs a patch_size that is a multiple of 4, not {self.patch_size}": self.stem
            != "hmlp"
            or (self.patch_size >= 4 and self.patch_size % 4 == 0),
            f"stem 'conv' needs a power-of-two patch_size >= 2, not {self.patch_size}": self.stem != "conv"
            or (self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0),
            f"stem 'cnn' needs a power-of-two patch_size >= 2, not {self.patch_size}": self.stem != "cnn"
            or (self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0),
            f"stem 'cnn' with patch_size {self.patch_size} needs {self.patch_size.bit_length()} stem_channels "
            f"(a full-resolution conv and {self.patch_size.bit_length() - 1} pooled groups), "
            f"got {len(self.stem_channels)}": self.stem != "cnn"
            or len(self.stem_channels) == self.patch_size.bit_length(),
            "stem_channels are only used by stem 'cnn'": self.stem == "cnn" or not self.stem_channels,
            "pool 'token' needs class_token=True": self.pool != "token" or self.class_token,
            f"img_size {size[0]}x{size[1]} must be divisible by the stem's stride {stride}": all(
                s % stride == 0 for s in size
            ),
            f"the stem's stride {stride} must not exceed img_size {size[0]}x{size[1]}": all(
                s >= stride for s in size
            ),
            f"num_heads {self.num_heads} must not exceed embed_dim {self.embed_dim}": self.num_heads
            <= self.embed_dim,
            # Two coordinates, each with sin and cos at head_dim / 4 frequencies.
            f"pos_embed 'rope' needs a head width divisible by 4, not {self.head_dim}": self.pos_embed
            != "rope"
            or self.head_dim % 4 == 0,
            "pos_embed 'rope' needs parallel=1": self.pos_embed != "rope" or self.parallel == 1,
        }
        for choice, allowed in (
            ("pool", PoolType),
            ("pos_embed", PosEmbedType),
            ("gelu", GeluType),
            ("stem", StemType),
            ("pos_embed_resample", ResampleMethod),
        ):
            value = getattr(self, choice)
            if value not in allowed.__args__:
                raise ValueError(f"ViTConfig.{choice}={value!r}: expected one of {allowed.__args__}")
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid ViTConfig: {'; '.join(failed)}")
        if self.num_patches > MAX_NUM_PATCHES:
            raise ValueError(
                f"ViTConfig: img_size {self.img_size} at stride {self.stride} gives {self.num_patches} "
                f"patches; at most {MAX_NUM_PATCHES}"
            )

    # Derived quantities ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def stride(self) -> int:
        """Pixels per token along each side: the patch size, times the ResNet's stride for hybrids."""
        if self.stem == "hybrid":
            return hybrid_stride(self.hybrid_layers) * self.patch_size
        return self.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.stride, self.img_size[1] // self.stride)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, then the register tokens."""
        return int(self.class_token) + self.num_reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    # Serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["img_size"] = list(self.img_size)
        out["hybrid_layers"] = list(self.hybrid_layers)
        out["stem_channels"] = list(self.stem_channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a ViTConfig is a JSON object of fields, got {type(data).__name__}")
        check_fields(cls, data, what="ViTConfig")
        data = dict(data)
        for name in ("img_size", "hybrid_layers", "stem_channels"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def replace(self, **overrides: Any) -> ViTConfig:
        check_fields(type(self), overrides, what="ViTConfig")
        return dataclasses.replace(self, **overrides)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def hybrid_stride(hybrid_layers: tuple[int, ...]) -> int:
    """Total stride of the BiT ResNetV2 trunk: 4 in the root, then 2 per stage after the first."""
    return 4 * 2 ** max(len(hybrid_layers) - 1, 0)


def check_fields(cls: type, data: dict[str, Any], what: str) -> None:
    """Unknown keys are errors that list the closest known names, never silently dropped."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TypeError(f"unknown {what} field(s): {', '.join(hints)}; known fields: {', '.join(known)}")


_VARIANT = re.compile(r"^(?:R(?P<resnet>26|50)\+)?(?P<size>Ti|S|B|L|H)/(?P<patch>\d+)$")


def decode_variant(variant: str) -> dict[str, Any]:
    """'B/16' -> width, depth, MLP width, heads and patch size; 'R50+B/16' adds the hybrid trunk.

    The big_vision grammar. R50 hybrids count the patch in ResNet output pixels (1), and their
    `/16` or `/32` is the total stride, which picks how many ResNet stages are used.
    """
    match = _VARIANT.match(variant)
    if match is None:
        raise ValueError(f"cannot decode variant {variant!r}: expected e.g. 'B/16', 'Ti/16', 'R50+L/32'")
    out: dict[str, Any] = dict(SIZES[match["size"]])
    total_stride = int(match["patch"])
    if match["resnet"] is None:
        out["patch_size"] = total_stride
        return out
    stages = {"26": (2, 2, 2, 2), "50": (3, 4, 6, 3)}[match["resnet"]]
    if match["resnet"] == "50" and total_stride == 16:
        # R50+ViT-B/16 of the ViT paper: the third stage grows to 9 units and the fourth is dropped.
        stages = (3, 4, 9)
    elif total_stride != 32:
        raise ValueError(f"cannot decode variant {variant!r}: hybrid strides are 16 or 32")
    out.update(stem="hybrid", hybrid_layers=stages, patch_size=1)
    return out
