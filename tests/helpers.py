"""Shared by the tests: tiny configs (width 32, depth 2, 32 px images run in milliseconds) and a
CIFAR-10-shaped image folder."""

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from vitkit.models.config import ViTConfig


def tiny_config(**overrides) -> ViTConfig:
    base = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        mlp_dim=64,
        num_classes=5,
        zero_head=False,
    )
    return ViTConfig(**{**base, **overrides})


def write_finetune_config(path: Path, out_dir: Path, max_steps: int) -> Path:
    """A `vitkit finetune --config` file: the paper's recipe (SGD, no decay, clipping) on digits at
    24 px, `max_steps` steps, no evaluation."""
    path.write_text(
        textwrap.dedent(
            f"""
            from vitkit.data import DataConfig
            from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

            def experiment():
                return Experiment(
                    model=ModelConfig(),
                    data=DataConfig(dataset="digits", img_size=24, batch_size=32, num_workers=0, hflip=0.0),
                    optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, clip_grad=1.0,
                                      warmup_epochs=0.1, min_lr=0.0),
                    train=TrainConfig(out_dir="{out_dir}", epochs=1, max_steps={max_steps}, log_every=3),
                    eval=EvalConfig(split=""),
                )
            """
        )
    )
    return path


def make_image_folder(root: Path, train_per_class: int = 30, test_per_class: int = 10) -> None:
    """A CIFAR-10-shaped ImageFolder: 10 classes of 32 px JPEGs, each class its own mean colour."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            colour = np.array([label * 25, 255 - label * 25, (label * 70) % 256])
            for index in range(count):
                noise = rng.integers(-40, 40, size=(32, 32, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=90)
