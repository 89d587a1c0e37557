"""The pure ViT of the CIFAR-10 time-to-accuracy benchmark: 4x4 patches through the ViT paper's
linear patch stem, trained with the hybrid recipe's data, optimiser and budget (`cifar10_vit`), so
only the stem and the trunk differ.

    vitkit train --config cifar10_vit_patch
    python benchmarks/cifar10_time_to_accuracy.py --config cifar10_vit_patch --out runs/bench_cifar10_patch

Expected: see the README's "CIFAR-10 from scratch" table (figures per CPU).

Model: 32-px images cut into 4x4 patches (64 tokens, no class token), width 192, depth 4, 3 heads,
MLP 384, the mean of the tokens read by the head (pool "gap"); 1.2 M parameters. Data and training
as `cifar10_vit`: cached uint8 images pad-cropped (4 px) and flipped per batch, label smoothing 0.2,
batch 256, AdamW lr 2e-3 (betas 0.9/0.99) with a 0.4-epoch warmup and cosine decay to 0 at the end
of a 30-minute budget of training-step time, flip-averaged evaluation outside the budget.
"""

from vitkit.data import DataConfig, data_root
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(
                patch_size=4,
                embed_dim=192,
                depth=4,
                num_heads=3,
                mlp_dim=384,
                class_token=False,
                pool="gap",
                zero_head=True,
            ),
        ),
        data=DataConfig(
            dataset="imagefolder",
            root=str(data_root() / "cifar10"),
            img_size=32,
            batch_size=256,
            num_workers=0,
            cache=True,
            cache_dir="runs/cache",
            train_crop="pad",
            crop_padding=4,
            batch_augment=True,
            hflip=0.5,
            label_smoothing=0.2,
            eval_resize="squash",
            interpolation="bilinear",
        ),
        optim=OptimConfig(
            name="adamw",
            lr=2e-3,
            betas=(0.9, 0.99),
            weight_decay=0.05,
            warmup_epochs=0.4,
            min_lr=0.0,
            clip_grad=1.0,
        ),
        train=TrainConfig(
            out_dir="runs/cifar10_vit_patch",
            epochs=40,
            time_budget_minutes=30.0,
            num_threads=0,
            log_every=20,
            keep_last=1,
        ),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5), hflip_tta=True),
    )
