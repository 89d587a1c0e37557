"""The "cnn" stem (a small CNN as the hybrid's trunk: a full-resolution conv, then conv / max-pool
groups): shapes, counts against hand computations, gradients, checks and a save/load round trip."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.analysis.flops import count
from vitkit.models import VisionTransformer, ViTConfig
from vitkit.models.stems import CnnStem

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10)
CHANNELS = (8, 16, 24)


def tiny(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{**TINY, "stem": "cnn", "stem_channels": CHANNELS, **overrides}))


@pytest.mark.parametrize("patch_size, channels", [(2, (8, 16)), (4, (8, 16, 24)), (8, (8, 16, 24, 32))])
def test_each_group_halves_the_grid(patch_size, channels):
    stem = CnnStem(channels, patch_size, 3, 32)
    assert len(stem.backbone) == 3 + len(channels) - 1  # conv-BN-GELU, then one entry per group
    assert stem(torch.randn(2, 3, 32, 32)).shape == (2, (32 // patch_size) ** 2, 32)


def test_projection_only_when_the_widths_differ():
    assert isinstance(CnnStem((8, 32), 2, 3, 32).proj, torch.nn.Identity)
    assert isinstance(CnnStem((8, 24), 2, 3, 32).proj, torch.nn.Conv2d)


def test_every_parameter_gets_a_gradient_and_the_statistics_move():
    model = tiny(zero_head=False)
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    logits.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert model.patch_embed.backbone[1].running_mean.abs().sum() > 0


def test_channels_last_maps_give_the_same_tokens_and_gradients_and_keep_the_weights_layout():
    model = tiny(zero_head=False).eval()
    images = torch.randn(3, 3, 32, 32)
    grads = {}
    for layout in (False, True):
        model.patch_embed.channels_last = layout
        model.zero_grad()
        logits = model(images)
        logits.square().sum().backward()
        grads[layout] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in grads[False][1].items():  # summation order differs: fp32 rounding of the largest entry
        assert (grads[True][1][name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    assert all(t.is_contiguous() for t in model.state_dict().values())  # safetensors writes them as they are


def test_counts_against_hand_computation():
    counts = count(ViTConfig(**TINY, stem="cnn", stem_channels=CHANNELS))
    # 3x3 convs without bias: 3->8 at 32 px; per group c_in->c_out, pool, c_out->c_out; BN scale and
    # shift after each conv; the 1x1 projection 24->32 with bias.
    params = 3 * 8 * 9 + 2 * 8
    params += 8 * 16 * 9 + 16 * 16 * 9 + 4 * 16
    params += 16 * 24 * 9 + 24 * 24 * 9 + 4 * 24
    params += 24 * 32 + 32
    assert counts.params_by_component["stem"] == params == 13288
    # Each group's first conv runs before its pool (at the larger size), its second after.
    macs = 32 * 32 * 8 * 27 + 32 * 32 * 16 * 72 + 16 * 16 * 16 * 144 + 16 * 16 * 24 * 144
    macs += 8 * 8 * 24 * 216 + 8 * 8 * 32 * 24
    norm_ops = 5 * (32 * 32 * 8 + 2 * 16 * 16 * 16 + 2 * 8 * 8 * 24)  # each BatchNorm as an affine norm
    assert counts.macs_by_component["stem"] == macs + norm_ops == 3353600
    assert counts.params == sum(p.numel() for p in tiny().parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(stem_channels=(8, 16)), "stem 'cnn' with patch_size 4 needs 3 stem_channels"),
        (dict(stem_channels=()), "stem 'cnn' with patch_size 4 needs 3 stem_channels"),
        (dict(patch_size=6, img_size=48), "stem 'cnn' needs a power-of-two patch_size >= 2, not 6"),
        (dict(stem_channels=(8, 0, 16)), r"stem_channels=\(8, 0, 16\): at most 16 entries of 1 to 4096"),
        (dict(stem_channels="8,16,24"), "stem_channels='8,16,24': expected a list of integers"),
        (dict(stem="patch"), "stem_channels are only used by stem 'cnn'"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{**TINY, "stem": "cnn", "stem_channels": CHANNELS, **overrides})


def test_save_and_load_round_trip(tmp_path):
    model = tiny().eval()
    model.patch_embed.backbone[1].running_var.fill_(2.0)
    path = tmp_path / "cnn.safetensors"
    vitkit.save(model, path)
    loaded = vitkit.load(path).eval()
    assert (loaded.config.stem, loaded.config.stem_channels) == ("cnn", CHANNELS)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_layouts_without_the_stem_and_masked_pretraining_refuse_it(tmp_path) -> None:
    from vitkit.convert import write_layout
    from vitkit.files import CheckpointError
    from vitkit.models.masked import MaskedConfig, MaskedPatchModel

    model = tiny()
    for target, name in (("timm", "t.safetensors"), ("npz", "v.npz"), ("hf", "hf"), ("mmpretrain", "m.pth")):
        with pytest.raises(CheckpointError, match="cnn stem|stem 'cnn'"):
            write_layout(model, tmp_path / name, target)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="the cnn stem's convolutions"):
        MaskedPatchModel(model, MaskedConfig())


STEM_CONFIGS = {
    "patch": dict(stem="patch"),
    "hmlp": dict(stem="hmlp", patch_size=16),
    "hybrid": dict(stem="hybrid", hybrid_layers=(1,), patch_size=1),
    "conv": dict(stem="conv"),
    "cnn": dict(stem="cnn", stem_channels=CHANNELS),
}


def test_every_stem_type_is_listed_here():
    from typing import get_args

    from vitkit.models.config import StemType

    assert sorted(STEM_CONFIGS) == sorted(get_args(StemType))


@pytest.mark.parametrize("name", sorted(STEM_CONFIGS))
def test_bf16_inference_casts_the_images_at_every_stem(name):
    """`prepare_inference` stores the weights in bf16 and casts float images at the stem, whatever
    the stem (a stem it does not know gets float images against bf16 weights and fails)."""
    from vitkit.fast import prepare_inference

    torch.manual_seed(0)
    config = ViTConfig(**{**TINY, "img_size": 32, "zero_head": False, **STEM_CONFIGS[name]})
    model = VisionTransformer(config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        model, precision = prepare_inference(model, "cpu", "bf16")
        logits = model(images)
    assert precision == "bf16" and logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.1)
