"""The model family: one config dataclass, one VisionTransformer, stems and position embeddings."""

from .config import SIZES, ViTConfig, decode_variant
from .pos_embed import resample_pos_embed, sincos_2d
from .vit import Attention, Block, Mlp, ParallelBlock, VisionTransformer

__all__ = [
    "SIZES",
    "Attention",
    "Block",
    "Mlp",
    "ParallelBlock",
    "ViTConfig",
    "VisionTransformer",
    "decode_variant",
    "resample_pos_embed",
    "sincos_2d",
]
