"""The `lora` freezing rule: adapters start as a no-op, train only themselves, head and positions, work
whichever attention class runs, merge into a plain ViT, resume bitwise, and run from `vitkit finetune`."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import vitkit
from helpers import tiny_config, write_finetune_config
from test_train_loop import tiny_experiment
from vitkit.cli import main
from vitkit.delta import read_delta
from vitkit.fast import apply_fast_paths
from vitkit.files import CheckpointError
from vitkit.io import read_weights
from vitkit.models.vit import VisionTransformer
from vitkit.train import train
from vitkit.train.loop import run_config
from vitkit.train.lora import LORA_ALPHA, add_lora, merge_lora, merged_state_dict
from vitkit.train.optim import apply_freeze_rule
from vitkit.train.run_folder import config_changes
from vitkit.train.state import list_checkpoints


def images(config, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, config.in_chans, *config.img_size, generator=torch.Generator().manual_seed(1))


def randomise_adapters(model: torch.nn.Module) -> None:
    """Nonzero B (zero at the start), as after some training."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def test_adapters_start_as_the_plain_model_exactly():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    x = images(model.config)
    before = model(x)
    apply_freeze_rule(model, "lora", lora_rank=4)
    assert torch.equal(model(x), before)


def test_only_adapters_head_and_positions_train_and_their_count_is_analytic():
    model = VisionTransformer(tiny_config())
    rank = 4
    num_trainable = apply_freeze_rule(model, "lora", lora_rank=rank)
    config = model.config
    width = config.embed_dim
    adapters = config.depth * rank * (width + 3 * width) + config.depth * rank * (width + width)
    head = width * config.num_classes + config.num_classes
    assert num_trainable == adapters + head + model.pos_embed.numel()
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained == {
        name
        for name, _ in model.named_parameters()
        if "lora_" in name or name.startswith("head.") or name == "pos_embed"
    }
    assert len([name for name in trained if "lora_" in name]) == 4 * config.depth


@pytest.mark.parametrize("fast", ["before", "after", "never"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_merging_gives_the_adapted_function_whichever_attention_class_runs(fast, parallel):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=parallel))
    if fast == "before":
        apply_fast_paths(model, "cpu", "fp32")
    add_lora(model, rank=4)
    if fast == "after":
        apply_fast_paths(model, "cpu", "fp32")
    randomise_adapters(model)
    x = images(model.config)
    # Training mode takes the fast classes' gradient paths: every adapter gets a gradient.
    model.train()
    model(x).square().mean().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n
    )
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        plain = VisionTransformer(model.config).eval()
        plain.load_state_dict(merged_state_dict(model.state_dict()), strict=True)
        assert torch.allclose(plain(x), adapted, atol=1e-5)
        assert not torch.allclose(plain(x), VisionTransformer(model.config).eval()(x), atol=1e-3)
        merge_lora(model)
        assert model.state_dict().keys() == plain.state_dict().keys()
        assert torch.allclose(model(x), adapted, atol=1e-5)


def test_scale_is_alpha_over_rank():
    model = VisionTransformer(tiny_config())
    add_lora(model, rank=2)
    scales = [b for name, b in model.named_buffers() if name.endswith(".scale")]
    assert len(scales) == 2 * model.config.depth and all(s.item() == LORA_ALPHA / 2 for s in scales)


@pytest.mark.parametrize("rank", [0, -3, 33, 2.5])
def test_a_bad_rank_is_one_line_naming_it(rank):
    model = VisionTransformer(tiny_config())  # width 32
    with pytest.raises(ValueError, match=f"LoRA rank {rank!r} .*width 32") as error:
        apply_freeze_rule(model, "lora", lora_rank=rank)
    assert "\n" not in str(error.value)


def test_a_bad_rank_in_the_config_is_named():
    experiment = tiny_experiment("unused")
    with pytest.raises(ValueError, match="model.lora_rank must be a whole number >= 1, not 0"):
        dataclasses.replace(experiment, model=dataclasses.replace(experiment.model, lora_rank=0))


def lora_experiment(out_dir, **train_options):
    experiment = tiny_experiment(out_dir, epochs=3, checkpoint_every=1, ema_decay=0.9, **train_options)
    model = dataclasses.replace(experiment.model, freeze="lora", lora_rank=4)
    return dataclasses.replace(experiment, model=model)


