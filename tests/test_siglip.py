"""HuggingFace SigLIP and SigLIP 2 (NaFlex) image towers: tiny random models saved with save_pretrained,
read by `vitkit.load(folder)`, equal to transformers' last_hidden_state, pooler_output and logits at
the native size and at other sizes; two-tower folders give their image tower; the layouts that cannot
hold a SigLIP tower refuse it in one line."""

from pathlib import Path

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.cli import main
from vitkit.convert import CheckpointFile, read_checkpoint, to_native
from vitkit.files import CheckpointError
from vitkit.models.vit import VisionTransformer

transformers = pytest.importorskip(
    "transformers", reason="peer equivalence needs transformers (extra 'peers')"
)
pytestmark = pytest.mark.peers

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
PATCH = TOWER["patch_size"]
SIZES = [(32, 32), (48, 40), (16, 24)]  # native, larger and non-square, smaller (downsampled grid)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (LayerNorms and the MAP probe included)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval()


def naflex_inputs(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Siglip2ImageProcessor's format for one unpadded size: (row, column, channel) flattened patches."""
    batch, channels, height, width = images.shape
    rows, cols = height // PATCH, width // PATCH
    patches = images.reshape(batch, channels, rows, PATCH, cols, PATCH).permute(0, 2, 4, 3, 5, 1)
    return dict(
        pixel_values=patches.reshape(batch, rows * cols, -1),
        pixel_attention_mask=torch.ones(batch, rows * cols, dtype=torch.long),
        spatial_shapes=torch.tensor([[rows, cols]] * batch),
    )


def tower(kind: str, **config):
    if kind == "siglip":
        return transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**TOWER, image_size=32, **config)
        )
    return transformers.Siglip2VisionModel(
        transformers.Siglip2VisionConfig(**TOWER, num_patches=16, **config)
    )


def reference(source, kind: str, images: torch.Tensor):
    if kind == "siglip":
        return source(pixel_values=images, interpolate_pos_encoding=images.shape[-2:] != (32, 32))
    return source(**naflex_inputs(images))


@pytest.mark.parametrize("kind", ["siglip", "siglip2_naflex"])
def test_vision_model_matches_transformers(tmp_path, kind):
    source = randomise(tower(kind))
    source.save_pretrained(tmp_path / kind)
    assert read_checkpoint(tmp_path / kind).layout == "siglip"
    model = vitkit.load(tmp_path / kind).eval()  # no option to guess
    config = model.config
    assert (config.class_token, config.pool, config.img_size, config.num_classes) == (
        False,
        "map",
        (32, 32),
        0,
    )
    assert (config.gelu, config.norm_eps) == ("tanh", 1e-6)
    assert config.pos_embed_resample == ("bicubic" if kind == "siglip" else "bilinear_antialias")
    torch.manual_seed(1)
    for size in SIZES:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = reference(source, kind, images)
            tokens = model.forward_features(images)
            pooled = model(images)
        torch.testing.assert_close(tokens, expected.last_hidden_state, rtol=0, atol=1e-5, msg=f"{size}")
        torch.testing.assert_close(pooled, expected.pooler_output, rtol=0, atol=1e-5, msg=f"{size}")


def test_tower_without_head_averages(tmp_path):
    source = randomise(tower("siglip", vision_use_head=False))
    source.save_pretrained(tmp_path / "nohead")
    model = vitkit.load(tmp_path / "nohead", keep_source_numerics=True).eval()
    assert model.config.pool == "gap" and model.attn_pool is None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model.forward_features(images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(images), expected.mean(dim=1), rtol=0, atol=1e-5)


def test_image_size_not_a_multiple_of_the_patch(tmp_path):
    """The source's Conv2d drops the pixels past the last whole patch: vitkit takes the covered size."""
    source = randomise(
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER, image_size=36))
    )
    source.save_pretrained(tmp_path / "odd")
    model = vitkit.load(tmp_path / "odd", keep_source_numerics=True).eval()
    assert model.config.img_size == (32, 32)
    images = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        expected = source(pixel_values=images).pooler_output
        torch.testing.assert_close(model(images[..., :32, :32]), expected, rtol=0, atol=1e-5)


def two_tower_config(**extra):
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50
    )
    return transformers.SiglipConfig(text_config=text, vision_config=dict(**TOWER, image_size=32), **extra)


def test_two_tower_folder_gives_the_image_tower(tmp_path, caplog):
    source = randomise(transformers.SiglipModel(two_tower_config()))
    source.save_pretrained(tmp_path / "siglip")
    with caplog.at_level("INFO", logger="vitkit"):
        model = vitkit.load(tmp_path / "siglip", keep_source_numerics=True).eval()
    assert "drop_text_tower" in caplog.text and "strip_vision_model_prefix" in caplog.text
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = source.vision_model(pixel_values=images, interpolate_pos_encoding=True)
        torch.testing.assert_close(model(images), expected.pooler_output, rtol=0, atol=1e-5)


