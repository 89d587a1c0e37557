"""The figures: each is written as a PNG from a tiny model, and the numbers behind it are returned."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_config

pytest.importorskip("matplotlib", reason="figures need the viz extra (matplotlib)")

from vitkit.analysis import plots  # noqa: E402
from vitkit.models.vit import VisionTransformer  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VisionTransformer(tiny_config(pos_embed="sincos2d")).eval()


def test_pos_embed_figure(model, tmp_path):
    similarity = plots.plot_pos_embed(model, tmp_path / "pos.png")
    assert_png(tmp_path / "pos.png")
    assert similarity.shape == (4, 4, 4, 4)
    torch.testing.assert_close(similarity[2, 1, 2, 1], torch.tensor(1.0))


def test_filters_figure(model, tmp_path):
    result = plots.plot_filters(model, tmp_path / "filters.png", num_components=10)
    assert_png(tmp_path / "filters.png")
    assert result.components.shape == (10, 3, 8, 8)
    assert (result.explained[:-1] >= result.explained[1:]).all()


def test_attention_distance_figure(model, tmp_path):
    images = plots.normalize(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    distances = plots.plot_attention_distance(model, images, tmp_path / "distance.png")
    assert_png(tmp_path / "distance.png")
    assert distances.shape == (2, 4)


def test_attention_figure_and_fast_path_untouched(model, tmp_path):
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    logits = model(plots.normalize(image[None]))
    rollout, heads = plots.plot_attention(model, image, tmp_path / "attention.png", layer=0)
    assert_png(tmp_path / "attention.png")
    assert rollout.shape == (4, 4) and heads.shape == (4, 4, 4)
    torch.testing.assert_close(rollout.sum(), torch.tensor(1.0))
    torch.testing.assert_close(heads.sum(dim=(1, 2)), torch.ones(4))
    torch.testing.assert_close(model(plots.normalize(image[None])), logits)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        plots.plot_attention(model, image, tmp_path / "none.png", layer=5)


def test_read_images_resizes_crops_and_names_bad_files(tmp_path):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # a white band in the middle: what a centre crop keeps
    Image.fromarray(wide).save(folder / "a.png")
    Image.fromarray(np.full((50, 50, 3), 7, dtype=np.uint8)).save(folder / "b.jpg")
    images = plots.read_images([tmp_path / "images"], (16, 16))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert images[0, :, 2:14, 2:14].min() > 200
    (folder / "c.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="c.png: not a readable image"):
        plots.read_images([tmp_path / "images"], (16, 16))
    with pytest.raises(FileNotFoundError, match="missing"):
        plots.read_images([tmp_path / "missing"], (16, 16))


def test_read_images_limit_spreads_over_the_folders(tmp_path):
    for label, value in (("a", 10), ("b", 120), ("c", 240)):
        (tmp_path / label).mkdir()
        for index in range(4):
            Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(tmp_path / label / f"{index}.png")
    images = plots.read_images([tmp_path], (8, 8), limit=3)
    assert images[:, 0, 0, 0].tolist() == [10, 120, 240]  # one per class folder, not the first three
