"""The pure ViT of the CIFAR-10 time-to-accuracy benchmark (4x4 patches, a linear patch stem), kept
as the baseline row against `cifar10_vit` (the convolutional stem): the same data, optimiser and
budget, only the model differs.

    vitkit train --config cifar10_vit_patch
    python benchmarks/cifar10_time_to_accuracy.py --config cifar10_vit_patch --out runs/bench_cifar10_patch

Expected: test top-1 about 57-62% after 30 minutes on a 2-core CPU (1 thread, about 160-265
images/s); about 38% with `--budget-minutes 4`. The measurements are in docs/results.md
("CIFAR-10 from scratch").

Model: 32-px images cut into 4x4 patches (64 tokens + class token), width 128, depth 6, 4 heads, MLP 256
(0.81 M parameters). Data: the 60,000 JPEGs are decoded once into a uint8 cache (runs/cache), and
each batch is pad-cropped (4 px), flipped and normalised as one tensor in the training process;
label smoothing 0.1, no mixup. AdamW, lr 2e-3 with a one-epoch warmup and cosine decay to 0, driven
by a 30-minute budget of training-step time (`train.time_budget_minutes`): the schedule anneals at 30
minutes whatever the machine's speed, and `epochs` is only an upper bound. Evaluation (excluded from
the budget) squashes to 32 px. One thread: on shared 2-core machines two threads slow down when
other jobs share the cores.
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
