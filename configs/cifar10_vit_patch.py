"""The pure ViT of the CIFAR-10 time-to-accuracy benchmark (4x4 patches, a linear patch stem), kept
as the baseline row against `cifar10_vit` (the convolutional stem): the same data, optimiser and
budget, only the model differs.

    vitkit train --config cifar10_vit_patch
    python benchmarks/cifar10_time_to_accuracy.py --config cifar10_vit_patch --out runs/bench_cifar10_patch

Model: 32-px images cut into 4x4 patches (64 tokens + class token), width 128, depth 6, 4 heads, MLP 256
(0.81 M parameters); precision "auto" (fp32 on CPUs without AMX). Data: the 60,000 JPEGs are decoded
once into a uint8 cache (runs/cache), and each batch is pad-cropped (4 px), flipped and normalised as
one tensor in the training process; label smoothing 0.1, no mixup. AdamW, lr 2e-3 with a one-epoch
warmup and cosine decay to 0, driven by a 30-minute budget of training-step time
(`train.time_budget_minutes`): the schedule anneals at 30 minutes whatever the machine's speed, and
`epochs` is only an upper bound. Evaluation (excluded from the budget) squashes to 32 px. One thread:
on the shared 2-core machines 2 threads fall to 40-120 images/s when other jobs share the cores.

Measured (2026-11-21, the 2-core Xeon, AVX-512 with avx512_bf16, no AMX, shared with other jobs, load
average 4.3 at the start, 1.0 at the end; 1 thread; then the default `cifar10_vit`):

    python benchmarks/cifar10_time_to_accuracy.py --figure docs/figures/cifar10_time_to_accuracy.png

    3,733 steps (477,824 images, 9.6 epochs) in 30.0 training minutes, 265 images/s
    test top-1: 36.2% at 3 min, 49.6% at 9.1, 55.4% at 15.6, 59.8% at 22, 62.3% at 28.2, 62.1% at 30

On the 2-core AMD EPYC (no AMX, no avx512_bf16), 4-minute budgets (`--budget-minutes 4`), shared
with other jobs: 198 steps, 105 images/s, 33.9% (load average 0.1 -> 2.8); 281 steps, 149 images/s,
37.6% (load 2.2 -> 2.0). `cifar10_vit`'s docstring compares it with the other models measured.
"""

from vitkit.data import DataConfig, data_root
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_dim=256, zero_head=True),
        ),
        data=DataConfig(
            dataset="imagefolder",
            root=str(data_root() / "cifar10"),
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
            out_dir="runs/cifar10_vit_patch",
            epochs=20,
            time_budget_minutes=30.0,
            num_threads=1,
            log_every=20,
            keep_last=1,
        ),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5)),
    )
