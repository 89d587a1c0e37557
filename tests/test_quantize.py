"""int8 inference (vitkit.quantize): onnxruntime's int8 graph close to fp32 on a tiny model, the
report's figures measured on a real split, a refusal that writes nothing and says both figures in one
line, the export's metadata kept with the evaluation added, and the CLI in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import make_image_folder, tiny_config
from vitkit.cli import main
from vitkit.convert.names import CLASSES_KEY, DATA_KEY
from vitkit.data.datasets import ImageFolder
from vitkit.data.model_transform import eval_transform
from vitkit.export import read_onnx_metadata
from vitkit.io import save
from vitkit.models.preprocessing import Preprocessing
from vitkit.models.vit import VisionTransformer
from vitkit.quantize import (
    OnnxClassifier,
    QuantizationRefused,
    quantize_int8,
    quantize_linear_layers,
    saturating_cpu,
)

pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'vitkit[export]'")
pytest.importorskip("onnx", reason="needs the export extra: pip install 'vitkit[export]'")

CLASSES = [f"class{label}" for label in range(10)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, checkpoint, model): a tiny ViT fitted in a few seconds to a 10-class folder whose
    classes differ by colour, saved with its class names and a recorded preprocessing."""
    root = tmp_path_factory.mktemp("quantize")
    make_image_folder(root / "data", train_per_class=12, test_per_class=6)
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(num_classes=10))
    model.preprocessing = Preprocessing(img_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    transform = eval_transform(model)
    train = ImageFolder(root / "data" / "train")
    images = torch.stack([transform(image) for image, _ in train])
    labels = torch.tensor([label for _, label in train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    checkpoint = save(model, root / "model.safetensors", metadata={CLASSES_KEY: json.dumps(CLASSES)})
    return root / "data", checkpoint, model


def test_int8_logits_close_to_fp32_and_the_same_classes(tmp_path, trained):
    """Tolerance: int8 products of a width-32 model move each logit by at most 5% of the largest
    logit (dynamic uint8 activations x per-channel int8 weights); the predicted class does not move on
    the fitted model's test images."""
    data, _, model = trained
    from vitkit.export import export_onnx

    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    quantize_linear_layers(fp32.path, tmp_path / "int8.onnx")
    int8 = OnnxClassifier(tmp_path / "int8.onnx")
    transform = eval_transform(model)
    images = torch.stack([transform(image) for image, _ in ImageFolder(data / "test")])
    with torch.no_grad():
        expected = model(images)
    got = int8(images)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() == 1.0
    assert (tmp_path / "int8.onnx").stat().st_size < fp32.path.stat().st_size


@pytest.mark.skipif(not saturating_cpu(), reason="this CPU's int8 products do not saturate (VNNI)")
def test_on_a_cpu_without_vnni_the_full_range_is_what_the_default_avoids(tmp_path, trained):
    """Where products saturate, full-range weights stray further from fp32 than the default's 7 bits
    (on a 2-core AVX2 EPYC: 18% of the logits' scale against under 5%)."""
    data, _, model = trained
    from vitkit.export import export_onnx

    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    errors = {}
    for reduce_range in (False, None):
        quantize_linear_layers(fp32.path, tmp_path / "int8.onnx", reduce_range=reduce_range)
        errors[reduce_range] = (OnnxClassifier(tmp_path / "int8.onnx")(images) - expected).abs().max()
    assert errors[None] < errors[False]


@pytest.mark.parametrize(
    "flags,saturates", [("avx2 fma", True), ("avx2 avx512_vnni", False), ("avx2 avx_vnni", False)]
)
def test_the_default_range_follows_the_instruction_set(monkeypatch, flags, saturates):
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the VNNI rule is for x86 CPUs")
    monkeypatch.setenv("VITKIT_CPU_FLAGS", flags)
    assert saturating_cpu() is saturates


def test_report_figures_and_metadata_round_trip(tmp_path, trained):
    data, checkpoint, model = trained
    out = tmp_path / "model.int8.onnx"
    report = quantize_int8(checkpoint, out, root=data, split="test", max_top1_drop=1.0)
    assert report.accepted and report.path == out and out.is_file()
    assert report.num_samples == 60 and report.split == "test" and report.data == str(data)
    assert report.fp32_top1 >= 0.9  # the fitted model, measured: colours are easy
    assert abs(report.top1_drop) <= 1.0 and report.int8_bytes < report.fp32_bytes
    assert "within the bound 1.00" in report.describe()
    metadata = read_onnx_metadata(out)
    assert metadata["classes"] == CLASSES
    assert Preprocessing(**metadata["preprocessing"]) == model.preprocessing
    assert metadata["input"]["dynamic_size"] is True
    record = metadata["quantization"]
    assert record["evaluation"] == {
        "split": "test",
        "data": str(data),
        "num_samples": 60,
        "fp32_top1": report.fp32_top1,
        "int8_top1": report.int8_top1,
        "top1_drop_points": report.top1_drop,
        "max_top1_drop_points": 1.0,
    }
    assert record["per_channel"] is True and record["op_types"] == ["MatMul", "Gemm"]
    assert record["reduce_range"] is saturating_cpu()  # the default: 7-bit exactly where products saturate
    classifier = OnnxClassifier(out)
    assert classifier.classes == CLASSES and classifier.preprocessing == model.preprocessing
    assert classifier(torch.randn(2, 3, 48, 40)).shape == (2, 10)  # dynamic size kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_max_samples_takes_a_class_balanced_subset(tmp_path, trained):
    data, checkpoint, _ = trained
    report = quantize_int8(checkpoint, tmp_path / "m.onnx", root=data, max_samples=20)
    assert report.num_samples == 20


def test_without_root_the_checkpoint_s_own_training_data_is_used(tmp_path, trained):
    """A run's data config (here a cached, batch-augmented one, as configs/cifar10_vit.py trains)
    names the data set and its eval preprocessing; no --root is needed."""
    data, _, model = trained
    trained_on = {"dataset": "imagefolder", "root": str(data), "img_size": 32, "mean": [0.5] * 3}
    trained_on |= {"std": [0.25] * 3, "cache": True, "cache_dir": str(tmp_path / "cache")}
    trained_on |= {"train_crop": "pad", "batch_augment": True}
    metadata = {CLASSES_KEY: json.dumps(CLASSES), DATA_KEY: json.dumps(trained_on)}
    checkpoint = save(model, tmp_path / "run.safetensors", metadata=metadata)
    report = quantize_int8(checkpoint, tmp_path / "m.onnx", max_samples=30)
    assert report.data == str(data) and report.num_samples == 30 and report.fp32_top1 >= 0.9


def test_a_drop_beyond_the_bound_is_refused_and_writes_nothing(tmp_path, trained):
    data, checkpoint, _ = trained
    out = tmp_path / "model.int8.onnx"
    out.write_text("an older file, kept")
    with pytest.raises(QuantizationRefused) as refused:
        quantize_int8(checkpoint, out, root=data, max_top1_drop=-101.0)  # no result can meet it
    message = str(refused.value)
    report = refused.value.report
    assert "\n" not in message and "nothing written" in message
    assert f"fp32 {report.fp32_top1:.2%}" in message and f"int8 {report.int8_top1:.2%}" in message
    assert "over the bound -101.00" in message and report.path is None and not report.accepted
    assert out.read_text() == "an older file, kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.int8.onnx"]


def test_a_real_drop_is_refused(tmp_path, trained, monkeypatch):
    """An int8 graph that gets every image wrong (its logits reversed) is refused by its figure."""
    data, checkpoint, _ = trained
    call = OnnxClassifier.__call__
    monkeypatch.setattr(OnnxClassifier, "__call__", lambda self, images: -call(self, images))
    with pytest.raises(QuantizationRefused, match=r"int8 0\.00%.*over the bound 1\.00"):
        quantize_int8(checkpoint, tmp_path / "m.onnx", root=data)
    assert not (tmp_path / "m.onnx").exists()


def test_mistakes_are_one_line(tmp_path, trained, capsys):
    data, checkpoint, _ = trained
    assert main(["quantize", str(checkpoint), "--root", str(data), "--out", str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pass --root FOLDER" in capsys.readouterr().err
    other = tmp_path / "other"
    make_image_folder(other, train_per_class=1, test_per_class=1)
    (other / "test" / "class9").rename(other / "test" / "extra")
    assert main(["quantize", str(checkpoint), "--root", str(other), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are not those of split 'test'" in err
    assert main(["quantize", str(checkpoint), "--root", str(data), "--max-drop", "-200", "--out",
                 str(tmp_path / "m.onnx")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitkit quantize: error: int8 refused")
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_subprocess(tmp_path, trained):
    data, checkpoint, _ = trained
    out = tmp_path / "model.int8.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "vitkit", "quantize", str(checkpoint), "--root", str(data)]
    command += ["--split", "test", "--max-samples", "30", "--max-drop", "5", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"top-1 on test of {data} (30 images): fp32 "), lines
    assert lines[1].startswith(f"wrote {out}: ") and "per output channel" in lines[1], lines
    assert read_onnx_metadata(out)["quantization"]["evaluation"]["max_top1_drop_points"] == 5.0
