"""`vitkit pretrain`: a masked-patch run writes an encoder that vitkit.load and fine-tuning read."""

import json
import textwrap

import pytest
import torch

import vitkit
from helpers import write_finetune_config
from vitkit.cli import main
from vitkit.models.masked import MaskedPatchModel
from vitkit.train.pretrain import PretrainExperiment, build_masked_model, load_pretrain_experiment, pretrain


def write_config(tmp_path, masked: str = "MaskedConfig()", model_overrides: str = "") -> str:
    path = tmp_path / "pretrain_tiny.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from vitkit.data import DataConfig
            from vitkit.models.masked import MaskedConfig
            from vitkit.train import ModelConfig, OptimConfig, TrainConfig
            from vitkit.train.pretrain import PretrainExperiment

            def experiment():
                return PretrainExperiment(
                    model=ModelConfig(
                        name="vit_tiny_patch16_224",
                        overrides=dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=64{model_overrides}),
                    ),
                    masked={masked},
                    data=DataConfig(dataset="digits", img_size=16, batch_size=32, num_workers=0),
                    optim=OptimConfig(lr=2e-3, warmup_epochs=0.05),
                    train=TrainConfig(out_dir="{tmp_path / "run"}", epochs=1, max_steps=12, log_every=4),
                )
            """
        )
    )
    return str(path)


def test_pretrain_command_writes_a_loadable_encoder_and_learns(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["pretrain", "--config", config]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12]
    # Chance on 512 colours is log(512) = 6.24 nats; the run moves well below it.
    assert rows[-1]["loss"] < 0.8 * 6.24
    encoder = vitkit.load(summary["encoder"])
    assert encoder.config.num_classes == 0 and encoder.config.patch_size == 4
    # The whole masked model (encoder, mask token, head) is saved too, matching the encoder file.
    tensors, _ = vitkit.io.read_weights(tmp_path / "run" / "masked_model.safetensors")
    assert tensors["mask_token"].shape == (1, 1, 32) and tensors["head.weight"].shape == (512, 32)
    assert torch.equal(tensors["encoder.blocks.0.attn.qkv.weight"], encoder.blocks[0].attn.qkv.weight)


def test_overrides_pick_blockwise_pixels_and_the_hmlp_stem(tmp_path):
    config = write_config(tmp_path)
    experiment = load_pretrain_experiment(
        config,
        [
            "masked.masking=blockwise",
            "masked.target=pixels",
            "masked.mask_ratio=0.4",
            "masked.min_block_patches=2",
            "model.overrides.stem=hmlp",
            "model.overrides.patch_size=16",
            "data.img_size=64",
        ],
    )
    model = build_masked_model(experiment)
    assert isinstance(model, MaskedPatchModel)
    assert model.encoder.config.stem == "hmlp" and model.head.out_features == 16 * 16 * 3
    loss, metrics = model(torch.randn(2, 3, 64, 64), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and 0 < metrics["corrupted_fraction"] <= 0.4


def test_bad_overrides_are_named(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(TypeError, match="mask_ration"):
        load_pretrain_experiment(config, ["masked.mask_ration=0.4"])
    with pytest.raises(TypeError, match="maskd"):
        load_pretrain_experiment(config, ["maskd.target=pixels"])
    with pytest.raises(ValueError, match="tokenizer"):
        load_pretrain_experiment(config, ["masked.target=tokens", "masked.vocab_size=8"])
    assert isinstance(load_pretrain_experiment(config), PretrainExperiment)


def _run(config: str, out_dir, *overrides: str) -> dict:
    return pretrain(load_pretrain_experiment(config, [f"train.out_dir={out_dir}", *overrides]))


def test_pretraining_resumes_bitwise_and_keeps_an_ema_encoder(tmp_path):
    """The shared loop's checkpoints: stopping at step 5 and going on to 12 gives the weights of one
    uninterrupted run (the masks are drawn from (seed, rank, step), the data order is resumable)."""
    config = write_config(tmp_path)
    straight = _run(config, tmp_path / "straight", "train.ema_decay=0.9")
    _run(config, tmp_path / "resumed", "train.ema_decay=0.9", "train.max_steps=5")
    resumed = _run(config, tmp_path / "resumed", "train.ema_decay=0.9")
    assert straight["steps"] == resumed["steps"] == 12
    for name in ("masked_model", "encoder", "encoder_ema"):
        ours = vitkit.io.read_weights(tmp_path / "resumed" / f"{name}.safetensors")[0]
        theirs = vitkit.io.read_weights(tmp_path / "straight" / f"{name}.safetensors")[0]
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)
    ema, raw = vitkit.load(straight["encoder_ema"]), vitkit.load(straight["encoder"])
    assert not torch.equal(ema.blocks[0].mlp.fc1.weight, raw.blocks[0].mlp.fc1.weight)
    # Only the new run's rows after the checkpoint are logged again: steps 4, 8, 12 once each.
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12]


def test_pretraining_refuses_a_supervised_objective_setting(tmp_path):
    with pytest.raises(ValueError, match="train.objective"):
        load_pretrain_experiment(write_config(tmp_path), ["train.objective=other"])
    with pytest.raises(ValueError, match="progressive_min_size: pre-training trains at data.img_size"):
        load_pretrain_experiment(write_config(tmp_path), ["train.progressive_min_size=16"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pretraining_runs_under_torchrun(tmp_path, strategy):
    import os
    import subprocess
    import sys

    config = write_config(tmp_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "vitkit", "pretrain", "--config", config, "--set", f"train.strategy={strategy}",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 12] and rows[-1]["loss"] < rows[0]["loss"]
    encoder = vitkit.load(tmp_path / "run" / "encoder.safetensors")
    whole = vitkit.io.read_weights(tmp_path / "run" / "masked_model.safetensors")[0]
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in whole)
    assert torch.equal(whole["encoder.blocks.1.mlp.fc2.weight"], encoder.blocks[1].mlp.fc2.weight)


def test_pretrain_then_finetune_at_a_higher_resolution_from_the_command_line(tmp_path, capsys):
    """The issue's path: `vitkit pretrain`, then `vitkit finetune` of its encoder (24 px from 16 px)."""
    assert main(["pretrain", "--config", write_config(tmp_path), "--set", "train.max_steps=4"]) == 0
    encoder_path = json.loads(capsys.readouterr().out)["encoder"]
    config = write_finetune_config(tmp_path / "ft.py", tmp_path / "ft", max_steps=3)
    assert main(["finetune", encoder_path, "--config", str(config)]) == 0
    task = vitkit.load(json.loads(capsys.readouterr().out)["last"])
    encoder = vitkit.load(encoder_path)
    assert task.config.img_size == (24, 24) and task.config.num_classes == 10
    assert encoder.pos_embed.shape[1] == 1 + 16 and task.pos_embed.shape[1] == 1 + 36
    # Started from the pre-trained encoder: a block's weights moved from it by 3 SGD steps only.
    moved = (task.blocks[0].mlp.fc1.weight - encoder.blocks[0].mlp.fc1.weight).abs().max()
    assert 0 < moved < 0.1 * encoder.blocks[0].mlp.fc1.weight.abs().max()
