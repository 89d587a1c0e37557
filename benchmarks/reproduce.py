"""The reproduction table: the papers' methods on CIFAR-10, within a stated CPU budget.

    python benchmarks/reproduce.py --quick                      # a few minutes: shows that it works
    python benchmarks/reproduce.py --budget-minutes 75 --threads 1   # the README's table (~80 min)

Rows, all on the same images with the same small ViT (width 192, 6 blocks, 3 heads, 64 tokens):
1. From scratch vs masked-patch pre-trained (ViT paper 4.6: 50% corrupted, 3-bit mean colour), for
   the linear stem (4 px patches of 32 px images) and the hMLP stem (16 px patches of the images
   upsampled to 128 px: the same 64 tokens). Pre-trained models then get the same supervised
   training as the scratch ones; few-shot (10-shot ridge) accuracy of each frozen encoder is shown too.
2. Full vs attention-only fine-tuning at a higher resolution (32 -> 48 px, 64 -> 144 tokens) from the
   scratch linear model, with the ViT paper's recipe (SGD 0.9, no decay, clip 1, warmup + cosine):
   accuracy, trainable parameters, training memory and step time.
3. Sequential (6x1) vs parallel (3x2) blocks at equal parameters, from scratch: accuracy and
   inference latency at batch 1 and 64.
4. Fine-tuning at 48 px with the position embeddings interpolated in 2D vs re-initialised.

The budget is split by measuring one training step first; each training run gets the same number
of steps (pre-training as many, high-resolution fine-tuning half as many). Timings are of this
process on a shared machine: compare rows of one run, not runs. Everything is printed as measured.

Seen with --budget-minutes 75 --threads 1 (710 steps of 64 images per run, 0.9 epochs): scratch 38.5%,
masked-patch pre-trained 46.2% (patch stem); hMLP 35.6% / 42.5%; fine-tuning at 48 px full 40.9%,
attention-only 40.4% (0.71x the memory, 0.81x the step time), positions re-initialised 40.0%;
parallel 3x2 41.2% at the latency of 6x1 (3.8 vs 3.9 ms at batch 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vitkit.data import ImageFolder
from vitkit.delta import finetune_model, measure_freezing
from vitkit.eval.fewshot import FewShotConfig, fewshot_accuracies
from vitkit.io import atomic_write
from vitkit.models.config import ViTConfig
from vitkit.models.masked import MaskedConfig, MaskedPatchModel
from vitkit.models.vit import VisionTransformer
from vitkit.train.optim import OptimConfig, apply_freeze_rule, learning_rate, param_groups, set_lr
from vitkit.train.precision import machine_summary

# Ti-width, half depth: small enough for a CPU, big enough to show the methods apart.
WIDTH, DEPTH, HEADS, MLP = 192, 6, 3, 576


@dataclass
class Data:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_cifar(root: Path, per_class_train: int, per_class_test: int, cache: Path) -> Data:
    """The first `per_class_*` images of each class, decoded once and cached as uint8 arrays."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as arrays:
            data = Data(*(torch.from_numpy(arrays[k]) for k in ("xtr", "ytr", "xte", "yte")))
        if len(data.train_labels) == 10 * per_class_train and len(data.test_labels) == 10 * per_class_test:
            return data

    def read(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        folder = ImageFolder(root / split, on_bad="error")
        targets = torch.as_tensor(folder.targets)
        chosen = torch.cat([torch.nonzero(targets == c).flatten()[:per_class] for c in range(10)])
        images, labels = [], []
        loader = DataLoader(Subset(folder, chosen.tolist()), batch_size=500, num_workers=2)
        for batch_images, batch_labels in tqdm(loader, desc=f"decoding {split}", leave=False):
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.cat(images), torch.cat(labels)

    data = Data(*read("train", per_class_train), *read("test", per_class_test))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                xtr=data.train_images.numpy(),
                ytr=data.train_labels.numpy(),
                xte=data.test_images.numpy(),
                yte=data.test_labels.numpy(),
            )

    atomic_write(cache, write)
    return data


