"""`vitkit finetune`'s default recipe: which recipe for which data, the lr it applies stated first,
`--set` overrides taken as given, layer-decay groups by depth, and the LP-FT head fitted on a
frozen trunk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.models.vit import VisionTransformer
from vitkit.train.finetune_recipe import (
    RECIPE_TABLE,
    apply_fields,
    choose_finetune_recipe,
    fit_probe_head,
    given_keys,
    recalibrate_batch_norm,
)
from vitkit.train.optim import OptimConfig, build_optimizer, layer_id, set_lr

ROOT = Path(__file__).resolve().parents[1]


def vitkit_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VITKIT_SET": ""}
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "base.safetensors"
    vitkit.save(VisionTransformer(tiny_config(img_size=16, patch_size=4, num_classes=0)), path)
    return path


# Which recipe for which data ------------------------------------------------------------------------------
def test_a_small_set_gets_a_small_batch_and_enough_steps():
    recipe = choose_finetune_recipe(num_train_images=245, num_classes=2, depth=12, img_size=224)
    fields = recipe.fields
    assert (fields["optim.name"], fields["optim.lr_base_batch"]) == ("adamw", 0)  # the lr as applied
    assert 1e-4 <= fields["optim.lr"] <= 5e-4 and fields["data.batch_size"] == 32
    assert fields["optim.layer_decay"] == 0.75  # a deep trunk
    assert fields["data.img_size"] == 224 and fields["data.label_smoothing"] == 0.0  # LP-FT: hard labels
    assert fields["data.scale"] == (0.8, 1.0)
    small = RECIPE_TABLE[0]
    steps = fields["train.epochs"] * recipe.steps_per_epoch
    assert steps >= small.min_steps or fields["train.epochs"] == small.max_epochs
    assert 0 < fields["optim.warmup_epochs"] < fields["train.epochs"] / 4
    assert recipe.head_init == "probe" and "245 training images" in recipe.reasons[0]


def test_the_recipe_row_grows_with_the_data():
    rows = [choose_finetune_recipe(n, 10, depth=6, img_size=32) for n in (300, 1_438, 5_000, 50_000)]
    batches = [recipe.fields["data.batch_size"] for recipe in rows]
    epochs = [recipe.fields["train.epochs"] for recipe in rows]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert epochs[-1] < epochs[0]  # a large set needs fewer passes over it
    assert all(recipe.fields["optim.layer_decay"] == 0.85 for recipe in rows)  # a shallow trunk
    # Every set gets its row's minimum of optimiser steps unless the epoch cap stops it first.
    for n, recipe in zip((300, 1_438, 5_000, 50_000), rows, strict=True):
        row = next(row for row in RECIPE_TABLE if n <= row.max_images)
        steps = recipe.fields["train.epochs"] * recipe.steps_per_epoch
        assert steps >= row.min_steps or recipe.fields["train.epochs"] == row.max_epochs


def test_a_tiny_set_still_gets_several_steps_an_epoch():
    recipe = choose_finetune_recipe(num_train_images=20, num_classes=2, depth=2, img_size=16)
    assert recipe.fields["data.batch_size"] == 5 and recipe.steps_per_epoch == 4


def test_set_keys_keep_their_values_over_the_recipe():
    from vitkit.train import Experiment

    fields = choose_finetune_recipe(300, 3, depth=2, img_size=16).fields
    skip = given_keys(["optim.lr=0.01", "--train.epochs=2"])
    experiment = apply_fields(Experiment(), fields, skip=skip)
    assert (
        experiment.optim.lr == Experiment().optim.lr and experiment.train.epochs == Experiment().train.epochs
    )
    assert experiment.optim.layer_decay == fields["optim.layer_decay"]


# The CLI: the resolved recipe first, --set as given ---------------------------------------------------------
def test_finetune_states_its_recipe_in_its_first_lines_and_records_it(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    result = vitkit_cli(
        "finetune", str(tiny_checkpoint), "--set", "data.dataset=digits", "--set", "data.num_workers=0",
        "--set", "train.max_steps=2", "--set", "eval.max_samples=20", "--set", f"train.out_dir={out}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    recipe_at = next(i for i, line in enumerate(lines) if line.startswith("fine-tuning recipe:"))
    head = lines[recipe_at : recipe_at + 14]
    assert recipe_at <= 2, lines[:5]  # after the preprocessing line only
    expected = choose_finetune_recipe(1438, 10, depth=2, img_size=16).fields  # the digits' train split
    lr, batch = expected["optim.lr"], expected["data.batch_size"]
    lr_line = next(line for line in head if line.strip().startswith("lr:"))
    assert f"{lr:.3g} as applied at batch {batch}" in lr_line and "not scaled" in lr_line
    assert any("1438 training images of 10 classes" in line for line in head)
    assert any("layer decay: 0.85" in line for line in head)
    assert any("trains: every parameter" in line for line in head)
    assert any(line.strip().startswith("steps:") for line in head)
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["lr"] == lr and config["optim"]["name"] == "adamw"
    recorded = json.loads((out / "finetune_recipe.json").read_text())
    assert recorded["head"] == "probe" and lr_line in recorded["recipe"]
    # LP-FT: the start the run began from holds the fitted head on the checkpoint's untouched trunk.
    start = vitkit.load(next(out.glob("init-*.safetensors")))
    base = vitkit.load(tiny_checkpoint)
    assert start.head.weight.abs().sum() > 0
    for key, value in base.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(start.state_dict()[key], value), key


def test_set_lr_is_the_lr_as_applied_in_every_recipe(tiny_checkpoint, tmp_path):
    def printed(*extra: str) -> dict:
        result = vitkit_cli(
            "finetune", str(tiny_checkpoint), "--set", "data.dataset=digits", "--print-config", *extra, cwd=tmp_path
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    auto = printed("--set", "optim.lr=0.001", "--set", "data.batch_size=16")
    assert auto["optim"]["lr"] == 0.001 and auto["data"]["batch_size"] == 16
    assert auto["optim"]["layer_decay"] == 0.85  # the rest is still the recipe's
    # The paper's config states its lr at batch 512; an lr given on the command line is not scaled.
    paper = printed("--config", "finetune_cifar10", "--set", "optim.lr=0.01", "--set", "data.batch_size=16")
    assert paper["optim"]["lr"] == 0.01 and paper["optim"]["name"] == "sgd"
    scaled = printed("--config", "finetune_cifar10", "--set", "data.batch_size=16")
    assert (
        scaled["optim"]["lr"] == pytest.approx(0.03 * 16 / 512) and "batch 512" in scaled["optim"]["lr_note"]
    )


# Layer decay and the LP-FT head --------------------------------------------------------------------------------
def test_layer_decay_gives_each_depth_its_lr():
    model = VisionTransformer(tiny_config(depth=3))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1.0, layer_decay=0.5))
    set_lr(optimizer, 0.1)
    lr_of = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    assert lr_of["head.weight"] == pytest.approx(0.1)  # depth + 1: the full lr
    assert lr_of["norm.weight"] == pytest.approx(0.1)
    assert lr_of["blocks.2.attn.qkv.weight"] == pytest.approx(0.1 * 0.5)
    assert lr_of["blocks.1.mlp.fc1.weight"] == pytest.approx(0.1 * 0.25)
    assert lr_of["blocks.0.norm1.weight"] == pytest.approx(0.1 * 0.125)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(0.1 * 0.0625)
    assert lr_of["pos_embed"] == pytest.approx(0.1 * 0.0625)
    assert {layer_id(name, 3) for name in lr_of} == {0, 1, 2, 3, 4}
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_the_probe_head_fits_the_frozen_features_and_leaves_the_trunk(num_classes):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(num_classes=num_classes, zero_head=True))
    trunk = {key: value.clone() for key, value in model.state_dict().items() if not key.startswith("head.")}
    images = torch.randn(64, 3, 32, 32)
    labels = torch.arange(64) % num_classes
    images += labels.view(-1, 1, 1, 1) * 0.5  # each class a brightness: separable features
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    _, accuracy = fit_probe_head(model, features, labels, c=10.0)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    # The folded standardisation: the head alone reproduces the probe's predictions.
    assert float((predicted == labels).float().mean()) == pytest.approx(accuracy)
    assert accuracy > 0.9
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, trunk[key]), key


def test_batch_norm_statistics_become_the_new_datas_and_nothing_else_moves():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(stem="conv", zero_head=True)).eval()
    parameters = {name: value.clone() for name, value in model.named_parameters()}
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    batches = [(torch.randn(8, 3, 32, 32) * 2 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    assert recalibrate_batch_norm(model, batches) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    )
    inputs = torch.cat(seen)  # (N, C, H, W): the first norm's inputs over every batch
    # Equal batches: the cumulative average of the batch means is the mean over all of them.
    assert torch.allclose(norm.running_mean, inputs.mean((0, 2, 3)), atol=1e-5)
    assert norm.momentum == 0.1 and not model.training  # as they were
    for name, value in model.named_parameters():
        assert torch.equal(value, parameters[name]), name
    assert recalibrate_batch_norm(VisionTransformer(tiny_config()), batches) == 0  # no BatchNorm: untouched
