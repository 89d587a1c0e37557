"""A checkpoint carries its preprocessing: recorded, read from HF processor configs, defaulted per
layout, written back by convert, and used by predict, eval, fewshot and finetune (flags override)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from helpers import tiny_config
from vitkit.convert import convert, write_layout
from vitkit.data import decode_image, eval_transform, preprocessing_of, resolve_preprocessing
from vitkit.eval.fewshot import FewShotConfig, Transformed, _per_class_cap, evaluate_fewshot, format_table
from vitkit.models.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    from_hf_processor,
    to_hf_processor,
)
from vitkit.train import load_experiment

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.peers

MEAN, STD = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]  # far from both 0.5 and ImageNet's statistics


def vitkit_cli(*args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def random_image(path: Path, width: int, height: int, seed: int) -> Path:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    """A ViTForImageClassification folder with a ViTImageProcessor of unusual mean/std, bicubic."""
    folder = tmp_path_factory.mktemp("hf") / "vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
        image_size=32, patch_size=8, num_labels=2,
        id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    # Large logits, so that a wrong mean or std would move the probabilities visibly.
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    model.save_pretrained(folder)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD, resample=3
    )
    processor.save_pretrained(folder)
    return folder


def hf_probabilities(folder: Path, images: list[Path], **processor_changes) -> torch.Tensor:
    model = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(folder, **processor_changes)
    pixels = processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).logits.softmax(-1)


def test_an_hf_folder_brings_its_processor_config(hf_vit: Path) -> None:
    model = vitkit.load(hf_vit)
    assert model.preprocessing == Preprocessing((32, 32), "squash", 0.875, "bicubic", tuple(MEAN), tuple(STD))
    assert "preprocessor_config.json" in model.preprocessing.source


def test_predict_gives_the_probabilities_of_transformers_own_processor(hf_vit: Path, tmp_path: Path) -> None:
    # 50 x 40 is resized (squashed) to 32 x 32: the resize must be the reference's too.
    images = [random_image(tmp_path / f"{i}.png", 50, 40, seed=i) for i in range(2)]
    expected = hf_probabilities(hf_vit, images)
    processor = transformers.ViTImageProcessor.from_pretrained(hf_vit)
    pixels = processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"]
    # The source's numerics (LayerNorm eps 1e-12) for an exact comparison of the whole pipeline.
    model = vitkit.load(hf_vit, keep_source_numerics=True).eval()
    inputs = torch.stack([eval_transform(model)(decode_image(path)) for path in images])
    torch.testing.assert_close(inputs, pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        got = model(inputs).softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The command line (vitkit's numerics: eps 1e-6) to the three printed decimals.
    result = vitkit_cli("predict", str(hf_vit), *map(str, images), "--top-k", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    for line, row in zip(result.stdout.splitlines(), expected, strict=True):
        printed = dict(pair.rsplit(" ", 1) for pair in line.split(": ", 1)[1].split(", "))
        assert list(printed) == [("cat", "dog")[i] for i in row.argsort(descending=True).tolist()]
        assert [float(printed[name]) for name in ("cat", "dog")] == pytest.approx(row.tolist(), abs=2e-3)


def test_flags_override_each_field(hf_vit: Path, tmp_path: Path) -> None:
    image = random_image(tmp_path / "a.png", 32, 32, seed=3)
    expected = hf_probabilities(hf_vit, [image], image_mean=[0.5] * 3, image_std=[0.25] * 3)[0]
    result = vitkit_cli(
        "predict", str(hf_vit), str(image), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = dict(pair.rsplit(" ", 1) for pair in result.stdout.strip().split(": ", 1)[1].split(", "))
    assert [float(printed["cat"]), float(printed["dog"])] == pytest.approx(expected.tolist(), abs=2e-3)
    default = vitkit_cli("predict", str(hf_vit), str(image)).stdout
    assert default != result.stdout  # the flags changed what the model saw
    model = vitkit.load(hf_vit)
    changed = resolve_preprocessing(model, eval_resize="crop", crop_pct=0.5, interpolation="bilinear")
    assert (changed.eval_resize, changed.crop_pct, changed.interpolation, changed.mean) == (
        "crop",
        0.5,
        "bilinear",
        tuple(MEAN),
    )
    with pytest.raises(ValueError, match="crop_pct"):
        resolve_preprocessing(model, crop_pct=3.0)


def test_eval_scores_an_hf_folder_with_its_preprocessing(hf_vit: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    images, labels = [], []
    for label, name in enumerate(("cat", "dog")):
        (root / "test" / name).mkdir(parents=True)
        for index in range(4):
            images.append(
                random_image(root / "test" / name / f"{index}.png", 40, 36, seed=10 * label + index)
            )
            labels.append(label)
    expected = hf_probabilities(hf_vit, images).argmax(-1)
    accuracy = float((expected == torch.tensor(labels)).double().mean())
    out = tmp_path / "eval"
    result = vitkit_cli("eval", str(hf_vit), "--root", str(root), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_samples"] == 8
    assert results["top1"] == pytest.approx(accuracy)


def test_fewshot_features_are_those_of_the_reference_pipeline(tmp_path: Path) -> None:
    """A DINOv2 folder with a BitImageProcessor (shorter side, centre crop, ImageNet statistics):
    the features fewshot extracts equal transformers' pooled output on its processor's pixels."""
    folder = tmp_path / "dinov2"
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=28, patch_size=14,
    )  # fmt: skip
    reference = transformers.Dinov2Model(config).eval()
    reference.save_pretrained(folder)
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3,
    )  # fmt: skip
    processor.save_pretrained(folder)
    model = vitkit.load(folder).eval()
    assert (model.preprocessing.eval_resize, model.preprocessing.resize_to) == ("crop", 32)
    # Even margins around the crop, where HF's floor and timm's rounding of the offset agree.
    images = [random_image(tmp_path / f"{i}.png", 48, 40, seed=i) for i in range(3)]
    pixels = processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"]
    dataset = Transformed([(decode_image(path), 0) for path in images], eval_transform(model))
    ours = torch.stack([dataset[i][0] for i in range(len(images))])
    torch.testing.assert_close(ours, pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(ours), pre_logits=True)
        expected = reference(pixel_values=pixels).pooler_output
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_convert_to_hf_writes_a_processor_config_transformers_reads_back(tmp_path: Path) -> None:
    model = vitkit.models.VisionTransformer(tiny_config(num_classes=3))
    model.preprocessing = Preprocessing((32, 32), "crop", 0.8, "bicubic", tuple(MEAN), tuple(STD))
    vitkit.save(model, tmp_path / "m.safetensors")
    assert vitkit.load(tmp_path / "m.safetensors").preprocessing == model.preprocessing
    convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    read_back = from_hf_processor(processor.to_dict())
    assert read_back == model.preprocessing
    assert vitkit.load(tmp_path / "hf").preprocessing == model.preprocessing
    squash = Preprocessing((32, 48), "squash", 0.875, "bilinear", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    written = transformers.ViTImageProcessor(
        **{k: v for k, v in to_hf_processor(squash).items() if k != "image_processor_type"}
    )
    assert from_hf_processor(written.to_dict()) == squash


def test_layouts_without_a_record_take_their_documented_default(tmp_path: Path) -> None:
    model = vitkit.models.VisionTransformer(tiny_config())
    convert_to = {"timm": ("crop", IMAGENET_MEAN), "npz": ("squash", (0.5, 0.5, 0.5))}
    for target, (resize, mean) in convert_to.items():
        suffix = ".npz" if target == "npz" else ".safetensors"
        path = tmp_path / f"{target}{suffix}"
        write_layout(model, path, to=target)  # a model built in code: no record to carry
        loaded = vitkit.load(path, num_heads=4)  # a width-32 timm file does not say its heads
        assert (loaded.preprocessing.eval_resize, loaded.preprocessing.mean) == (resize, mean), target
        assert "default" in loaded.preprocessing.source
    assert preprocessing_of(model) == Preprocessing((32, 32))  # built in code: vitkit's default


def test_a_bad_processor_config_is_one_line_naming_the_key(hf_vit: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_vit / name).read_bytes())
    processor = json.loads((hf_vit / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "resample": 1}))
    result = vitkit_cli("predict", str(folder), str(random_image(tmp_path / "a.png", 32, 32, 0)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "preprocessor_config.json" in result.stderr and "resample=1" in result.stderr


def test_a_run_records_its_preprocessing_and_reuses_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = vitkit_cli(
        "train", "--config", "digits_vit", f"--set=train.out_dir={out}", "--set=data.mean=[0.1,0.2,0.3]",
        "--set=data.std=[0.9,0.8,0.7]", "--set=data.eval_resize=squash",
        env={"VITKIT_SET": "train.epochs=1 train.max_steps=2 data.batch_size=16 train.log_every=1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = vitkit.load(out / "best.safetensors")
    assert (model.preprocessing.mean, model.preprocessing.std) == ((0.1, 0.2, 0.3), (0.9, 0.8, 0.7))
    assert "vitkit.data" in model.preprocessing.source
    image = torch.randint(0, 256, (3, *model.config.img_size), dtype=torch.uint8)  # no resize
    expected = (image.float() / 255 - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor(
        [0.9, 0.8, 0.7]
    )[:, None, None]
    torch.testing.assert_close(eval_transform(model)(image), expected)


def test_the_probe_uses_every_row_unless_capped_and_says_how_many() -> None:
    labels = torch.tensor([0] * 3 + [1] * 10)
    assert len(_per_class_cap(labels, 0, seed=0)) == 13
    capped = _per_class_cap(labels, 5, seed=0)
    assert torch.bincount(labels[capped]).tolist() == [3, 5]  # the small class caps no other

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 4
    train_labels = torch.tensor([0] * 6 + [1] * 20 + [2] * 30)
    test_labels = torch.tensor([0, 1, 2] * 4)
    features = lambda y: centres[y] + 0.1 * torch.randn(len(y), 8, generator=generator)
    train_set = list(zip(features(train_labels), train_labels.tolist(), strict=True))
    test_set = list(zip(features(test_labels), test_labels.tolist(), strict=True))
    metrics = evaluate_fewshot(lambda x: x, train_set, test_set, FewShotConfig(shots=(2,), num_seeds=1))
    assert metrics["linear_probe_rows"] == 56
    assert (metrics["linear_probe_rows_per_class_min"], metrics["linear_probe_rows_per_class_max"]) == (6, 30)
    assert "| 6-30 |" in format_table(metrics, (2,))


def test_the_finetuning_recipe_scales_its_lr_with_the_batch(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_experiment("finetune_cifar10", ["data.batch_size=16"])
    assert recipe.optim.lr == pytest.approx(0.03 * 16 / 512)
    assert recipe.optim.lr_base_batch == 0 and "batch 512" in recipe.optim.lr_note
    assert load_experiment(recipe).optim.lr == recipe.optim.lr  # a resolved config is not scaled twice
    accumulated = load_experiment("finetune_cifar10", ["data.batch_size=16", "train.accumulation=4"])
    assert accumulated.optim.lr == pytest.approx(0.03 * 64 / 512)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_experiment("finetune_cifar10", ["data.batch_size=16"]).optim.lr == pytest.approx(
        0.03 * 32 / 512
    )
    fixed = load_experiment("finetune_cifar10", ["data.batch_size=16", "optim.lr_base_batch=0"])
    assert fixed.optim.lr == 0.03 and fixed.optim.lr_note == ""


def test_finetune_takes_the_checkpoint_preprocessing_unless_set(hf_vit: Path) -> None:
    def resolved(*extra: str) -> dict:
        result = vitkit_cli("finetune", str(hf_vit), "--config", "finetune_cifar10", "--print-config", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    taken = resolved("--set", "data.batch_size=16")
    assert (taken["data"]["mean"], taken["data"]["std"], taken["data"]["interpolation"]) == (
        MEAN,
        STD,
        "bicubic",
    )
    assert taken["optim"]["lr"] == pytest.approx(0.03 * 16 / 512) and "batch 512" in taken["optim"]["lr_note"]
    assert taken["data"]["img_size"] == 48  # the recipe's resolution, not the checkpoint's
    kept = resolved("--set", "data.mean=[0.5,0.5,0.5]")
    assert kept["data"]["mean"] == [0.5, 0.5, 0.5] and kept["data"]["std"] == STD


def test_a_folder_weights_file_is_read_with_its_folder(hf_vit: Path, tmp_path: Path) -> None:
    """`folder/model.safetensors` is read as the folder: its config.json (a width-48 ViT, not in the
    size table) and its processor config, by vitkit.load and by every command."""
    model = vitkit.load(hf_vit / "model.safetensors")
    assert model.config.num_heads == 3 and model.preprocessing.mean == tuple(MEAN)
    image = str(random_image(tmp_path / "a.png", 32, 32, seed=5))
    by_file = vitkit_cli("predict", str(hf_vit / "model.safetensors"), image)
    by_folder = vitkit_cli("predict", str(hf_vit), image)
    assert by_file.returncode == 0, by_file.stderr[-2000:]
    assert by_file.stdout.split(":", 1)[1] == by_folder.stdout.split(":", 1)[1]


def test_a_task_delta_carries_its_preprocessing_and_classes(tmp_path: Path) -> None:
    from vitkit.delta import MultiTaskModel, read_delta, save_delta
    from vitkit.eval.classification import CLASSES_KEY

    base = vitkit.models.VisionTransformer(tiny_config())
    base.preprocessing = Preprocessing((32, 32), "crop", 0.9, "bicubic", tuple(MEAN), tuple(STD))
    vitkit.save(base, tmp_path / "base.safetensors")
    task = vitkit.models.VisionTransformer(tiny_config(num_classes=3))
    task.load_state_dict(
        {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, strict=False
    )
    # A delta that records nothing takes the base's preprocessing.
    save_delta(task, tmp_path / "base.safetensors", tmp_path / "plain.safetensors")
    assert vitkit.load(tmp_path / "base.safetensors", delta=tmp_path / "plain.safetensors").preprocessing == (
        base.preprocessing
    )
    # One that records its own (a fine-tuning run's) keeps it, in load and in MultiTaskModel.
    task.preprocessing = Preprocessing((32, 32), "squash", 0.875, "bilinear", (0.5,) * 3, (0.25,) * 3)
    save_delta(task, base, tmp_path / "own.safetensors", {CLASSES_KEY: json.dumps(["a", "b", "c"])})
    assert vitkit.load(tmp_path / "base.safetensors", delta=tmp_path / "own.safetensors").preprocessing == (
        task.preprocessing
    )
    multi = MultiTaskModel(tmp_path / "base.safetensors")
    assert multi.add_task("t", read_delta(tmp_path / "own.safetensors")).preprocessing == task.preprocessing
