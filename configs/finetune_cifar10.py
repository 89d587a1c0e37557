"""Fine-tuning as in the ViT paper (section 3.2 and appendix B.1.1), on CIFAR-10 at a higher resolution.

    vitkit finetune runs/pretrain_cifar10/encoder.safetensors --config finetune_cifar10
    vitkit finetune CHECKPOINT --config finetune_cifar10 --freeze attention-only   # "Three things" #2

`vitkit finetune` loads any checkpoint `vitkit.load` reads, drops its pre-logits layer and head,
attaches a zero-initialised head for the 10 classes and interpolates the position embeddings in 2D
from the checkpoint's grid to this config's 48 px (12 x 12 patches of 4 px for a 32 px, patch-4
pre-trained model). The paper's recipe: SGD with momentum 0.9, no weight decay, gradient clipping at
global norm 1, linear warmup then cosine decay, batch 512, no mixup. The lr is stated for batch 512
and scaled linearly to the batch actually used (`optim.lr_base_batch`): 0.0075 at this config's 128,
0.00094 at batch 16; `--print-config` shows the scaled value and `optim.lr_note` says how it came.
Images are prepared as the checkpoint expects them (its recorded preprocessing, or its layout's
default: mean/std, interpolation, eval resize); `--set data.mean=[...]` and the like override it.
Data: CIFAR-10 as an ImageFolder (`$VITKIT_DATA/cifar10`, by default ../shared/data/cifar10 beside the checkout). The learning rate is one value of the
paper's fine-tuning grid {0.001, 0.003, 0.01, 0.03}, not tuned here: choose yours on a held-out
part of train (`--set data.val_fraction=0.1 --set eval.split=val`), never on test.
Expected time and accuracy: not measured yet on a whole run; a 48 px step of the 6-layer, width-192
model at batch 128 costs about 2.5x a 32 px step (144 vs 64 tokens). benchmarks/reproduce.py
measures this recipe (full vs attention-only, with vs without interpolation) within a budget.
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
            img_size=48,
            batch_size=128,
            num_workers=2,
            # The paper's fine-tuning augmentation: random crop and flip only.
            scale=(0.25, 1.0),
            hflip=0.5,
            eval_resize="squash",
        ),
        optim=OptimConfig(
            name="sgd",
            lr=0.03,
            lr_base_batch=512,
            momentum=0.9,
            weight_decay=0.0,
            clip_grad=1.0,
            schedule="cosine",
            warmup_epochs=0.5,
            min_lr=0.0,
        ),
        train=TrainConfig(out_dir="runs/finetune_cifar10", epochs=3, log_every=20, keep_last=1),
        eval=EvalConfig(split="test", every=1, top_k=(1, 5)),
    )
