"""DINOv3's rotary position embeddings: the angles by hand, the relative-position property, models
at any grid, layouts that refuse them, and HF's DINOv3ViTModel as the reference."""

import math

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from helpers import tiny_config
from vitkit.analysis.draw import stages
from vitkit.analysis.flops import count
from vitkit.cli import main
from vitkit.convert import read_checkpoint, write_layout
from vitkit.files import CheckpointError
from vitkit.models.masked import MaskedConfig, MaskedPatchModel
from vitkit.models.rope import apply_rope, patch_centres, rope_2d, rope_frequencies
from vitkit.models.vit import VisionTransformer


def test_angles_by_hand():
    # head_dim 8: frequencies 1 / 100 ** (0, 1/2) = (1, 0.1); a 1 x 2 grid has centres y = 0, x = -1/2, 1/2.
    torch.testing.assert_close(rope_frequencies(8, 100.0), torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(patch_centres((1, 2)), torch.tensor([[0.0, -0.5], [0.0, 0.5]]))
    cos, sin = rope_2d((1, 2), 8, 100.0)
    for patch, x in enumerate((-0.5, 0.5)):
        angles = torch.tensor([0.0, 0.0, 2 * math.pi * x, 2 * math.pi * x * 0.1] * 2)
        torch.testing.assert_close(cos[patch], angles.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[patch], angles.sin(), atol=1e-6, rtol=0)


def test_scores_depend_only_on_relative_position_and_prefix_stays():
    torch.manual_seed(0)
    grid, head_dim = (3, 3), 16
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)
    prefix = torch.randn(1, 1, 2, head_dim)
    queries = torch.cat([prefix, q.expand(1, 1, 9, head_dim)], dim=2)
    keys = torch.cat([prefix, k.expand(1, 1, 9, head_dim)], dim=2)
    rotated_q, rotated_k = apply_rope(queries, keys, *rope_2d(grid, head_dim, 100.0))
    assert torch.equal(rotated_q[:, :, :2], prefix) and torch.equal(rotated_k[:, :, :2], prefix)
    scores = (rotated_q[0, 0, 2:] @ rotated_k[0, 0, 2:].T).reshape(3, 3, 3, 3)
    # (0,0)->(1,1) and (1,1)->(2,2) are the same offset: the same score. Rotations keep the norm.
    torch.testing.assert_close(scores[0, 0, 1, 1], scores[1, 1, 2, 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[0, 1, 1, 2], scores[1, 0, 2, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated_q[0, 0, 2:].norm(dim=-1), q.norm().expand(9), atol=1e-5, rtol=0)


def rope_model(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    fields = dict(pos_embed="rope", num_reg_tokens=2, layer_scale_init=0.5, num_classes=0)
    return VisionTransformer(tiny_config(**{**fields, **overrides})).eval()


def test_rope_model_runs_at_any_grid_and_trains():
    model = rope_model()
    assert model.pos_embed is None
    with torch.no_grad():
        for size in ((32, 32), (48, 48), (24, 40)):
            features = model.forward_features(torch.randn(2, 3, *size))
            assert features.shape == (2, 3 + size[0] // 8 * size[1] // 8, 32)
        # Positions matter: the same patches in another order give other features.
        images = torch.randn(1, 3, 32, 32)
        flipped = model.forward_features(images.flip(-1))[:, 3:].reshape(4, 4, 32).flip(1)
        assert not torch.allclose(flipped, model.forward_features(images)[:, 3:].reshape(4, 4, 32))
        weights = model.forward_intermediates(images, attention=True)["attention"]
        assert weights[0].shape == (1, 4, 19, 19)
    model.train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_masked_pretraining_with_rope():
    model = MaskedPatchModel(rope_model(), MaskedConfig())
    loss, _ = model(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_config(pos_embed="rope", embed_dim=24, num_heads=4)  # head width 6
    with pytest.raises(ValueError, match="parallel=1"):
        tiny_config(pos_embed="rope", parallel=2)
    with pytest.raises(ValueError, match="rope_theta"):
        tiny_config(rope_theta=0.5)


def test_architecture_table_and_counts_name_registers_and_rope():
    config = tiny_config(pos_embed="rope", num_reg_tokens=2)
    table = {stage.name: stage for stage in stages(config)}
    assert table["tokens"].detail == "class token + 2 registers + rotary positions (in attention)"
    assert table["tokens"].num_params == 3 * 32  # class token and registers; RoPE stores nothing
    assert sum(stage.num_params for stage in table.values()) == count(config).params
    assert count(config).params_by_component["tokens"] == 3 * 32


def test_native_round_trip(tmp_path):
    model = rope_model()
    vitkit.save(model, tmp_path / "rope.safetensors")
    loaded = vitkit.load(tmp_path / "rope.safetensors").eval()
    assert loaded.config == model.config
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), model.forward_features(images))


@pytest.mark.parametrize(
    "to,message",
    [
        ("timm", "rotary position embeddings"),
        ("hf", "position embedding 'rope'"),
        ("npz", "position embedding 'rope'"),
        ("mmpretrain", "position embedding 'rope'"),
    ],
)
def test_layouts_without_rope_refuse(tmp_path, to, message):
    suffix = {"timm": ".pth", "hf": "", "npz": ".npz", "mmpretrain": ".pth"}[to]
    with pytest.raises(CheckpointError, match=message):
        write_layout(rope_model(num_reg_tokens=0, layer_scale_init=None), tmp_path / f"out{suffix}", to=to)


# transformers as the reference ----------------------------------------------------------------------
def hf_dinov3(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers", reason="peer equivalence needs transformers")
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
        layerscale_value=0.5,
    )
    source = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**fields, **overrides}))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0, 0.2)
    source.eval().save_pretrained(tmp_path / "dinov3")
    return source, tmp_path / "dinov3"


