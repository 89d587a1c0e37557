"""Register tokens ("Vision Transformers Need Registers"): where they sit, what they skip, the
registered DINOv2-reg names, the timm layout, masked pre-training, and HF's Dinov2WithRegistersModel
as the reference."""

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit import get_config
from vitkit.analysis.flops import count
from vitkit.cli import main
from vitkit.convert import read_checkpoint, write_layout
from vitkit.files import CheckpointError
from vitkit.models.masked import MaskedConfig, MaskedPatchModel
from vitkit.models.vit import VisionTransformer
from vitkit.train.optim import param_groups


def registers_model(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    fields = dict(num_reg_tokens=3, pos_embed_class_slot=False, layer_scale_init=0.5)
    config = tiny_config(**{**fields, **overrides})
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        model.reg_token.normal_()
        model.cls_token.normal_()
    return model


def test_registers_follow_the_class_token_without_position_embeddings():
    model = registers_model(pool="gap")
    assert model.reg_token.shape == (1, 3, 32) and model.pos_embed.shape == (1, 16, 32)
    assert model.config.num_prefix_tokens == 4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches, grid = model.embed_patches(images)
        tokens = model.add_tokens(patches, grid)
        assert tokens.shape == (2, 1 + 3 + 16, 32)
        assert torch.equal(tokens[:, 0], model.cls_token[0].expand(2, -1))
        assert torch.equal(tokens[:, 1:4], model.reg_token.expand(2, -1, -1))
        assert torch.equal(tokens[:, 4:], patches + model.pos_embed)
        features = model.forward_features(images)
        # Average pooling leaves the class token and the registers out.
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True), features[:, 4:].mean(1), atol=0, rtol=0
        )


def test_class_slot_covers_every_prefix_token_as_timm():
    model = registers_model(pos_embed_class_slot=True)
    assert model.pos_embed.shape == (1, 4 + 16, 32)
    bigger = model.forward_features(torch.randn(1, 3, 48, 48))  # resampled: the 4 prefix rows kept
    assert bigger.shape == (1, 4 + 36, 32)


def test_every_parameter_gets_a_gradient():
    model = registers_model().train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_registers_are_tokens_for_the_optimizer():
    groups = param_groups(registers_model(), weight_decay=0.05, layer_decay=0.5)
    (group,) = [group for group in groups if "reg_token" in group["names"]]
    assert group["weight_decay"] == 0.0 and "cls_token" in group["names"]  # undecayed, stem's lr scale


def test_registered_names_match_timm():
    config = get_config("vit_small_patch14_reg4_dinov2")
    assert (config.num_reg_tokens, config.grid_size, config.pos_embed_class_slot) == (4, (37, 37), False)
    assert config.layer_scale_init == 1e-5 and config.num_classes == 0
    # 3*14*14*384 + 384 (stem) + 384 (cls) + 4*384 (registers) + 1369*384 (positions)
    # + 12 * 1,775,232 (blocks with LayerScale) + 768 (final norm); timm lists 22.06 M.
    assert count(config).params == 226_176 + 384 + 1_536 + 525_696 + 12 * 1_775_232 + 768 == 22_057_344
    assert get_config("vit_base_patch14_reg4_dinov2").embed_dim == 768


def test_timm_layout_round_trip(tmp_path):
    model = registers_model()
    path = write_layout(model, tmp_path / "reg.safetensors", to="timm")
    assert read_checkpoint(path).layout == "timm"
    loaded = vitkit.load(path, num_heads=4).eval()
    assert loaded.config.num_reg_tokens == 3 and not loaded.config.pos_embed_class_slot
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), model.forward_features(images))


@pytest.mark.parametrize("to", ["hf", "npz", "mmpretrain"])
def test_layouts_without_registers_refuse(tmp_path, to):
    model = registers_model(layer_scale_init=None)
    with pytest.raises(CheckpointError, match="register tokens"):
        write_layout(model, tmp_path / ("out" + {"hf": "", "npz": ".npz", "mmpretrain": ".pth"}[to]), to=to)


def test_masked_pretraining_with_registers():
    model = MaskedPatchModel(VisionTransformer(tiny_config(num_reg_tokens=2, num_classes=0)), MaskedConfig())
    loss, metrics = model(torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.reg_token.grad.abs().sum() > 0
    corruption = model.corrupt(2, (4, 4), torch.Generator().manual_seed(0))
    assert model.forward_encoder(torch.rand(2, 3, 32, 32), corruption).shape == (2, 16, 32)


def test_config_bounds():
    with pytest.raises(ValueError, match="num_reg_tokens"):
        tiny_config(num_reg_tokens=-1)
    with pytest.raises(ValueError, match="num_reg_tokens"):
        tiny_config(num_reg_tokens=10_000)


# transformers as the reference ----------------------------------------------------------------------
def hf_registers(tmp_path, **overrides):
    transformers = pytest.importorskip("transformers", reason="peer equivalence needs transformers")
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
        layerscale_value=0.5,
        **overrides,
    )
    source = transformers.Dinov2WithRegistersModel(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0, 0.2)
    source.eval().save_pretrained(tmp_path / "reg")
    return source, tmp_path / "reg"


@pytest.mark.peers
def test_hf_dinov2_with_registers_features(tmp_path):
    source, folder = hf_registers(tmp_path)
    assert read_checkpoint(folder).layout == "dinov2_reg"
    model = vitkit.load(folder).eval()
    assert (model.config.num_reg_tokens, model.config.pos_embed_class_slot) == (4, False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = source(pixel_values=images)
        torch.testing.assert_close(model.forward_features(images), out.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(images), out.pooler_output, atol=1e-5, rtol=0)
    # At another size HF resamples with antialiased bicubic interpolation: the source's numerics.
    model = vitkit.load(folder, keep_source_numerics=True).eval()
    assert model.config.pos_embed_resample == "bicubic_antialias"
    for size in ((48, 48), (40, 56)):
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = source(pixel_values=images)
            torch.testing.assert_close(
                model.forward_features(images), out.last_hidden_state, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(model(images), out.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.peers
def test_convert_command_hf_registers_to_timm(tmp_path, capsys):
    source, folder = hf_registers(tmp_path)
    assert main(["convert", str(folder), str(tmp_path / "reg.pth"), "--to", "timm"]) == 0
    model = vitkit.load(tmp_path / "reg.pth", num_heads=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(images), source(pixel_values=images).last_hidden_state, atol=1e-5, rtol=0
        )
    assert main(["convert", str(folder), str(tmp_path / "reg-hf"), "--to", "hf"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "vitkit convert: error: the hf layout cannot hold this model: LayerScale; register tokens"
