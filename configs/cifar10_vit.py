"""A small hybrid ViT trained from scratch on CIFAR-10 for 30 minutes of the CPU's free cores: the
time-to-accuracy recipe. Data: an ImageFolder at `$VITKIT_DATA/cifar10` (by default
../shared/data/cifar10 beside the checkout).

    vitkit train --config cifar10_vit
    python benchmarks/cifar10_time_to_accuracy.py          # the 30-minute run: top-1 against wall time, curve PNG

Expected: test top-1 about 67% after 30 minutes on a 2-core CPU (fp32, 2 threads, about 440 images/s;
EMA weights, flip-averaged); about 47% with `--budget-minutes 4`. The measurements behind these
figures, and the models compared on the way, are in docs/results.md ("CIFAR-10 from scratch").

Model: a convolutional stem ("Early Convolutions Help Transformers See Better"; the ViT paper's hybrid
in small): three stride-2 3x3 conv-BN-ReLU layers (3 -> 48 -> 96 -> 192 channels, 32 -> 4 px) and a
1x1 projection, so 16 tokens + the class token; width 192, depth 6, 6 heads, MLP 384 (2.0 M
parameters). Data, optimiser and budget as in `cifar10_vit_patch`: cached uint8 images, batch
pad-crop (4 px) and flip, label smoothing 0.1; AdamW lr 2e-3, one-epoch warmup, cosine to 0 within
a 30-minute budget of training-step time (`train.time_budget_minutes`). An EMA of the weights (decay
0.999 with its warmup, min(0.999, (1 + n) / (10 + n)) at step n) is what is evaluated, averaging each
test image's predictions with its mirror image's (`eval.hflip_tta`); evaluation is outside the budget.
"""

from vitkit.data import DataConfig, data_root
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(
                stem="conv", patch_size=8, embed_dim=192, depth=6, num_heads=6, mlp_dim=384, zero_head=True
            ),
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
            out_dir="runs/cifar10_vit",
            epochs=20,
            time_budget_minutes=30.0,
            num_threads=0,
            ema_decay=0.999,
            ema_warmup=True,
            log_every=20,
            keep_last=1,
        ),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5), hflip_tta=True),
    )
