"""ONNX export: a dynamic batch, the same logits as PyTorch in onnxruntime, the CLI, clear errors."""

import pytest
import torch

from helpers import tiny_config
from vitkit.cli import main
from vitkit.export import check_onnx, export_onnx
from vitkit.io import save
from vitkit.models.vit import VisionTransformer

onnxruntime = pytest.importorskip(
    "onnxruntime", reason="needs the export extra: pip install 'vitkit[export]'"
)
pytest.importorskip("onnx", reason="needs the export extra: pip install 'vitkit[export]'")


def _run(path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


@pytest.mark.parametrize("overrides", [{}, {"parallel": 2, "layer_scale_init": 0.1, "pool": "gap"}])
def test_export_has_a_dynamic_batch_and_pytorch_logits(tmp_path, overrides):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(**overrides)).eval()
    check = export_onnx(model, tmp_path / "model.onnx")
    assert check.max_abs_error < 1e-4 and check.batch_size == 3
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(
                _run(tmp_path / "model.onnx", images), model(images), rtol=1e-4, atol=1e-4
            )


def test_export_is_fixed_to_the_model_image_size(tmp_path):
    model = VisionTransformer(tiny_config()).eval()
    export_onnx(model, tmp_path / "model.onnx", check=False)
    with pytest.raises(Exception, match="images"):  # onnxruntime names the input whose shape is wrong
        _run(tmp_path / "model.onnx", torch.randn(1, 3, 48, 48))


def test_check_catches_a_graph_that_differs(tmp_path):
    model = VisionTransformer(tiny_config()).eval()
    export_onnx(model, tmp_path / "model.onnx", check=False)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_onnx(model, tmp_path / "model.onnx")


def test_cli_export_at_another_resolution(tmp_path, capsys):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    checkpoint = save(model, tmp_path / "model.safetensors")
    assert main(["export", str(checkpoint), str(tmp_path / "m48.onnx"), "--img-size", "48"]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)  # the model resamples its position embeddings to the 6 x 6 grid too
    torch.testing.assert_close(_run(tmp_path / "m48.onnx", images), expected, rtol=1e-4, atol=1e-4)
    assert main(["export", str(checkpoint), str(tmp_path / "model.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