def to_model_input(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> float in [-1, 1] at img_size (the official ViT normalisation)."""
    x = images.float() / 127.5 - 1.0
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CIFAR's standard augmentation on uint8 batches: 4 px reflect-pad, random 32 px crop, flip."""
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (len(images), 2), generator=generator)
    flips = torch.rand(len(images), generator=generator) < 0.5
    out = torch.stack([padded[i, :, y : y + 32, x : x + 32] for i, (y, x) in enumerate(offsets.tolist())])
    out[flips] = out[flips].flip(-1)
    return out.to(torch.uint8)


def batches(data: Data, batch_size: int, num_steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(num_steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data.train_labels), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        yield augment(data.train_images[index], generator), data.train_labels[index]


def config(stem: str = "patch", depth: int = DEPTH, parallel: int = 1, img_size: int = 32, **kw) -> ViTConfig:
    patch, size = (16, img_size * 4) if stem == "hmlp" else (4, img_size)
    return ViTConfig(
        img_size=size, patch_size=patch, stem=stem, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
        mlp_dim=MLP, parallel=parallel, num_classes=10, **kw,
    )  # fmt: skip


def optimizer_for(params_source, cfg: OptimConfig, extra: list | None = None) -> torch.optim.Optimizer:
    groups = param_groups(params_source, cfg.weight_decay) + (extra or [])
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


SCRATCH = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0, min_lr=1e-5, clip_grad=1.0)
# The ViT paper's fine-tuning recipe.
FINETUNE = OptimConfig(
    name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, warmup_epochs=0, min_lr=0.0, clip_grad=1.0
)


