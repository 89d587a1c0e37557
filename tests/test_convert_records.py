"""`vitkit convert` keeps what a trained checkpoint knows beyond its tensors: class names, the data
config and the preprocessing travel into every layout that can hold them (vitkit metadata, an HF
folder's id2label and preprocessor_config.json, a `.json` beside another toolkit's single file),
and come back, so the same weights predict the same after a round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.convert import convert
from vitkit.data import DataConfig, eval_transform
from vitkit.eval.classification import load_classifier
from vitkit.train.state import model_metadata, write_weights

CLASSES = ["cat", "dog", "eel"]
DATA = DataConfig(
    dataset="synthetic",
    img_size=32,
    eval_resize="crop",
    crop_pct=0.8,  # HF records sizes in pixels: 32 / 0.8 = 40 comes back as the same fraction
    interpolation="bilinear",
    mean=(0.3, 0.4, 0.5),
    std=(0.2, 0.25, 0.3),
).to_dict()
# target -> output name; whether the target holds the data config.
TARGETS = {
    "vitkit": ("out.safetensors", True),
    "timm": ("out.pth", True),
    "npz": ("out.npz", True),
    "mmpretrain": ("out.pth", True),
    "hf": ("out_hf", False),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = vitkit.VisionTransformer(tiny_config(num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    write_weights(path, model.state_dict(), model_metadata(model.config, CLASSES, DATA))
    return path


def predictions(model: vitkit.VisionTransformer) -> torch.Tensor:
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(eval_transform(model)(image)[None])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "vitkit", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_round_trip_keeps_classes_data_config_and_preprocessing(trained, tmp_path, target):
    name, holds_data = TARGETS[target]
    out = tmp_path / target / name
    out.parent.mkdir()
    reply = run_cli("convert", str(trained), str(out), "--to", target, "--num-heads", "4")
    assert reply.returncode == 0, reply.stderr
    warnings = [line for line in reply.stderr.splitlines() if "cannot hold" in line]
    if holds_data:
        assert not warnings
    else:  # one line says what the layout lost
        assert len(warnings) == 1 and "the data config" in warnings[0], reply.stderr
    back = tmp_path / target / "back.safetensors"
    convert(out, back, to="vitkit", num_heads=4)

    original, _, data = load_classifier(trained)
    converted = vitkit.read_checkpoint(out)
    assert converted.classes == tuple(CLASSES)
    assert converted.data == (data if holds_data else None)
    model = vitkit.load(converted, num_heads=4)
    assert model.preprocessing == original.preprocessing
    torch.testing.assert_close(predictions(model), predictions(original), rtol=0, atol=0)
    model, classes, round_data = load_classifier(back)
    assert classes == CLASSES
    assert round_data == (data if holds_data else {})
    assert model.preprocessing == original.preprocessing
    torch.testing.assert_close(predictions(model), predictions(original), rtol=0, atol=0)


def test_hf_folder_names_the_classes(trained, tmp_path):
    convert(trained, tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "eel"}
    assert config["label2id"] == {"cat": 0, "dog": 1, "eel": 2}
