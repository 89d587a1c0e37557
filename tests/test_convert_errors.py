"""Bad input gives a clear error naming file, key, shape or value, and changes nothing on disk."""

import json
import os

import numpy as np
import pytest
import torch

import vitkit
from helpers import tiny_config
from test_convert_google import HEADS, flax_params
from vitkit.cli import main
from vitkit.convert import convert, write_layout
from vitkit.io import CheckpointError
from vitkit.models.vit import VisionTransformer


def npz(path, params):
    np.savez(path, **params)
    return path


@pytest.fixture
def existing(tmp_path):
    """An output that exists before the failed conversion and must survive it byte for byte."""
    path = tmp_path / "out" / "model.npz"
    path.parent.mkdir()
    path.write_bytes(b"previous content")
    return path


def assert_untouched(existing):
    assert existing.read_bytes() == b"previous content"
    assert os.listdir(existing.parent) == [existing.name]  # no temporary or partial files


def test_missing_keys_name_both_layouts(tmp_path, existing):
    params = flax_params("vit_jax")
    del params["Transformer/encoderblock_1/LayerNorm_2/scale"]
    del params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel"]
    source = npz(tmp_path / "partial.npz", params)
    with pytest.raises(CheckpointError) as error:
        convert(source, existing, to="npz", num_heads=HEADS)
    message = str(error.value)
    assert "partial.npz" in message and "missing" in message
    assert "blocks.1.norm2.weight (vit_jax: Transformer/encoderblock_1/LayerNorm_2/scale)" in message
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel" in message
    # The query and key kernels of the broken attention were not used either.
    assert "encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in message
    assert_untouched(existing)
    model = vitkit.load(source, num_heads=HEADS, strict=False)  # on request, load what there is
    assert model.config.depth == 2


def test_wrong_shapes_name_keys_and_shapes(tmp_path, existing):
    params = flax_params("vit_jax")
    params["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 48), np.float32)
    params["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"] = np.zeros(48, np.float32)
    source = npz(tmp_path / "shapes.npz", params)
    with pytest.raises(
        CheckpointError,
        match=r"blocks\.1\.mlp\.fc1\.weight \(vit_jax: .*Dense_0/kernel\): "
        r"checkpoint \(48, 32\) vs expected \(64, 32\)",
    ):
        convert(source, existing, to="npz", num_heads=HEADS)
    assert_untouched(existing)


def test_head_split_that_cannot_reshape_is_named(tmp_path):
    params = flax_params("vit_jax")
    params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"] = np.zeros(
        (4, 8, 31), np.float32
    )
    with pytest.raises(CheckpointError, match="out/kernel"):
        vitkit.load(npz(tmp_path / "bad.npz", params), num_heads=HEADS)


class _Hostile:
    """Unpickling this would create a marker file: running code from a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path, existing, capsys):
    marker = tmp_path / "pwned"
    model = VisionTransformer(tiny_config())
    evil = tmp_path / "evil.pth"
    torch.save({**model.state_dict(), "payload": _Hostile(str(marker))}, evil)
    assert not marker.exists()
    assert main(["convert", str(evil), str(existing), "--to", "npz"]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not marker.exists()
    assert_untouched(existing)


def test_object_array_in_npz_is_refused(tmp_path, existing):
    params = flax_params("vit_jax")
    params["head/bias"] = np.array([object()] * 5, dtype=object)
    source = tmp_path / "objects.npz"
    np.savez(source, **params)  # numpy pickles object arrays
    with pytest.raises(CheckpointError, match="objects.npz: refused: the .npz holds object arrays"):
        convert(source, existing, to="npz", num_heads=HEADS)
    assert_untouched(existing)


@pytest.mark.parametrize("target", ["npz", "hf"])
def test_truncated_files(tmp_path, existing, target):
    torch.manual_seed(0)
    full = write_layout(
        VisionTransformer(tiny_config()), tmp_path / ("full.npz" if target == "npz" else "hf"), target
    )
    weights = full if target == "npz" else full / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert(full, existing, to="npz", num_heads=HEADS)
    assert_untouched(existing)


def test_unknown_width_needs_num_heads(tmp_path):
    torch.manual_seed(0)
    path = write_layout(VisionTransformer(tiny_config()), tmp_path / "t.safetensors", "timm")
    with pytest.raises(CheckpointError, match="width 32 is not in the size table.*num_heads="):
        vitkit.load(path)


def test_layout_that_cannot_hold_the_model_writes_nothing(tmp_path):
    model = VisionTransformer(tiny_config(stem="hmlp", patch_size=16))
    with pytest.raises(CheckpointError, match="hf layout cannot hold this model: stem 'hmlp'"):
        write_layout(model, tmp_path / "hf", "hf")
    with pytest.raises(CheckpointError, match="LayerScale"):
        write_layout(VisionTransformer(tiny_config(layer_scale_init=0.1)), tmp_path / "ls.npz", "npz")
    assert os.listdir(tmp_path) == []


def test_unknown_layout_and_bad_hf_config(tmp_path):
    torch.manual_seed(0)
    path = write_layout(VisionTransformer(tiny_config()), tmp_path / "hf", "hf")
    with pytest.raises(CheckpointError, match="unknown layout 'keras'"):
        vitkit.load(path, layout="keras")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        vitkit.load(path)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "swin"}))
    with pytest.raises(CheckpointError, match="model_type 'swin' is not supported"):
        vitkit.load(path)
