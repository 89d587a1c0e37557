"""The main job (`make demo`): a small ViT trained from scratch on the embedded 8x8 digits.

    vitkit train --config digits_vit                  # or: make demo (train, evaluate, figures)

scikit-learn's bundled digits (1,437 train / 360 test images, 10 classes) are upsampled to 16 px and
cut into 4x4 patches: 16 tokens of width 64, depth 4. AdamW with a short warmup and cosine decay,
light augmentation (crop scale 0.6-1, no flip: a mirrored 2 is not a 2).
Expected on a shared 2-core CPU: about 1 minute, test top-1 about 97%.
"""

from vitkit.data import DataConfig
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        model=ModelConfig(
            name="vit_tiny_patch16_224",
            overrides=dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_dim=128, zero_head=True),
        ),
        data=DataConfig(
            dataset="digits",
            img_size=16,
            batch_size=64,
            num_workers=0,
            scale=(0.6, 1.0),
            ratio=(0.8, 1.25),
            hflip=0.0,
            eval_resize="squash",
        ),
        optim=OptimConfig(
            name="adamw", lr=2e-3, weight_decay=0.05, warmup_epochs=3, min_lr=1e-5, clip_grad=1.0
        ),
        train=TrainConfig(out_dir="runs/digits_vit", epochs=40, num_threads=1, log_every=10, keep_last=2),
        eval=EvalConfig(split="test", every=5, top_k=(1, 5)),
    )
