"""The fine-tuning `vitkit finetune CHECKPOINT --root FOLDER` runs when no `--config` is named: this
file gives the data and run defaults, and `vitkit.train.finetune_recipe.choose_finetune_recipe`
fills the optimiser, lr, schedule, epochs, batch, layer decay, crops and label smoothing from the
number of training images and the checkpoint's depth (the table in that module), then fits the new
head as a linear probe on the frozen features before fine-tuning everything (LP-FT).

    vitkit finetune CHECKPOINT --root FOLDER                         # FOLDER/train/<class>/*.jpg, FOLDER/test/...
    vitkit finetune CHECKPOINT --root FOLDER --set optim.lr=1e-4     # the lr as applied, no batch scaling
    vitkit finetune CHECKPOINT --root FOLDER --print-config          # the resolved recipe, without training

The run's first lines say the recipe and how it was derived (also in the run folder's
finetune_recipe.json); `--set key=value` overrides any of its fields. Expected results: README,
"Fine-tuning defaults" (e.g. a CIFAR-10-trained 6-block ViT on the 8x8 digits: above a linear probe
of its frozen features, a few minutes on a 2-core CPU).
"""

from vitkit.data import DataConfig, data_root
from vitkit.train import EvalConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def experiment() -> Experiment:
    return Experiment(
        # `vitkit finetune CHECKPOINT` sets init_from to the prepared start; name is then unused.
        model=ModelConfig(name="vit_tiny_patch4_32", freeze="none"),
        data=DataConfig(
            dataset="imagefolder",
            root=str(data_root() / "cifar10"),
            batch_size=32,
            num_workers=2,
            # Mild crops and flips (the recipe's crops): strong augmentation (RandAugment, mixup)
            # needs more steps than a small set gets, and moves the inputs away from the probe head's.
            scale=(0.8, 1.0),
            hflip=0.5,
        ),
        # The recipe replaces these (see finetune_recipe.py); they apply as written with --recipe config.
        optim=OptimConfig(
            name="adamw", lr=3e-4, weight_decay=0.05, warmup_epochs=1.0, min_lr=3e-6, clip_grad=1.0
        ),
        train=TrainConfig(out_dir="runs/finetune", epochs=10, log_every=20, keep_last=1),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5)),
    )
