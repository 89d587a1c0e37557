"""Parameter groups, schedules and freezing rules of the optimiser."""

import math

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.models.vit import VisionTransformer
from vitkit.train.optim import (
    OptimConfig,
    apply_freeze_rule,
    build_optimizer,
    learning_rate,
    param_groups,
)


def test_attention_only_trains_exactly_the_attention_head_and_positions_of_b16_384():
    # "Three things" #2 on ViT-B/16 at 384 with 1000 classes, counted without allocating memory.
    with torch.device("meta"):
        model = vitkit.create_model("vit_base_patch16_384")
    assert model.num_params() == 86_859_496
    assert apply_freeze_rule(model, "attention-only") == 29_560_552
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "blocks.11.attn.qkv.weight" in trainable and "blocks.0.attn.proj.bias" in trainable
    assert {"head.weight", "head.bias", "pos_embed"} <= trainable
    assert not any(".mlp." in name or "norm" in name for name in trainable)
    assert "cls_token" not in trainable and "patch_embed.proj.weight" not in trainable


def test_attention_only_selects_by_module_type_in_parallel_blocks():
    model = VisionTransformer(tiny_config(parallel=2))
    apply_freeze_rule(model, "attention-only")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attns.1.attn.qkv.weight" in trainable
    assert "blocks.0.ffns.1.mlp.fc1.weight" not in trainable


def test_rules_none_and_head_only_and_unknown():
    model = VisionTransformer(tiny_config())
    assert apply_freeze_rule(model, "head-only") == 32 * 5 + 5
    assert apply_freeze_rule(model, "none") == model.num_params()
    with pytest.raises(ValueError, match="unknown freeze rule 'mlp-only'"):
        apply_freeze_rule(model, "mlp-only")


def test_no_weight_decay_on_norms_biases_positions_class_token_and_layer_scale():
    model = VisionTransformer(tiny_config(layer_scale_init=0.1))
    groups = param_groups(model, weight_decay=0.05)
    no_decay = {name for group in groups if group["weight_decay"] == 0 for name in group["names"]}
    decay = {name for group in groups if group["weight_decay"] > 0 for name in group["names"]}
    assert {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "blocks.0.norm1.weight",
        "blocks.1.ls2.gamma",
    } <= no_decay
    assert all(name.endswith("bias") for name in no_decay if "bias" in name)
    assert decay == {
        name for name, p in model.named_parameters() if p.ndim == 2 or name == "patch_embed.proj.weight"
    }
    assert len(decay | no_decay) == len(list(model.parameters()))


def test_layer_decay_scales_lr_by_depth():
    model = VisionTransformer(tiny_config())
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {name: group["lr_scale"] for group in groups for name in group["names"]}
    # depth 2: stem at 0.5^3, block 0 at 0.5^2, block 1 at 0.5, head at 1.
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == 0.125
    assert scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["blocks.1.mlp.fc2.weight"] == 0.5
    assert scale["head.weight"] == 1.0


def test_frozen_parameters_are_not_given_to_the_optimiser():
    model = VisionTransformer(tiny_config())
    apply_freeze_rule(model, "head-only")
    optimizer = build_optimizer(model, OptimConfig(name="sgd"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(model.head.weight), id(model.head.bias)}


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_min_lr(schedule):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule=schedule)
    lrs = [learning_rate(cfg, step, total_steps=100, warmup_steps=10) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(0.1)
    middle = 0.1 + 0.9 * (0.5 if schedule == "linear" else 0.5 * (1 + math.cos(math.pi / 2)))
    assert lrs[55] == pytest.approx(middle)


def test_a_fractional_warmup_step_never_passes_the_peak_lr():
    """A time budget's schedule step is fractional (spent time x total steps): just below the end of
    the warmup, (step + 1) / warmup_steps is above one."""
    cfg = OptimConfig(lr=4e-3, min_lr=0.0)
    lrs = [learning_rate(cfg, step, total_steps=7800, warmup_steps=78) for step in (76.5, 77.2, 77.9, 78.0)]
    assert max(lrs) == pytest.approx(4e-3) and all(lr <= 4e-3 for lr in lrs)
    assert lrs[0] == pytest.approx(4e-3 * 77.5 / 78)


def test_bad_optim_config_is_named():
    with pytest.raises(ValueError, match="OptimConfig.name='adam'"):
        OptimConfig(name="adam")
    with pytest.raises(ValueError, match="lr must be > 0"):
        OptimConfig(lr=0)
