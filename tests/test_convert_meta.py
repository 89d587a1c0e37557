"""Every full-size registered variant maps its keys and shapes into and out of each writable layout, on
the `meta` device (no memory), and its config is inferred back from the converted tensors."""

import pytest
import torch

from vitkit.convert import LAYOUTS, TARGETS, infer_config
from vitkit.models.vit import VisionTransformer
from vitkit.registry import get_config, list_models

WRITABLE = [name for name in TARGETS.values() if name is not None]
# Fields that only seed a fresh model's init; a checkpoint's tensors replace what they set.
INIT_ONLY = ("zero_head", "layer_scale_init")


def meta_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return VisionTransformer(get_config(name)).state_dict()


@pytest.mark.parametrize("name", list_models())
def test_every_variant_maps_keys_and_shapes(name):
    config = get_config(name)
    state = meta_state(name)
    shapes = {key: value.shape for key, value in state.items()}
    # timm's table reads every vitkit name, including stems timm itself has no writer for.
    native, unused, missing = LAYOUTS["timm"].table.to_native(state)
    assert not unused and not missing and {k: v.shape for k, v in native.items()} == shapes
    inferred = infer_config(native)
    assert inferred == config.replace(**{field: getattr(inferred, field) for field in INIT_ONLY})

    written = 0
    for layout_name in WRITABLE:
        layout = LAYOUTS[layout_name]
        if layout.limits(config):
            continue
        prepared, prepared_config = layout.prepare(state, config)
        foreign = layout.write(prepared, prepared_config)
        assert len(foreign) >= len(prepared)  # fused q/k/v may split; no tensor is lost
        back, unused, missing = layout.table_for(foreign).to_native(foreign)
        assert not unused and not missing, layout_name
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in prepared.items()}, layout_name
        written += 1
    # Only the hMLP stem (vitkit's own) has no foreign writer beyond timm-style names.
    assert written >= (1 if config.stem != "hmlp" else 0)


def test_google_layouts_split_heads_on_full_size_models():
    state = meta_state("vit_huge_patch14_224_in21k")
    foreign = LAYOUTS["vit_jax"].write(state, get_config("vit_huge_patch14_224_in21k"))
    assert foreign["Transformer/encoderblock_31/MultiHeadDotProductAttention_1/query/kernel"].shape == (
        1280,
        16,
        80,
    )
    assert foreign["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (
        16,
        80,
        1280,
    )
    assert foreign["embedding/kernel"].shape == (14, 14, 3, 1280)
    assert foreign["pre_logits/kernel"].shape == (1280, 1280) and foreign["head/kernel"].shape == (
        1280,
        21843,
    )
    hybrid = LAYOUTS["vit_jax"].write(meta_state("vit_base_r50_s16_384"), get_config("vit_base_r50_s16_384"))
    assert hybrid["block3/unit9/conv3/kernel"].shape == (1, 1, 256, 1024)
    assert hybrid["Transformer/posembed_input/pos_embedding"].shape == (1, 577, 768)


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_hmlp_patch_size_is_inferred_from_its_first_projection(patch):
    config = get_config("vit_tiny_patch16_224", stem="hmlp", patch_size=patch, img_size=32)
    with torch.device("meta"):
        state = VisionTransformer(config).state_dict()
    assert infer_config(state).patch_size == patch
