"""ONNX export: a dynamic batch and image size, the same logits as PyTorch in onnxruntime at several
sizes, the metadata a runtime needs read back, static graphs that say why, the CLI, clear errors."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_config
from vitkit.cli import main
from vitkit.convert.names import CLASSES_KEY
from vitkit.export import check_onnx, export_onnx, read_onnx_metadata
from vitkit.io import save
from vitkit.models.config import ViTConfig
from vitkit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from vitkit.models.vit import VisionTransformer

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="needs the export extra: pip install 'vitkit[export]'"
)
pytest.importorskip("onnx", reason="needs the export extra: pip install 'vitkit[export]'")

CLASSES = ["cat", "dog", "fox", "owl", "yak"]


def _run(path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def _labelled_checkpoint(tmp_path):
    """A tiny model with class names and a preprocessing other than the default, saved."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    model.preprocessing = Preprocessing(
        img_size=(32, 32),
        eval_resize="crop",
        crop_pct=0.9,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    path = save(model, tmp_path / "model.safetensors", metadata={CLASSES_KEY: json.dumps(CLASSES)})
    return model, path


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"parallel": 2, "layer_scale_init": 0.1, "pool": "gap"},
        {"pos_embed": "rope", "pool": "map"},
        {"num_reg_tokens": 2, "pos_embed_class_slot": False, "pos_embed_resample": "bilinear"},
    ],
)
def test_export_takes_any_batch_and_size_with_pytorch_logits(tmp_path, overrides):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(**overrides)).eval()
    export = export_onnx(model, tmp_path / "model.onnx")
    assert export.dynamic_size and export.static_reason is None
    check = export.check
    assert check.batch_size == 3 and [s.size for s in check.sizes] == [(32, 32), (48, 40)]
    assert check.max_abs_error < 1e-4
    # the trace ran at 40x48: each size here differs from it, one shrinks the grid, one is non-square
    for batch, size in ((1, (32, 32)), (5, (48, 40)), (2, (24, 56)), (1, (64, 64))):
        images = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = model(images)
        torch.testing.assert_close(_run(export.path, images), expected, rtol=1e-4, atol=1e-4)


def test_metadata_reads_back_the_checkpoint_labels_and_preprocessing(tmp_path, capsys):
    model, checkpoint = _labelled_checkpoint(tmp_path)
    assert main(["export", str(checkpoint), str(tmp_path / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "5 class names, preprocessing" in out and "48x40" in out
    metadata = read_onnx_metadata(tmp_path / "model.onnx")
    assert metadata["classes"] == CLASSES
    assert Preprocessing(**metadata["preprocessing"]) == model.preprocessing
    assert metadata["version"] == importlib.metadata.version("vitkit")
    assert ViTConfig.from_dict(metadata["config"]) == model.config
    assert metadata["input"] == {
        "name": "images",
        "layout": "NCHW",
        "dtype": "float32",
        "channels": 3,
        "color": "RGB",
        "values": "(pixel / 255 - mean) / std, as `preprocessing` gives",
        "size": [32, 32],
        "dynamic_size": True,
        "multiple_of": 8,
        "static_reason": None,
    }
    assert metadata["output"] == {"name": "logits", "shape": ["batch", 5]}
    assert "width 32, depth 2" in metadata["model"]


def test_a_model_built_in_code_records_no_labels_or_preprocessing(tmp_path):
    export = export_onnx(VisionTransformer(tiny_config()), tmp_path / "model.onnx", check=False)
    metadata = read_onnx_metadata(export.path)
    assert metadata == export.metadata and export.check is None
    assert "classes" not in metadata and "preprocessing" not in metadata
    with pytest.raises(ValueError, match="4 class names for a head of 5"):
        export_onnx(VisionTransformer(tiny_config()), tmp_path / "x.onnx", classes=CLASSES[:4])


def test_a_hybrid_exports_with_a_dynamic_size(tmp_path):
    """The ResNet trunk's SAME padding stays tied to the traced size: the graph matches PyTorch at the
    export size, at the check's non-square second size, and at a third size run here."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(stem="hybrid", hybrid_layers=(1, 1), patch_size=1)).eval()
    export = export_onnx(model, tmp_path / "model.onnx")
    assert export.dynamic_size and export.static_reason is None
    assert len(export.check.sizes) == 2 and export.check.max_abs_error < 1e-4
    images = torch.randn(2, 3, 64, 24)
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(_run(export.path, images), expected, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, why",
    [
        ({"pos_embed_resample": "bicubic_antialias"}, "bicubic_antialias"),
        (None, "asked for"),
    ],
)
def test_a_static_export_records_why(tmp_path, caplog, overrides, why):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(**(overrides or {}))).eval()
    with caplog.at_level("WARNING", logger="vitkit.export"):
        export = export_onnx(model, tmp_path / "model.onnx", dynamic_size=overrides is not None)
    assert not export.dynamic_size and why in export.static_reason
    assert (why in caplog.text) == (overrides is not None)  # a model's own limit is logged
    assert read_onnx_metadata(export.path)["input"]["static_reason"] == export.static_reason
    assert [s.size for s in export.check.sizes] == [(32, 32)] and export.check.max_abs_error < 1e-4
    with pytest.raises(Exception, match="images"):  # onnxruntime names the input whose shape is wrong
        _run(export.path, torch.randn(1, 3, 48, 48))


def test_check_catches_a_graph_that_differs(tmp_path):
    model = VisionTransformer(tiny_config()).eval()
    export_onnx(model, tmp_path / "model.onnx", check=False)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ValueError, match="at 32x32 onnxruntime differs from PyTorch"):
        check_onnx(model, tmp_path / "model.onnx")


def test_cli_export_at_another_resolution(tmp_path, capsys):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    checkpoint = save(model, tmp_path / "model.safetensors")
    assert main(["export", str(checkpoint), str(tmp_path / "m48.onnx"), "--img-size", "48"]) == 0
    assert "dynamic batch and size" in capsys.readouterr().out
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)  # the model resamples its position embeddings to the 6 x 6 grid too
    torch.testing.assert_close(_run(tmp_path / "m48.onnx", images), expected, rtol=1e-4, atol=1e-4)
    assert main(["export", str(checkpoint), str(tmp_path / "model.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_cli_subprocess_export_prints_sizes_and_records_metadata(tmp_path):
    model, checkpoint = _labelled_checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "vitkit", "export", str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "images (batch, 3, height, width) -> logits (batch, 5)" in lines[0], lines
    assert "multiples of 8; exported at 32x32" in lines[0], lines
    assert lines[1].startswith("metadata: 5 class names, preprocessing, input layout NCHW"), lines
    assert "32x32" in lines[2] and "48x40" in lines[2] and "max |error|" in lines[2], lines
    assert read_onnx_metadata(out)["classes"] == CLASSES


def test_cli_static_size(tmp_path, capsys):
    _, checkpoint = _labelled_checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), str(out), "--static-size", "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert "images (batch, 3, 32x32)" in printed and "fixed size: a fixed size was asked" in printed
    assert read_onnx_metadata(out)["input"]["dynamic_size"] is False
    assert main(["export", str(checkpoint), str(out), "--static-size", "--dynamic-size"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
