"""Tiny configs shared by the tests: width 32, depth 2, 32 px images run in milliseconds."""

from vitkit.models.config import ViTConfig


def tiny_config(**overrides) -> ViTConfig:
    base = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        num_classes=5,
        zero_head=False,
    )
    return ViTConfig(**{**base, **overrides})
