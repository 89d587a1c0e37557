"""Task deltas: bitwise round trip, wrong bases refused, one shared trunk for several tasks."""

import pytest
import torch

import vitkit
from helpers import tiny_config
from vitkit.delta import (
    MultiTaskModel,
    changed_tensors,
    format_freezing_report,
    freezing_report,
    read_delta,
    save_delta,
)
from vitkit.io import CheckpointError
from vitkit.models.vit import Attention, VisionTransformer
from vitkit.train.optim import apply_freeze_rule


def attention_only_finetune(base: VisionTransformer, seed: int, **overrides) -> VisionTransformer:
    """A task model as fine-tuning makes it: the base at a new config, attention-only, a few SGD steps."""
    torch.manual_seed(seed)
    model = VisionTransformer(base.config.replace(**overrides))
    vitkit.io.load_state(model, base.state_dict(), source_config=base.config)
    apply_freeze_rule(model, "attention-only")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    size = model.config.img_size
    for _ in range(2):
        images = torch.randn(4, 3, *size)
        loss = torch.nn.functional.cross_entropy(
            model(images), torch.randint(0, model.config.num_classes, (4,))
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    vitkit.save(model, tmp_path / "base.safetensors")
    return model


def test_delta_round_trip_is_bitwise_and_holds_only_changed_tensors(base, tmp_path):
    task = attention_only_finetune(base, seed=1, num_classes=3, img_size=48)
    path = save_delta(task, tmp_path / "base.safetensors", tmp_path / "task.safetensors")
    delta = read_delta(path)
    attention = {
        f"blocks.{i}.attn.{name}.{kind}"
        for i in range(2)
        for name in ("qkv", "proj")
        for kind in ("weight", "bias")
    }
    assert set(delta.tensors) == attention | {"head.weight", "head.bias", "pos_embed"}
    rebuilt = vitkit.load(tmp_path / "base.safetensors", delta=path)
    assert rebuilt.config == task.config
    task_state = task.state_dict()
    assert rebuilt.state_dict().keys() == task_state.keys()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, task_state[key]), key
    images = torch.randn(2, 3, 48, 48)
    assert torch.equal(rebuilt.eval()(images), task(images))
    # The delta file is small: it holds attention, head and positions, not the MLPs.
    delta_params = sum(t.numel() for t in delta.tensors.values())
    assert delta_params < 0.5 * task.num_params()


def test_unchanged_model_has_an_empty_delta_and_one_bit_is_enough(base):
    assert changed_tensors(base, base) == {}
    nudged = VisionTransformer(base.config)
    nudged.load_state_dict(base.state_dict())
    with torch.no_grad():
        weight = nudged.blocks[1].mlp.fc2.weight
        weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(1.0))
    assert list(changed_tensors(nudged, base)) == ["blocks.1.mlp.fc2.weight"]


def test_wrong_base_is_refused(base, tmp_path):
    task = attention_only_finetune(base, seed=1)
    path = save_delta(task, base, tmp_path / "task.safetensors")
    torch.manual_seed(5)
    vitkit.save(VisionTransformer(tiny_config()), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="task.safetensors.*wrong base"):
        vitkit.load(tmp_path / "other.safetensors", delta=path)
    with pytest.raises(CheckpointError, match="not a vitkit task delta"):
        vitkit.load(tmp_path / "base.safetensors", delta=tmp_path / "base.safetensors")
    with pytest.raises(TypeError, match="overrides"):
        vitkit.load(tmp_path / "base.safetensors", delta=path, img_size=64)


def test_tasks_at_several_resolutions_share_one_trunk(base, tmp_path):
    tasks = {
        "small": attention_only_finetune(base, seed=1, num_classes=3),
        "large": attention_only_finetune(base, seed=2, num_classes=7, img_size=64),
    }
    server = MultiTaskModel(tmp_path / "base.safetensors")
    for name, task in tasks.items():
        server.add_task(name, save_delta(task, base, tmp_path / f"{name}.safetensors"))
    inputs = {"small": torch.randn(2, 3, 32, 32), "large": torch.randn(2, 3, 64, 64)}
    outputs = server.run(inputs)
    for name, task in tasks.items():
        with torch.no_grad():
            assert torch.equal(outputs[name], task(inputs[name])), name
    # No copies: each MLP weight is the very trunk tensor in every task; attention weights are the task's own.
    trunk_fc1 = server.trunk.blocks[0].mlp.fc1.weight
    for model in server.tasks.values():
        assert model.blocks[0].mlp.fc1.weight is trunk_fc1
        assert model.blocks[0].attn.qkv.weight.data_ptr() != server.trunk.blocks[0].attn.qkv.weight.data_ptr()
    report = server.memory_report()
    attention = sum(p.numel() for m in base.modules() if isinstance(m, Attention) for p in m.parameters())
    assert report["small"] == attention + 32 * 3 + 3 + base.pos_embed.numel()
    assert report["total"] == report["trunk"] + report["small"] + report["large"]
    with pytest.raises(KeyError, match="unknown task 'medium'"):
        server(inputs["small"], task="medium")


def test_attention_only_counts_exactly_on_a_tiny_model():
    # Width 32, depth 2, 16 patches + class token, 5 classes; hand count of what "attention-only" trains:
    #   per block qkv 32 * 96 + 96, proj 32 * 32 + 32 -> 4,224; x 2 blocks = 8,448
    #   head 32 * 5 + 5 = 165; position embeddings 17 * 32 = 544          total 9,157
    config = tiny_config()
    model = VisionTransformer(config)
    assert apply_freeze_rule(model, "attention-only") == 9157
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"blocks.{i}.attn.{n}.{k}" for i in range(2) for n in ("qkv", "proj") for k in ("weight", "bias")),
        "head.weight",
        "head.bias",
        "pos_embed",
    }
    (full, attention_only) = freezing_report(config, batch_size=4, num_steps=1)
    assert (full.num_trainable, attention_only.num_trainable) == (model.num_params(), 9157)
    # Frozen MLPs need no gradients or momentum and save fewer activations.
    assert attention_only.memory_bytes < full.memory_bytes
    assert "| attention-only | 9,157 |" in format_freezing_report([full, attention_only])


def test_vit_b16_at_384_attention_only_count():
    # "Three things", #2 for ViT-B/16 at 384: 29,560,552 of 86,859,496 parameters train. Meta device.
    config = vitkit.get_config("vit_base_patch16_384")
    full, attention_only = freezing_report(config, measure=False)
    assert (full.num_trainable, full.num_params) == (86_859_496, 86_859_496)
    assert (attention_only.num_trainable, attention_only.num_params) == (29_560_552, 86_859_496)
