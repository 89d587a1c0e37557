"""`vitkit finetune`: the ViT paper's start (new zero head, 2D-resampled positions), attention-only
fine-tuning with its delta, and the recipe config."""

import importlib.util
import json
from pathlib import Path

import torch

import vitkit
from helpers import tiny_config, write_finetune_config
from vitkit.cli import main
from vitkit.delta import finetune_model
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_start_drops_pre_logits_and_head_and_resamples_positions(tmp_path):
    torch.manual_seed(0)
    pretrained = VisionTransformer(tiny_config(representation_size=16, num_classes=7))
    vitkit.save(pretrained, tmp_path / "pre.safetensors")
    model = finetune_model(tmp_path / "pre.safetensors", num_classes=3, img_size=48)
    assert model.config.representation_size is None and model.config.img_size == (48, 48)
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.weight.shape == (3, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    expected = resample_pos_embed(pretrained.pos_embed, (6, 6), (4, 4), 1, "bicubic")
    assert torch.equal(model.pos_embed, expected)
    # Every other tensor is the checkpoint's.
    for key, value in pretrained.state_dict().items():
        if not key.startswith(("head.", "pre_logits.", "pos_embed")):
            assert torch.equal(model.state_dict()[key], value), key
    # A zero head starts every class at the same logit.
    logits = model(torch.randn(2, 3, 48, 48))
    assert torch.equal(logits, torch.zeros_like(logits))


def test_finetune_from_a_headless_encoder():
    encoder = VisionTransformer(tiny_config(num_classes=0))
    model = finetune_model(encoder, num_classes=4)
    assert model.head.weight.shape == (4, 32) and not model.head.weight.any()


def test_recipe_config_is_the_papers():
    path = ROOT / "configs" / "finetune_cifar10.py"
    spec = importlib.util.spec_from_file_location("finetune_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    optim = module.experiment().optim
    assert (optim.name, optim.momentum, optim.weight_decay, optim.clip_grad) == ("sgd", 0.9, 0.0, 1.0)
    assert optim.schedule == "cosine" and optim.warmup_epochs > 0
    assert module.experiment().data.img_size > 32  # a higher resolution than pre-training


def test_finetune_command_attention_only_writes_a_bitwise_delta(tmp_path, capsys):
    torch.manual_seed(0)
    base = VisionTransformer(tiny_config(img_size=16, patch_size=4, num_classes=0))
    vitkit.save(base, tmp_path / "base.safetensors")
    config = write_finetune_config(tmp_path / "ft.py", tmp_path / "ft", max_steps=6)
    code = main(
        [
            "finetune",
            str(tmp_path / "base.safetensors"),
            "--config",
            str(config),
            "--freeze",
            "attention-only",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    task = vitkit.load(summary["last"])
    assert task.config.img_size == (24, 24) and task.config.num_classes == 10
    rebuilt = vitkit.load(tmp_path / "base.safetensors", delta=summary["delta"])
    for key, value in task.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # Only attention, head and positions moved: the MLPs are the base's, bit for bit.
    delta_keys = set(vitkit.delta.read_delta(summary["delta"]).tensors)
    assert delta_keys and all(k.startswith(("blocks.", "head.", "pos_embed")) for k in delta_keys)
    assert not any(".mlp." in k or ".norm" in k for k in delta_keys)
    assert torch.equal(task.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)
    assert not torch.equal(task.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)