def test_image_classification_averages_the_tokens(tmp_path, caplog):
    source = randomise(transformers.SiglipForImageClassification(two_tower_config(num_labels=3)))
    source.save_pretrained(tmp_path / "classifier")
    with caplog.at_level("INFO", logger="vitkit"):
        model = vitkit.load(tmp_path / "classifier", keep_source_numerics=True).eval()
    assert "drop_unused_map_head" in caplog.text
    assert (model.config.pool, model.config.num_classes) == ("gap", 3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(pixel_values=images).logits, rtol=0, atol=1e-5)


def test_convert_to_timm_and_refusals(tmp_path, capsys):
    source = randomise(tower("siglip"))
    source.save_pretrained(tmp_path / "siglip")
    assert main(["convert", str(tmp_path / "siglip"), str(tmp_path / "t.safetensors"), "--to", "timm"]) == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # A timm file does not say its GELU form: timm's SigLIP models set it in code.
        timm_model = vitkit.load(tmp_path / "t.safetensors", num_heads=4, pool="map", gelu="tanh").eval()
        torch.testing.assert_close(timm_model(images), vitkit.load(tmp_path / "siglip").eval()(images))
    capsys.readouterr()
    for target, dst, reason in (
        ("hf", "hf_out", "a model without class token"),
        ("mmpretrain", "m.pth", "pool 'map'"),
        ("npz", "v.npz", "pool 'map' with class_token=False"),
    ):
        assert main(["convert", str(tmp_path / "siglip"), str(tmp_path / dst), "--to", target]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and "cannot hold this model" in errors[0] and reason in errors[0], errors
        assert not (tmp_path / dst).exists()


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_write_siglip_vision_model(tmp_path, capsys, pool):
    """vitkit -> SiglipVisionModel folder (the MAP head packed back into in_proj) -> transformers, and
    back to vitkit bitwise."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(class_token=False, pool=pool, num_classes=0, gelu="tanh")).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    source = vitkit.save(model, tmp_path / "model.safetensors")
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "siglip"]) == 0
    written = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out").eval()
    assert written.config.vision_use_head == (pool == "map")
    images = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        expected = written(pixel_values=images, interpolate_pos_encoding=True)
        torch.testing.assert_close(
            model.forward_features(images), expected.last_hidden_state, rtol=0, atol=1e-5
        )
        if pool == "map":
            torch.testing.assert_close(model(images), expected.pooler_output, rtol=0, atol=1e-5)
    back = vitkit.load(tmp_path / "out", keep_source_numerics=True)
    assert back.config == model.config.replace(zero_head=back.config.zero_head)
    assert all(torch.equal(back.state_dict()[key], value) for key, value in model.state_dict().items())

    capsys.readouterr()
    token_model = vitkit.save(VisionTransformer(tiny_config()), tmp_path / "token.safetensors")
    assert main(["convert", str(token_model), str(tmp_path / "no"), "--to", "siglip"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "the siglip layout cannot hold this model: a class token" in errors[0], errors
    assert not (tmp_path / "no").exists()


def test_naflex_patch_embedding_that_is_no_square_patch(tmp_path):
    source = randomise(tower("siglip2_naflex"))
    source.save_pretrained(tmp_path / "naflex")
    state = {key: value for key, value in source.state_dict().items()}
    state["embeddings.patch_embedding.weight"] = torch.zeros(32, 190)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "naflex" / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"embeddings.patch_embedding.weight \(32, 190\): 190 input features"
    ):
        vitkit.load(tmp_path / "naflex")


FULL_SIZE = {
    # google/siglip-so400m-patch14-384 and google/siglip2-so400m-patch16-naflex (their config.json sizes).
    "so400m_patch14_384": (
        transformers.SiglipVisionConfig,
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        dict(patch_size=14, image_size=384),
    ),
    "so400m_patch16_naflex": (
        transformers.Siglip2VisionConfig,
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        dict(patch_size=16, num_patches=256),
    ),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_keys_and_shapes_on_meta(name):
    """Width 1152 is not in the size table: the heads come from config.json, the rest from tensors."""
    config_class, size, grid = FULL_SIZE[name]
    hf_config = config_class(**size, **grid)
    model_class = transformers.SiglipVisionModel if "naflex" not in name else transformers.Siglip2VisionModel
    with torch.device("meta"):
        state = model_class(hf_config).state_dict()
    checkpoint = CheckpointFile.from_state(Path(name), "siglip", state, hf_config.to_dict())
    native, config = to_native(checkpoint, keep_source_numerics=True)
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (1152, 27, 16, 4304)
    assert (config.patch_size, config.pool, config.class_token) == (grid["patch_size"], "map", False)
    # 384 px at patch 14: the convolution covers 27 patches, 378 px.
    assert config.img_size == ((378, 378) if "naflex" not in name else (256, 256))
    assert native["patch_embed.proj.weight"].shape == (1152, 3, grid["patch_size"], grid["patch_size"])
    assert native["attn_pool.kv.weight"].shape == (2304, 1152)