def test_a_run_folder_from_before_lora_rank_resumes():
    current = run_config(tiny_experiment("run"))
    saved = json.loads(json.dumps(current))
    del saved["model"]["lora_rank"]
    assert config_changes(saved, current) == {}
    changed = run_config(lora_experiment("run"))
    assert config_changes(saved, changed)["model.lora_rank"] == [8, 4]


def test_a_lora_run_resumes_bitwise_and_leaves_plain_weights(tmp_path):
    train(lora_experiment(tmp_path / "straight"))
    assert train(lora_experiment(tmp_path / "resumed", max_steps=3))["steps"] == 3  # mid-epoch
    summary = train(lora_experiment(tmp_path / "resumed"))
    assert summary["steps"] == 6
    for name in ("last.safetensors", "best.safetensors"):
        straight = read_weights(tmp_path / "straight" / name)[0]
        resumed = read_weights(tmp_path / "resumed" / name)[0]
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    # The weights files are plain ViTs: the keys and shapes of the model without adapters.
    task = vitkit.load(tmp_path / "straight" / "last.safetensors")
    plain = VisionTransformer(task.config)
    last = read_weights(tmp_path / "straight" / "last.safetensors")[0]
    assert {k: v.shape for k, v in last.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # ... computing what the adapted model of the run's final state computes.
    state_file = list_checkpoints(tmp_path / "straight" / "checkpoints")[0] / "model.safetensors"
    with pytest.raises(
        CheckpointError, match="LoRA adapters unmerged .*best.safetensors or last.safetensors"
    ):
        vitkit.load(state_file)
    state = read_weights(state_file)[0]
    adapted = VisionTransformer(task.config)
    add_lora(adapted, rank=4)
    adapted.load_state_dict(state, strict=True)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_B"))
    x = images(task.config, batch=4)
    with torch.no_grad():
        assert torch.allclose(task.eval()(x), adapted.eval()(x), atol=1e-5)


def test_finetune_command_with_lora_writes_plain_weights_and_a_delta(tmp_path):
    torch.manual_seed(0)
    base = VisionTransformer(tiny_config(img_size=16, patch_size=4, num_classes=0))
    vitkit.save(base, tmp_path / "base.safetensors")
    config = write_finetune_config(tmp_path / "ft.py", tmp_path / "ft", max_steps=6)
    command = [sys.executable, "-m", "vitkit", "finetune", str(tmp_path / "base.safetensors")]
    command += [
        "--config",
        str(config),
        "--freeze",
        "lora",
        "--lora-rank",
        "4",
        "--set",
        "train.num_threads=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trains: lora: rank-4 adapters of every attention qkv and proj (scale 2)" in done.stderr
    summary = json.loads(done.stdout)
    task = vitkit.load(summary["last"])
    assert task.config.img_size == (24, 24) and task.config.num_classes == 10
    # The delta holds what changed: the attention weights (merged), the head and the positions.
    delta_keys = set(read_delta(summary["delta"]).tensors)
    assert {k for k in delta_keys if k.startswith("blocks.")} == {
        f"blocks.{i}.attn.{layer}.weight" for i in range(2) for layer in ("qkv", "proj")
    }
    assert delta_keys - {k for k in delta_keys if k.startswith("blocks.")} <= {
        "pos_embed",
        "head.weight",
        "head.bias",
    }
    rebuilt = vitkit.load(tmp_path / "base.safetensors", delta=summary["delta"])
    for key, value in task.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert torch.equal(task.blocks[0].attn.qkv.bias, base.blocks[0].attn.qkv.bias)
    assert torch.equal(task.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize(("rank", "named"), [("0", "not 0"), ("64", "LoRA rank 64")])
def test_finetune_command_names_a_bad_rank_in_one_line(tmp_path, capsys, rank, named):
    base = VisionTransformer(tiny_config(img_size=16, patch_size=4, num_classes=0))
    vitkit.save(base, tmp_path / "base.safetensors")
    config = write_finetune_config(tmp_path / "ft.py", tmp_path / "ft", max_steps=1)
    code = main(["finetune", str(tmp_path / "base.safetensors"), "--config", str(config), "--freeze", "lora",
                 "--lora-rank", rank])  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and named in error and error.startswith("vitkit finetune: error:")
