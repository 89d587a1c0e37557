"""timm, mmpretrain, DeiT III and HF (without transformers): tiny models written in each layout convert
in and back out bitwise, with the documented key names, and compute the same logits."""

import logging

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from helpers import tiny_config
from vitkit.convert import read_checkpoint, write_layout
from vitkit.models.vit import VisionTransformer

# Init-only fields that tensors cannot tell; everything else must be inferred exactly.
INIT_ONLY = ("zero_head", "layer_scale_init")


def build(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(tiny_config(**overrides)).eval()


def assert_same_model(loaded: VisionTransformer, model: VisionTransformer) -> None:
    expected = model.config.replace(**{field: getattr(loaded.config, field) for field in INIT_ONLY})
    assert loaded.config == expected
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))


TIMM_CASES = {
    "standard": dict(),
    "hybrid": dict(stem="hybrid", hybrid_layers=(1, 1), patch_size=1),
    "layer_scale": dict(layer_scale_init=0.1),
    "no_embed_class": dict(layer_scale_init=0.1, pos_embed_class_slot=False, pool="gap_fc_norm"),
    "parallel_18x2": dict(parallel=2, layer_scale_init=0.1),
    "map": dict(pool="map", class_token=False),
}
TIMM_NAMES = {
    "standard": [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.1.attn.qkv.weight",
        "head.bias",
    ],
    "hybrid": [
        "patch_embed.backbone.stem.conv.weight",
        "patch_embed.backbone.stages.1.blocks.0.downsample.conv.weight",
        "patch_embed.backbone.stages.0.blocks.0.norm3.weight",
    ],
    "layer_scale": ["blocks.0.ls1.gamma", "blocks.1.ls2.gamma"],
    "no_embed_class": ["fc_norm.weight"],
    "parallel_18x2": [
        "blocks.0.attns.1.attn.qkv.weight",
        "blocks.1.ffns.1.ls.gamma",
        "blocks.0.ffns.0.mlp.fc2.bias",
    ],
    "map": ["attn_pool.latent", "attn_pool.kv.weight", "attn_pool.mlp.fc1.weight"],
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_round_trip(tmp_path, case, suffix):
    model = build(**TIMM_CASES[case])
    path = write_layout(model, tmp_path / f"timm{suffix}", "timm")
    state = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    assert set(TIMM_NAMES[case]) <= set(state)
    assert read_checkpoint(path).layout == "timm"
    assert_same_model(vitkit.load(path, num_heads=4, pool=model.config.pool), model)
    if case == "no_embed_class":
        assert state["pos_embed"].shape == (1, 16, 32)  # patches only


def test_timm_training_checkpoint_is_unwrapped(tmp_path):
    model = build()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    assert_same_model(vitkit.load(path, num_heads=4), model)


@pytest.mark.parametrize(
    "overrides", [dict(), dict(layer_scale_init=0.1, representation_size=16)], ids=["plain", "ls_prelogits"]
)
def test_mmpretrain_round_trip(tmp_path, overrides):
    model = build(**overrides)
    path = write_layout(model, tmp_path / "mm.pth", "mmpretrain")
    state = torch.load(path, weights_only=True)["state_dict"]
    expected = {
        "backbone.patch_embed.projection.weight",
        "backbone.layers.1.ffn.layers.0.0.weight",
        "backbone.layers.1.ffn.layers.1.bias",
        "backbone.layers.0.ln1.weight",
        "backbone.ln1.weight",
        "head.layers.head.weight",
    }
    if overrides:
        expected |= {"backbone.layers.0.attn.gamma1.weight", "backbone.layers.0.ffn.gamma2.weight"}
        expected |= {"head.layers.pre_logits.weight"}
    assert expected <= set(state)
    assert torch.equal(state["backbone.layers.0.attn.qkv.weight"], model.blocks[0].attn.qkv.weight)
    assert_same_model(vitkit.load(path, num_heads=4), model)
    again = write_layout(vitkit.load(path, num_heads=4), tmp_path / "again.pth", "mmpretrain")
    for key, value in torch.load(again, weights_only=True)["state_dict"].items():
        assert torch.equal(value, state[key]), key


def deit3_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The facebookresearch/deit models_v2 names, written out by hand (independent of vitkit's table)."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        for branch, suffix in ((0, ""), (1, "1")):
            key = key.replace(f".attns.{branch}.norm.", f".norm1{suffix}.")
            key = key.replace(f".attns.{branch}.attn.", f".attn{suffix}.")
            key = key.replace(f".attns.{branch}.ls.gamma", ".gamma_1" + ("_1" if branch else ""))
            key = key.replace(f".ffns.{branch}.norm.", f".norm2{suffix}.")
            key = key.replace(f".ffns.{branch}.mlp.", f".mlp{suffix}.")
            key = key.replace(f".ffns.{branch}.ls.gamma", ".gamma_2" + ("_1" if branch else ""))
        out[key] = value
    return out


@pytest.mark.parametrize("parallel", [1, 2], ids=["deit3", "deit3_paralx2"])
def test_deit3_reads(tmp_path, parallel):
    model = build(layer_scale_init=0.1, pos_embed_class_slot=False, parallel=parallel)
    state = deit3_state(model)
    assert ("blocks.0.norm11.weight" in state) == (parallel == 2) and "blocks.1.gamma_2" in state
    path = tmp_path / "deit3.pth"
    torch.save({"model": state}, path)
    assert read_checkpoint(path).layout == "deit"
    assert_same_model(vitkit.load(path, num_heads=4), model)


def test_hf_folder_round_trip_without_transformers(tmp_path):
    model = build()
    path = write_layout(model, tmp_path / "hf", "hf")
    assert read_checkpoint(path).layout == "hf"
    state = load_file(path / "model.safetensors")
    assert "vit.encoder.layer.1.attention.attention.value.weight" in state
    assert torch.equal(
        state["vit.encoder.layer.0.attention.attention.key.weight"], model.blocks[0].attn.qkv.weight[32:64]
    )
    assert_same_model(vitkit.load(path, norm_eps=1e-6), model)
    # The source's numerics on request: the config.json eps.
    assert vitkit.load(path, keep_source_numerics=True).config.norm_eps == 1e-6


def test_hf_headless_model_uses_the_pooler_as_pre_logits(tmp_path):
    model = build(num_classes=0, representation_size=32)
    path = write_layout(model, tmp_path / "hf", "hf")
    assert "pooler.dense.weight" in load_file(path / "model.safetensors")  # ViTModel names
    assert_same_model(vitkit.load(path), model)


def test_forced_layout_and_layout_report(tmp_path, caplog):
    model = build()
    path = write_layout(model, tmp_path / "m.safetensors", "timm")
    with caplog.at_level(logging.INFO, logger="vitkit"):
        vitkit.load(path, num_heads=4)
    assert "detected the timm layout" in caplog.text
    with pytest.raises(vitkit.io.CheckpointError, match="no key matches the mmpretrain layout"):
        vitkit.load(path, layout="mmpretrain", num_heads=4)


def test_convert_to_vitkit_and_back_to_timm_is_bitwise(tmp_path):
    model = build(layer_scale_init=0.1)
    timm_path = write_layout(model, tmp_path / "t.safetensors", "timm")
    native = vitkit.convert.convert(timm_path, tmp_path / "native.safetensors", to="vitkit", num_heads=4).path
    assert read_checkpoint(native).layout == "vitkit"
    again = vitkit.convert.convert(native, tmp_path / "again.safetensors", to="timm").path
    first, second = load_file(timm_path), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resampled_on_load(tmp_path):
    model = build()
    path = write_layout(model, tmp_path / "hf", "hf")
    bigger = vitkit.load(path, img_size=48)
    assert bigger.pos_embed.shape == (1, 37, 32)
