"""HuggingFace transformers as the source model: tiny ViT and DINOv2 built offline from a config,
saved with save_pretrained, loaded by vitkit; and vitkit -> HF folder -> transformers."""

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.convert import read_checkpoint, write_layout
from vitkit.models.vit import VisionTransformer

transformers = pytest.importorskip(
    "transformers", reason="peer equivalence needs transformers (extra 'peers')"
)
pytestmark = pytest.mark.peers

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (LayerNorms included), so no mapping error hides behind ones and zeros."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_hf_vit_logits(tmp_path, hidden_act):
    config = transformers.ViTConfig(**SIZE, intermediate_size=64, num_labels=5, hidden_act=hidden_act)
    source = randomise(transformers.ViTForImageClassification(config))
    source.save_pretrained(tmp_path / "hf")
    assert read_checkpoint(tmp_path / "hf").layout == "hf"
    model = vitkit.load(tmp_path / "hf", keep_source_numerics=True).eval()
    assert model.config.norm_eps == 1e-12 and model.config.gelu == (
        "exact" if hidden_act == "gelu" else "tanh"
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=images).logits
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)
        # At another resolution both interpolate the position embeddings bicubically.
        bigger = torch.randn(1, 3, 48, 48)
        expected = source(pixel_values=bigger, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(model(bigger), expected, atol=1e-5, rtol=0)


def test_hf_vit_model_pooler_is_pre_logits(tmp_path):
    config = transformers.ViTConfig(**SIZE, intermediate_size=64)
    source = randomise(transformers.ViTModel(config))
    source.save_pretrained(tmp_path / "hf")
    model = vitkit.load(tmp_path / "hf", keep_source_numerics=True).eval()
    assert model.config.num_classes == 0 and model.config.representation_size == 32
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = source(pixel_values=images)
        torch.testing.assert_close(model.forward_features(images), out.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(images), out.pooler_output, atol=1e-5, rtol=0)


def test_dinov2_features(tmp_path):
    config = transformers.Dinov2Config(**{**SIZE, "image_size": 28, "patch_size": 14}, layerscale_value=0.5)
    source = randomise(transformers.Dinov2Model(config))
    source.save_pretrained(tmp_path / "dino")
    assert read_checkpoint(tmp_path / "dino").layout == "dinov2"
    model = vitkit.load(tmp_path / "dino", keep_source_numerics=True).eval()
    assert model.config.patch_size == 14 and model.config.layer_scale_init == 0.5
    for size in (28, 42):  # the checkpoint's grid, then a resampled one
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = source(pixel_values=images)
            torch.testing.assert_close(
                model.forward_features(images), out.last_hidden_state, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(model(images), out.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_vitkit_to_hf_logits(tmp_path, gelu):
    torch.manual_seed(0)
    model = randomise(VisionTransformer(tiny_config(gelu=gelu, norm_eps=1e-12)))
    path = write_layout(model, tmp_path / "hf", "hf")
    peer = transformers.ViTForImageClassification.from_pretrained(path).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peer(pixel_values=images).logits, model(images), atol=1e-5, rtol=0)
