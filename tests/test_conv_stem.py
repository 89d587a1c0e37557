"""The convolutional stem (stem="conv", "Early Convolutions Help Transformers See Better"): shapes,
counts against hand computations, gradients, checks and a save/load round trip."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.analysis.flops import count
from vitkit.models import VisionTransformer, ViTConfig
from vitkit.models.stems import ConvStem, conv_stem_channels

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10)


def tiny(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{**TINY, "stem": "conv", **overrides}))


def test_channels_double_up_to_the_width():
    assert conv_stem_channels(16, 384) == [48, 96, 192, 384]  # ViT_C-S of the paper
    assert conv_stem_channels(4, 32) == [16, 32]
    assert conv_stem_channels(2, 32) == [32]


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_tokens_have_the_patch_grid(patch_size):
    stem = ConvStem(patch_size, 3, 32)
    assert len(stem.backbone) == patch_size.bit_length() - 1
    tokens = stem(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, (32 // patch_size) ** 2, 32)  # (B, L, D), row-major grid


def test_model_forward_and_every_parameter_gets_a_gradient():
    model = tiny(zero_head=False)
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    logits.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert model.patch_embed.backbone[0].bn.running_mean.abs().sum() > 0  # BatchNorm statistics moved


def test_a_pixel_reaches_its_neighbours_tokens_unlike_the_patch_stem():
    image = torch.randn(1, 3, 32, 32)
    changed = image.clone()
    changed[..., 3, 3] += 1.0  # bottom-right pixel of patch (0, 0)
    # Each stride-2 3x3 layer (padding 1) reaches outputs 2j - 1 ... 2j + 1: pixel 3 -> level-1 cells
    # 1 and 2 -> tokens 0 and 1 along each side.
    expected = {"conv": [(0, 0), (0, 1), (1, 0), (1, 1)], "patch": [(0, 0)]}
    for stem_name, cells in expected.items():
        stem = tiny(stem=stem_name).patch_embed.eval()
        with torch.no_grad():
            moved = (stem(changed) - stem(image)).abs().amax(-1).reshape(8, 8) > 0
        assert moved.nonzero().tolist() == [list(cell) for cell in cells], stem_name


def test_counts_against_hand_computation():
    counts = count(ViTConfig(**TINY, stem="conv"))
    # 3x3 convs without bias (3->16, 16->32), BatchNorm scale and shift, the 1x1 projection with bias.
    params = 3 * 16 * 9 + 2 * 16 + 16 * 32 * 9 + 2 * 32 + 32 * 32 + 32
    assert counts.params_by_component["stem"] == params == 6192
    macs = 16 * 16 * 16 * 27 + 8 * 8 * 32 * 144 + 8 * 8 * 32 * 32  # outputs x (in_chans x kernel)
    norm_ops = 5 * (16 * 16 * 16) + 5 * (8 * 8 * 32)  # each BatchNorm as an affine norm
    assert counts.macs_by_component["stem"] == macs + norm_ops == 501760
    assert counts.params == sum(p.numel() for p in tiny().parameters())


@pytest.mark.parametrize("patch_size", [1, 6, 12])
def test_patch_size_must_be_a_power_of_two(patch_size):
    with pytest.raises(
        ValueError, match=f"stem 'conv' needs a power-of-two patch_size >= 2, not {patch_size}"
    ):
        ViTConfig(**{**TINY, "patch_size": patch_size, "img_size": 48}, stem="conv")


def test_save_and_load_round_trip(tmp_path):
    model = tiny().eval()
    model.patch_embed.backbone[0].bn.running_var.fill_(2.0)
    path = tmp_path / "conv.safetensors"
    vitkit.save(model, path)
    loaded = vitkit.load(path).eval()
    assert loaded.config.stem == "conv"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_layouts_without_a_conv_stem_and_masked_pretraining_refuse_it(tmp_path) -> None:
    from vitkit.convert import write_layout
    from vitkit.files import CheckpointError
    from vitkit.models.masked import MaskedConfig, MaskedPatchModel

    model = VisionTransformer(ViTConfig(**TINY, stem="conv"))
    for target, name in (("timm", "t.safetensors"), ("npz", "v.npz"), ("hf", "hf"), ("mmpretrain", "m.pth")):
        with pytest.raises((CheckpointError, ValueError), match="conv"):
            write_layout(model, tmp_path / name, target)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="conv stem"):
        MaskedPatchModel(model, MaskedConfig())
