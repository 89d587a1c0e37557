"""The training loop on tiny data: memorising, resuming, the non-finite guard, checkpoints and configs."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.data import DataConfig
from vitkit.data.datasets import BadImageError
from vitkit.io import read_weights
from vitkit.train import (
    OBJECTIVES,
    EvalConfig,
    Experiment,
    ModelConfig,
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    load_experiment,
    train,
)
from vitkit.train.objectives import supervised
from vitkit.train.state import find_resumable, list_checkpoints

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, zero_head=False)


def tiny_experiment(out_dir, *, data=None, optim=None, model=None, **train) -> Experiment:
    """16 synthetic 32-px images, a width-32 depth-2 ViT, one thread."""
    data = {"dataset": "synthetic", "synthetic_size": 16, "synthetic_classes": 4, "img_size": 32,
            "batch_size": 8, "num_workers": 0, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip": 0.0,
            **(data or {})}  # fmt: skip
    train = {"out_dir": str(out_dir), "epochs": 2, "num_threads": 1, "log_every": 1, **train}
    return Experiment(
        model=ModelConfig(name="vit_tiny_patch16_224", overrides={**TINY, **(model or {})}),
        data=DataConfig(**data),
        optim=OptimConfig(**{"lr": 3e-3, "warmup_epochs": 1, "weight_decay": 0.0, **(optim or {})}),
        train=TrainConfig(**train),
        eval=EvalConfig(split="test", top_k=(1, 3)),
    )


def weights(path) -> dict[str, torch.Tensor]:
    return read_weights(path)[0]


def test_overfits_16_images(tmp_path):
    # Evaluated with the eval transform at the images' own size (squash): every image once, un-augmented.
    experiment = tiny_experiment(
        tmp_path, epochs=60, data={"batch_size": 16, "eval_resize": "squash"}, optim={"min_lr": 1e-3}
    )
    experiment = load_experiment(experiment, ["eval.split=train"])
    summary = train(experiment)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert summary["top1"] == 1.0 and summary["num_samples"] == 16
    assert losses[-1] < 0.05 * losses[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert np.trace(np.array(results["confusion_matrix"])) == 16
    for name in ("curves.png", "confusion_matrix.png", "metrics.csv", "config.json", "class_to_idx.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert vitkit.load(tmp_path / "best.safetensors").config.num_classes == 4


def test_resume_continues_bitwise_as_if_never_stopped(tmp_path):
    # EMA (with its warmup, which counts the steps), accumulation, mixup, stochastic depth and dropout:
    # every piece of state and randomness.
    options = dict(
        data={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "scale": (0.5, 1.0), "synthetic_size": 32},
        model={"drop_path": 0.2, "dropout": 0.1},
        optim={"clip_grad": 1.0},
        ema_decay=0.9,
        ema_warmup=True,
        accumulation=2,
        epochs=3,
        checkpoint_every=1,
    )
    train(tiny_experiment(tmp_path / "straight", **options))
    interrupted = tiny_experiment(tmp_path / "resumed", max_steps=3, **options)
    assert train(interrupted)["steps"] == 3  # mid-epoch: 1 of its 2 steps done
    summary = train(tiny_experiment(tmp_path / "resumed", **options))
    assert summary["steps"] == 3 * 32 // 16
    for name in ("last.safetensors", "best.safetensors"):
        straight, resumed = weights(tmp_path / "straight" / name), weights(tmp_path / "resumed" / name)
        assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert steps == sorted(set(steps)), "rows logged after the checkpoint must not repeat"


def test_damaged_latest_checkpoint_is_detected_and_the_previous_used(tmp_path, caplog):
    experiment = tiny_experiment(tmp_path, epochs=3, keep_last=3)
    train(experiment)
    newest, older = list_checkpoints(tmp_path / "checkpoints")[:2]
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    folder, skipped = find_resumable(tmp_path / "checkpoints")
    assert folder == older and "checksum mismatch" in skipped[0]
    with caplog.at_level(logging.WARNING):
        summary = train(experiment)
    assert "checksum mismatch" in caplog.text and newest.name in caplog.text
    assert summary["steps"] == 6


def test_unfinished_checkpoint_without_marker_is_skipped(tmp_path):
    train(tiny_experiment(tmp_path, epochs=2, keep_last=3))
    newest = list_checkpoints(tmp_path / "checkpoints")[0]
    (newest / "COMPLETE").unlink()
    folder, skipped = find_resumable(tmp_path / "checkpoints")
    assert folder != newest and "no COMPLETE marker" in skipped[0]


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    train(tiny_experiment(tmp_path, epochs=3, checkpoint_every=1, keep_last=2))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000006", "step-00000005"]


def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss, metrics = supervised(model, batch)
        return (loss * float("nan") if len(calls) == 4 else loss), metrics

    monkeypatch.setitem(OBJECTIVES, "poisoned", poisoned)
    experiment = tiny_experiment(tmp_path, epochs=3, checkpoint_every=1, objective="poisoned")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 3 .*step-00000003"):
        train(experiment)
    folder, _ = find_resumable(tmp_path / "checkpoints")
    assert folder.name == "step-00000003"
    assert all(torch.isfinite(t).all() for t in weights(folder / "model.safetensors").values())
    assert not (tmp_path / "last.safetensors").exists()


def test_init_from_a_checkpoint_with_a_new_head_and_attention_only(tmp_path):
    train(tiny_experiment(tmp_path / "source", epochs=1))
    experiment = tiny_experiment(tmp_path / "fine", epochs=1, data={"synthetic_classes": 3})
    experiment = load_experiment(
        experiment,
        [f"model.init_from={tmp_path / 'source' / 'last.safetensors'}", "model.freeze=attention-only"],
    )
    train(experiment)
    source, fine = (
        weights(tmp_path / "source" / "last.safetensors"),
        weights(tmp_path / "fine" / "last.safetensors"),
    )
    assert fine["head.weight"].shape == (3, 32)
    assert torch.equal(source["blocks.0.mlp.fc1.weight"], fine["blocks.0.mlp.fc1.weight"])
    assert not torch.equal(source["blocks.0.attn.qkv.weight"], fine["blocks.0.attn.qkv.weight"])


def _write_image_folder(root, num_per_class=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(num_per_class):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    bad = root / "train" / "cat"
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    (bad / "truncated.png").write_bytes((bad / "0.png").read_bytes()[:100])


def test_hostile_image_files_are_skipped_or_refused_by_name(tmp_path):
    _write_image_folder(tmp_path / "data")
    data = {"dataset": "imagefolder", "root": str(tmp_path / "data"), "verify": "full", "batch_size": 4}
    summary = train(tiny_experiment(tmp_path / "run", epochs=1, data=data))
    assert summary["num_samples"] == 8
    assert json.loads((tmp_path / "run" / "class_to_idx.json").read_text()) == {"cat": 0, "dog": 1}
    with pytest.raises(BadImageError, match="empty.png"):
        train(tiny_experiment(tmp_path / "strict", epochs=1, data={**data, "on_bad": "error"}))


def test_config_errors_name_the_key_and_value(tmp_path):
    base = tiny_experiment(tmp_path)
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr' \(did you mean optim.lr"):
        load_experiment(base, ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_experiment(base, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="train.precision"):
        load_experiment(base, ["train.precision=fp8"])
    with pytest.raises(TypeError, match="'depht' .*did you mean depth"):
        load_experiment(base, ["model.overrides.depht=3"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_experiment(base, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="no config named 'nope'.*digits_vit"):
        load_experiment("nope")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({**base.to_dict(), "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        load_experiment(str(bad_json))


def test_saved_config_reloads_to_the_same_experiment(tmp_path):
    experiment = load_experiment(
        "digits_vit", ["optim.lr=1e-3", "model.overrides.depth=3", f"train.out_dir={tmp_path}"]
    )
    assert experiment.optim.lr == 1e-3 and experiment.model.overrides["depth"] == 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(experiment.to_dict()))
    assert load_experiment(str(path)) == experiment
