"""The whitening-initialised first conv (`model.whiten_images`): the filters whiten the patches they
were estimated on, the config refuses what cannot be whitened, and a run starts from them."""

import pytest
import torch
import torch.nn.functional as F

from test_train_loop import tiny_experiment
from vitkit.data import build_loader
from vitkit.io import read_weights
from vitkit.models import VisionTransformer, ViTConfig
from vitkit.train import load_experiment, train
from vitkit.train.whiten import patch_moments, whiten_first_conv, whitening_filters

CNN = dict(stem="cnn", patch_size=4, stem_channels=(8, 16, 24), class_token=False, pool="gap")


def cnn_model(channels=(8, 16, 24), **overrides) -> VisionTransformer:
    torch.manual_seed(0)
    config = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=4)
    return VisionTransformer(ViTConfig(**{**config, **CNN, "stem_channels": channels, **overrides}))


def correlated_images(n: int = 64) -> torch.Tensor:
    """Smooth images whose channels share most of their signal: strongly correlated patches."""
    torch.manual_seed(1)
    base = F.avg_pool2d(torch.randn(n, 1, 34, 34), 3, stride=1)
    return torch.cat([base, 0.9 * base + 0.1 * torch.randn_like(base), base.roll(1, -1)], 1) + 0.5


def test_filters_give_unit_variance_uncorrelated_responses():
    torch.manual_seed(0)
    mix = torch.randn(27, 27) * torch.logspace(0, -2, 27)
    moments = (mix @ mix.T).double()
    filters = whitening_filters(moments, 24).double()
    half = filters[:12]
    response = half @ moments @ half.T  # the second moments of the 12 leading filters' outputs
    eigenvalues = torch.linalg.eigvalsh(moments).flip(0)[:12]
    torch.testing.assert_close(response, torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(filters[12:], -half)


def test_whitened_conv_decorrelates_the_image_patches():
    model, images = cnn_model(), correlated_images()
    before = patch_moments(model.patch_embed.backbone[0], images)
    assert before.diagonal().max() / before.diagonal().min() > 1.0  # raw patches: far from white
    used = whiten_first_conv(model, [images[:40], images[40:]], num_images=50)
    conv = model.patch_embed.backbone[0]
    assert used == 50 and conv.weight.shape == (8, 3, 3, 3)
    with torch.no_grad():
        out = conv(images[:50])[:, :4].permute(1, 0, 2, 3).reshape(4, -1)  # the 4 leading filters
    second_moments = out @ out.T / out.shape[1]
    torch.testing.assert_close(second_moments, torch.eye(4), atol=0.05, rtol=0)


@pytest.mark.parametrize(
    "channels, message",
    [((7, 16, 24), "must be even"), ((56, 16, 24), "at most 2 x 27")],
)
def test_first_convs_that_cannot_hold_the_filters_are_refused(channels, message):
    with pytest.raises(ValueError, match=message):
        whiten_first_conv(cnn_model(channels), [correlated_images(4)], 4)


def test_stems_without_a_first_conv_are_refused():
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="needs stem 'cnn'"):
        whiten_first_conv(model, [correlated_images(4)], 4)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.whiten_images=-1", "must be >= 0"),
        ("model.init_from=x.safetensors", "init_from brings its own"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, setting, message):
    experiment = tiny_experiment(tmp_path, model=CNN)
    with pytest.raises(ValueError, match=message):
        train(load_experiment(experiment, ["model.whiten_images=16", setting]))


def test_a_run_starts_from_the_whitening_of_its_training_images(tmp_path):
    experiment = load_experiment(
        tiny_experiment(tmp_path, model=CNN, max_steps=1, epochs=1, data={"batch_size": 16}),
        ["model.whiten_images=16", "optim.lr=1e-9"],
    )
    train(experiment)
    ((images, _),) = list(build_loader(experiment.data, "train"))
    expected = whitening_filters(patch_moments(torch.nn.Conv2d(3, 8, 3, padding=1), images), 8)
    trained = read_weights(tmp_path / "last.safetensors")[0]["patch_embed.backbone.0.weight"]
    torch.testing.assert_close(trained.reshape(8, -1), expected, atol=1e-4, rtol=1e-4)
