"""`vitkit plot`: every figure from a saved checkpoint and image files, and clear errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from helpers import tiny_config
from vitkit.cli import main
from vitkit.models.vit import VisionTransformer

pytest.importorskip("matplotlib", reason="figures need the viz extra (matplotlib)")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return vitkit.save(VisionTransformer(tiny_config()), tmp_path / "tiny.safetensors")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize("figure", ["pos-embed", "filters", "attention-distance", "attention"])
def test_plot_command_writes_each_figure(figure, checkpoint, images, tmp_path, capsys):
    inputs = {"attention-distance": [str(images)], "attention": [str(images / "1.png")]}.get(figure, [])
    out = tmp_path / f"{figure}.png"
    assert main(["plot", figure, str(checkpoint), *inputs, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out}" in capsys.readouterr().out


def test_attention_distance_at_another_resolution(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "distance.png"
    args = ["plot", "attention-distance", str(checkpoint), str(images), "--img-size", "48", "--out", str(out)]
    assert main(args) == 0
    assert "over 3 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attention"], "needs one image file"),
        (["pos-embed", "IMAGES"], "takes no images"),
        (["attention", "IMAGES"], "takes one image, got 3"),
    ],
)
def test_plot_command_bad_input_is_a_clear_error(args, message, checkpoint, images, capsys):
    figure, *rest = args
    rest = [str(images) if arg == "IMAGES" else arg for arg in rest]
    assert main(["plot", figure, str(checkpoint), *rest]) == 2
    assert message in capsys.readouterr().err


def test_plot_command_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["plot", "pos-embed", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
