"""The registry: names, aliases, overrides, and errors that list close matches."""

import pytest
import torch

from vitkit import create_model, get_config, list_models
from vitkit.models.config import SIZES, ViTConfig, decode_variant


def test_grid_of_names_exists():
    for size in ("tiny", "small", "base", "large", "huge"):
        for patch in (14, 16, 32):
            assert f"vit_{size}_patch{patch}_224" in list_models()
            assert f"vit_{size}_patch{patch}_224_in21k" in list_models()
        assert f"vit_{size}_patch16_384" in list_models() and f"vit_{size}_patch32_384" in list_models()
        assert f"vit_{size}_patch14_518" in list_models()
    for name in ("vit_base_r50_s16_224", "vit_base_r50_s16_384", "vit_large_r50_s32_384"):
        assert get_config(name).stem == "hybrid"


def test_in21k_variants_have_pre_logits_and_21843_classes():
    config = get_config("vit_large_patch16_224_in21k")
    assert (config.num_classes, config.representation_size) == (21843, 1024)
    with torch.device("meta"):
        model = create_model("vit_base_patch16_224_in21k")
    assert model.pre_logits.fc.out_features == 768 and isinstance(model.pre_logits.act, torch.nn.Tanh)


def test_sizes_table_matches_the_paper():
    assert SIZES["B"] == dict(embed_dim=768, depth=12, mlp_dim=3072, num_heads=12)
    assert SIZES["L"] == dict(embed_dim=1024, depth=24, mlp_dim=4096, num_heads=16)
    assert SIZES["H"] == dict(embed_dim=1280, depth=32, mlp_dim=5120, num_heads=16)
    assert decode_variant("R50+B/16") == {
        **SIZES["B"],
        "stem": "hybrid",
        "hybrid_layers": (3, 4, 9),
        "patch_size": 1,
    }
    with pytest.raises(ValueError, match="cannot decode"):
        decode_variant("X/16")


@pytest.mark.parametrize(
    "alias,name",
    [
        ("B/16", "vit_base_patch16_224"),
        ("L/16@384", "vit_large_patch16_384"),
        ("R50+B/16", "vit_base_r50_s16_224"),
        ("Ti/16", "vit_tiny_patch16_224"),
    ],
)
def test_aliases(alias, name):
    assert get_config(alias) == get_config(name)


def test_list_models_pattern():
    assert list_models("vit_base_patch16_*") == sorted(list_models("vit_base_patch16_*"))
    assert "vit_large_patch16_384" not in list_models("vit_base_*")
    assert list_models("*_18x2_*") == ["vit_base_patch16_18x2_224", "vit_small_patch16_18x2_224"]


def test_unknown_name_and_override_raise_with_close_matches():
    with pytest.raises(KeyError, match="vit_base_patch16_224"):
        create_model("vit_base_pach16_224")
    with pytest.raises(TypeError, match="did you mean num_classes"):
        create_model("vit_tiny_patch16_224", num_clases=10)
    with pytest.raises(ValueError, match="pool"):
        get_config("vit_tiny_patch16_224", pool="avg")


def test_overrides_and_config_round_trip():
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=64)
    assert model.head.out_features == 10 and model.pos_embed.shape == (1, 17, 192)
    config = model.config
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="unknown ViTConfig"):
        ViTConfig.from_dict({**config.to_dict(), "colour": "red"})
    assert create_model(config, depth=1).config.depth == 1
