"""Native checkpoints: bitwise round trips, overrides on load, and refusal of bad or hostile files."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.io import CheckpointError, read_weights
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.vit import VisionTransformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VisionTransformer(tiny_config(layer_scale_init=0.1, representation_size=16)).eval()


@pytest.mark.parametrize("target", ["model.safetensors", "folder"])
def test_save_load_round_trip_is_bitwise(model, tmp_path, target):
    path = vitkit.save(model, tmp_path / target)
    if target == "folder":
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        assert json.loads((path / "config.json").read_text())["model_type"] == "vitkit"
    loaded = vitkit.load(path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(images), model(images))
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_load_at_another_resolution_resamples(model, tmp_path):
    path = vitkit.save(model, tmp_path / "m.safetensors")
    bigger = vitkit.load(path, img_size=48)
    assert bigger.config.grid_size == (6, 6)
    expected = resample_pos_embed(model.pos_embed.detach(), (6, 6), (4, 4), 1, "bicubic")
    assert torch.equal(bigger.pos_embed.detach(), expected)
    images = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(bigger.eval()(images), model(images))  # run-time resampling agrees


def test_load_with_new_head(model, tmp_path):
    path = vitkit.save(model, tmp_path / "m.safetensors")
    retargeted = vitkit.load(path, num_classes=3, representation_size=None, zero_head=True)
    assert retargeted.head.weight.shape == (3, 32) and torch.count_nonzero(retargeted.head.weight) == 0
    assert torch.equal(retargeted.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_shape_and_key_errors_name_the_problem(model, tmp_path):
    path = vitkit.save(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight: checkpoint"):
        vitkit.load(path, embed_dim=64, num_heads=4)
    with pytest.raises(CheckpointError, match="missing: \\['blocks.2"):
        vitkit.load(path, depth=3)
    with pytest.raises(TypeError, match="did you mean depth"):
        vitkit.load(path, dept=3)


def test_missing_truncated_and_wrong_files(model, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        vitkit.load(tmp_path / "absent.safetensors")
    path = vitkit.save(model, tmp_path / "m.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors.*truncated or corrupt"):
        vitkit.load(truncated)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_weights(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown weight file type"):
        read_weights(text)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00junk" * 10)
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_weights(junk)
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="not a vitkit checkpoint"):
        vitkit.load(bare)


class _Hostile:
    """Unpickling this runs code: it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"weight": torch.zeros(1), "payload": _Hostile(str(marker))}, handle)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_weights(path)
    assert not marker.exists()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(_Hostile(str(marker))))
    with pytest.raises(CheckpointError):
        read_weights(raw)
    assert not marker.exists()


def test_npz_with_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, good=np.zeros(3), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="object arrays"):
        read_weights(path)
    fine = tmp_path / "fine.npz"
    np.savez(fine, w=np.arange(6, dtype=np.float32).reshape(2, 3))
    weights, _ = read_weights(fine)
    assert torch.equal(weights["w"], torch.arange(6.0).reshape(2, 3))


def test_pth_nested_state_dict_is_read(model, tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    weights, _ = read_weights(path)
    assert set(weights) == set(model.state_dict())


def test_interrupted_save_keeps_previous_file(model, tmp_path, monkeypatch):
    path = vitkit.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vitkit.convert.native.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        vitkit.save(model, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_saved_files_get_the_usual_permissions(model, tmp_path):
    umask = os.umask(0o022)
    try:
        path = vitkit.save(model, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