def train_steps(
    model: torch.nn.Module,
    step_loss,
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    data: Data,
    num_steps: int,
    batch_size: int,
    desc: str,
) -> float:
    """`num_steps` steps of warmup (10%) + cosine; returns the seconds spent."""
    model.train()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = max(1, num_steps // 10)
    started = time.perf_counter()
    for step, (images, labels) in enumerate(
        tqdm(
            batches(data, batch_size, num_steps, seed=step_seed(desc)),
            total=num_steps,
            desc=desc,
            leave=False,
        )
    ):
        set_lr(optimizer, learning_rate(cfg, step, num_steps, warmup))
        loss = step_loss(images, labels, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def step_seed(desc: str) -> int:
    return sum(ord(c) for c in desc)


def supervised(
    model: VisionTransformer, data: Data, num_steps: int, batch_size: int, cfg: OptimConfig, desc: str
):
    size = model.config.img_size[0]
    optimizer = optimizer_for(model, cfg)

    def loss(images, labels, step):
        return F.cross_entropy(model(to_model_input(images, size)), labels)

    return train_steps(model, loss, optimizer, cfg, data, num_steps, batch_size, desc)


def masked_pretrain(encoder: VisionTransformer, data: Data, num_steps: int, batch_size: int) -> float:
    model = MaskedPatchModel(encoder, MaskedConfig())
    extra = [
        {"params": [model.mask_token], "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "weight_decay": 0.0},
    ]
    optimizer = optimizer_for(encoder, SCRATCH, extra)
    size = encoder.config.img_size[0]

    def loss(images, labels, step):
        return model(to_model_input(images, size), torch.Generator().manual_seed(step))[0]

    return train_steps(
        model, loss, optimizer, SCRATCH, data, num_steps, batch_size, f"pretrain {encoder.config.stem}"
    )


@torch.no_grad()
def accuracy(model: VisionTransformer, data: Data, img_size: int | None = None) -> float:
    model.eval()
    size = img_size or model.config.img_size[0]
    correct = 0
    for start in range(0, len(data.test_labels), 250):
        images = to_model_input(data.test_images[start : start + 250], size)
        correct += (model(images).argmax(-1) == data.test_labels[start : start + 250]).sum().item()
    return correct / len(data.test_labels)


@torch.no_grad()
def fewshot10(model: VisionTransformer, data: Data) -> float:
    """10-shot ridge accuracy of the frozen pre-logits features (3 seeds)."""
    model.eval()
    size = model.config.img_size[0]

    def features(images: torch.Tensor) -> torch.Tensor:
        chunks = [images[i : i + 250] for i in range(0, len(images), 250)]
        return torch.cat(
            [
                model.forward_head(model.forward_features(to_model_input(c, size)), pre_logits=True)
                for c in chunks
            ]
        )

    # Draws of 10 shots x 3 seeds come from the first 100 images of each class.
    pool = torch.cat([torch.nonzero(data.train_labels == c).flatten()[:100] for c in range(10)])
    metrics = fewshot_accuracies(
        features(data.train_images[pool]),
        data.train_labels[pool],
        features(data.test_images),
        data.test_labels,
        FewShotConfig(shots=(10,), num_seeds=3),
    )
    return metrics["10shot"]


@torch.no_grad()
def latency_ms(model: VisionTransformer, batch_size: int, repeats: int) -> float:
    model.eval()
    images = torch.randn(batch_size, 3, *model.config.img_size)
    model(images)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(images)
        timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    parser.add_argument("--budget-minutes", type=float, default=120.0, help="training time to spend in total")
    parser.add_argument("--quick", action="store_true", help="1,000 train / 500 test images, 3-minute budget")
    parser.add_argument("--train-per-class", type=int, default=5000)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="runs/reproduce")
    args = parser.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.budget_minutes = 100, 50, 3.0
        args.batch_size = min(args.batch_size, 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine_summary()}", file=sys.stderr)
    out = Path(args.out)
    torch.manual_seed(0)
    data = load_cifar(
        Path(args.data), args.train_per_class, args.test_per_class,
        out / f"cifar10_{args.train_per_class}_{args.test_per_class}.npz",
    )  # fmt: skip
    print(
        f"CIFAR-10: {len(data.train_labels)} train, {len(data.test_labels)} test images; "
        f"budget {args.budget_minutes:g} min; {torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    # Split the budget: time a few steps of the base model; 4 scratch/supervised runs + 1 parallel,
    # 2 pre-training runs (x1), 3 fine-tuning runs at 48 px (x2.5 cost per step, half the steps).
    probe = VisionTransformer(config())
    probe_seconds = supervised(probe, data, 3, args.batch_size, SCRATCH, "timing") / 3
    units = 5 + 2 + 3 * 2.5 * 0.5
    steps = max(5, int(args.budget_minutes * 60 / (units * probe_seconds)))
    finetune_steps = max(3, steps // 2)
    epochs = steps * args.batch_size / len(data.train_labels)
    print(
        f"{probe_seconds * 1000:.0f} ms/step -> {steps} steps per run ({epochs:.1f} epochs)", file=sys.stderr
    )

    rows: dict[str, dict] = {}
    # 1. Scratch vs masked-patch pre-trained, linear and hMLP stems.
    models: dict[str, VisionTransformer] = {}
    for stem in ("patch", "hmlp"):
        torch.manual_seed(0)
        scratch = VisionTransformer(config(stem))
        seconds = supervised(scratch, data, steps, args.batch_size, SCRATCH, f"scratch {stem}")
        rows[f"scratch, {stem} stem"] = {"top1": accuracy(scratch, data), "time_s": seconds}
        models[f"scratch {stem}"] = scratch
        torch.manual_seed(0)
        encoder = VisionTransformer(config(stem))
        pretrain_seconds = masked_pretrain(encoder, data, steps, args.batch_size)
        fewshot = fewshot10(encoder, data)
        seconds = supervised(encoder, data, steps, args.batch_size, SCRATCH, f"after pretrain {stem}")
        rows[f"masked-patch pre-trained, {stem} stem"] = {
            "top1": accuracy(encoder, data), "time_s": pretrain_seconds + seconds, "fewshot10_encoder": fewshot,
        }  # fmt: skip

    # 2 and 4. Fine-tuning at 48 px from the scratch linear model.
    base = models["scratch patch"]
    rows["scratch, patch stem"]["top1_at_48_no_finetune"] = accuracy(base, data, img_size=48)
    for name, rule, interpolate in (
        ("fine-tune 48 px, full", "none", True),
        ("fine-tune 48 px, attention-only", "attention-only", True),
        ("fine-tune 48 px, full, pos-embed re-initialised", "none", False),
    ):
        torch.manual_seed(0)
        model = finetune_model(base, num_classes=10, img_size=48)
        if not interpolate:
            with torch.no_grad():
                model.pos_embed.normal_(std=0.02)
        num_trainable = apply_freeze_rule(model, rule)
        seconds = supervised(model, data, finetune_steps, args.batch_size, FINETUNE, name)
        cost = measure_freezing(
            model.config, rule, batch_size=8 if args.quick else args.batch_size, num_steps=3
        )
        rows[name] = {
            "top1": accuracy(model, data), "time_s": seconds, "trainable": num_trainable,
            "params": model.num_params(), "memory_mib": cost.memory_bytes / 2**20,
            "step_ms": 1000 * cost.step_seconds,
        }  # fmt: skip

    # 3. Sequential 6x1 vs parallel 3x2 at equal parameters.
    torch.manual_seed(0)
    parallel = VisionTransformer(config(depth=DEPTH // 2, parallel=2))
    assert parallel.num_params() == base.num_params()
    seconds = supervised(parallel, data, steps, args.batch_size, SCRATCH, "scratch parallel 3x2")
    rows["parallel 3x2, patch stem"] = {"top1": accuracy(parallel, data), "time_s": seconds}
    repeats = 5 if args.quick else 20
    for name, model in (("scratch, patch stem", base), ("parallel 3x2, patch stem", parallel)):
        rows[name]["latency_b1_ms"] = latency_ms(model, 1, repeats * 4)
        rows[name]["latency_b64_ms"] = latency_ms(model, 64, repeats)
        rows[name]["params"] = model.num_params()

    table = format_table(rows, steps, finetune_steps, epochs)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    atomic_write(out / "rows.json", lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))
    return 0


def format_table(rows: dict[str, dict], steps: int, finetune_steps: int, epochs: float) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = [
        f"Runs of {steps} steps ({epochs:.1f} epochs; fine-tuning {finetune_steps} steps). Top-1 on the test images.",
        "",
        "| run | top-1 (%) | 10-shot of encoder (%) | trainable / params | memory (MiB) | step (ms) "
        "| latency b1 / b64 (ms) | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        params = f"{row['trainable']:,} / {row['params']:,}" if "trainable" in row else (
            f"{row['params']:,}" if "params" in row else ""
        )  # fmt: skip
        latency = (
            f"{row['latency_b1_ms']:.1f} / {row['latency_b64_ms']:.0f}" if "latency_b1_ms" in row else ""
        )
        fewshot = row.get("fewshot10_encoder")
        lines.append(
            f"| {name} | {100 * row['top1']:.1f} | {'' if fewshot is None else f'{100 * fewshot:.1f}'} | {params} "
            f"| {cell(row, 'memory_mib', '.0f')} | {cell(row, 'step_ms', '.0f')} | {latency} | {row['time_s']:.0f} |"
        )
    if "top1_at_48_no_finetune" in rows.get("scratch, patch stem", {}):
        lines.append(
            f"\nThe scratch model evaluated at 48 px with 2D-interpolated positions and no fine-tuning: "
            f"{100 * rows['scratch, patch stem']['top1_at_48_no_finetune']:.1f}%."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
