"""Masked-patch pre-training on CIFAR-10 (ViT paper, section 4.6), then `vitkit finetune`.

    vitkit pretrain --config pretrain_cifar10
    vitkit pretrain --config pretrain_cifar10 --set masked.masking=blockwise --set masked.target=pixels \
        --set masked.mask_ratio=0.4                                          # BeiT-style
    vitkit finetune runs/pretrain_cifar10/encoder.safetensors --config finetune_cifar10

A 6-layer, width-192 ViT on 32 px images cut into 4 px patches (64 tokens). Half of the patch
embeddings are corrupted (80% mask token, 10% another patch, 10% kept) and the 3-bit mean colour of
each corrupted patch (512 classes) is predicted from its output token. Labels are not used.
The hMLP stem needs 16 px patches: `--set model.overrides.stem=hmlp --set model.overrides.patch_size=16
--set data.img_size=128` keeps 64 tokens.
Expected: 390 steps of 128 images per epoch; time and final mean-colour accuracy not measured yet
on a whole run (the machine was shared by six engineers while this was written). The loss starts
at log(512) = 6.24 nats (chance); `benchmarks/reproduce.py` measures what pre-training buys.
"""

from vitkit.data import DataConfig, data_root
from vitkit.models.masked import MaskedConfig
from vitkit.train import ModelConfig, OptimConfig, TrainConfig
from vitkit.train.pretrain import PretrainExperiment


def experiment() -> PretrainExperiment:
    return PretrainExperiment(
        model=ModelConfig(name="vit_tiny_patch4_32", overrides=dict(depth=6, mlp_dim=576, num_heads=3)),
        masked=MaskedConfig(target="mean_colour", masking="vit", mask_ratio=0.5),
        data=DataConfig(
            dataset="imagefolder",
            root=str(data_root() / "cifar10"),
            img_size=32,
            batch_size=128,
            num_workers=2,
            scale=(0.5, 1.0),
            hflip=0.5,
        ),
        # The ViT paper pre-trains its masked-patch model with Adam, lr 2e-4, no weight decay
        # (appendix B.1.2); a small model trains faster at a higher rate.
        optim=OptimConfig(
            name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1, min_lr=1e-5, clip_grad=1.0
        ),
        train=TrainConfig(out_dir="runs/pretrain_cifar10", epochs=10, log_every=20),
    )