@pytest.mark.peers
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the released models: 4 registers, no key bias, eps 1e-5, theta 100
        {"num_register_tokens": 0, "key_bias": True, "rope_theta": 1000.0, "proj_bias": False},
    ],
)
def test_hf_dinov3_features(tmp_path, overrides):
    source, folder = hf_dinov3(tmp_path, **overrides)
    assert read_checkpoint(folder).layout == "dinov3_vit"
    model = vitkit.load(folder).eval()  # nothing to pass: eps, RoPE and registers come from the folder
    assert model.config.pos_embed == "rope" and model.config.norm_eps == 1e-5
    assert model.config.num_reg_tokens == overrides.get("num_register_tokens", 4)
    for size in ((32, 32), (48, 48), (40, 56)):
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = source(pixel_values=images)
            torch.testing.assert_close(
                model.forward_features(images), out.last_hidden_state, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(model(images), out.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.peers
def test_bare_state_dict_file(tmp_path):
    """A torch state_dict() (layers under `model.`) without config.json: the folder's facts are passed."""
    source, _ = hf_dinov3(tmp_path)
    save_file(source.state_dict(), tmp_path / "dinov3.safetensors")
    assert read_checkpoint(tmp_path / "dinov3.safetensors").layout == "dinov3_vit"
    model = vitkit.load(
        tmp_path / "dinov3.safetensors", num_heads=4, pos_embed="rope", norm_eps=1e-5, img_size=32
    ).eval()
    images = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), source(pixel_values=images).last_hidden_state, atol=1e-5, rtol=0
        )


@pytest.mark.peers
def test_gated_mlp_is_refused(tmp_path):
    _, folder = hf_dinov3(tmp_path, use_gated_mlp=True, hidden_act="silu")
    with pytest.raises(CheckpointError, match="gated \\(SwiGLU\\) MLP"):
        vitkit.load(folder)


@pytest.mark.peers
def test_convert_command(tmp_path, capsys):
    source, folder = hf_dinov3(tmp_path)
    assert main(["convert", str(folder), str(tmp_path / "v3.safetensors"), "--to", "vitkit"]) == 0
    model = vitkit.load(tmp_path / "v3.safetensors").eval()
    images = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), source(pixel_values=images).last_hidden_state, atol=1e-5, rtol=0
        )
    assert main(["convert", str(folder), str(tmp_path / "v3.npz"), "--to", "npz"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vitkit convert: error: the vit_jax layout cannot hold this model: LayerScale")
    assert "position embedding 'rope'" in error
