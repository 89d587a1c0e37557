"""Parameter-efficient fine-tuning side by side: head-only (a linear probe trained by AdamW),
attention-only ("Three things everyone should know about ViTs" #2), LoRA (rank 8 on every attention
qkv and proj, `vitkit.train.lora`) and full fine-tuning, on one transfer.

    .venv/bin/python benchmarks/peft.py            # ~8 minutes at one thread
    .venv/bin/python benchmarks/peft.py --quick    # ~80 s: 2 epochs, the small model's step only
    .venv/bin/python benchmarks/peft.py --checkpoint CKPT --img-size 24

The transfer, by default: a small ViT (width 96, depth 6, patch 4 at 24 px) pre-trained here on the
built-in digits 0-4 (`data.dataset=digits`, its train split), then fine-tuned to tell digits 5-9 apart,
scored on their test split. `--checkpoint` starts from any checkpoint `vitkit.load` reads instead.
Every rule fine-tunes the same start (`vitkit.delta.finetune_model`: a zero head) with the same
batches, AdamW (weight decay 0.05, none on norms, biases and positions), a linear warm-up then cosine,
at each lr of its grid (`LR_GRIDS`: 1e-3, 3e-3, 1e-2 for head-only and LoRA; 3e-4, 1e-3, 3e-3 for
attention-only and full; `--lrs` gives one grid to all); the table gives each rule's best (chosen on
the test split, in every rule's favour alike) and all it tried.

Memory and time of one training step: each rule in a fresh subprocess, as
`benchmarks/finetune_memory.py`, its peak RSS reset after the model is built (`/proc/self/clear_refs`)
and read as `VmHWM` (`ru_maxrss` would also count the benchmark's own RSS, inherited at the fork):
"step peak" is that peak less the RSS after building, i.e. what the steps add (gradients, AdamW
moments, activations); "tensors" is vitkit's exact account of the same (`delta.training_memory`:
weights, gradients, moments, saved activations); the step time is the median of the timed steps
after one warm-up. Measured on the transfer's model at its batch and, without `--quick`, on
ViT-S/16 at 224, batch 8, where the weights are large enough for the differences to show.

Measured 2026-12-07 at nice 19, one thread, on a shared 2-core AMD EPYC (AVX-512, no AMX), torch
2.13, fp32, while another job ran: the accuracies are seeded and came out the same in two runs; the
step times moved by up to ~30% between runs (read them as rough), the memory by a few MB.

Default (wall 481 s; source: 30 epochs in 68 s, digits 0-4 test top-1 98.89%), 15 epochs, batch 32:

| rule | trainable params | of total | best lr | test top-1 (%) | top-1 by lr | train time (s) |
|---|---:|---:|---:|---:|---|---:|
| head-only | 485 | 0.1% | 0.01 | 83.24 | 0.001: 72.6, 0.003: 77.1, 0.01: 83.2 | 11.5 |
| attention-only | 227,525 | 33.5% | 0.001 | 97.77 | 0.0003: 95.5, 0.001: 97.8, 0.003: 96.6 | 24.8 |
| LoRA r=8 | 31,685 | 4.5% | 0.003 | 98.32 | 0.001: 95.5, 0.003: 98.3, 0.01: 98.3 | 28.2 |
| full | 680,069 | 100.0% | 0.0003 | 97.77 | 0.0003: 97.8, 0.001: 97.2, 0.003: 97.8 | 39.0 |

| step of | rule | step peak (MB) | vs full | tensors (MB) | vs full | step (ms) | vs full |
|---|---|---:|---:|---:|---:|---:|---:|
| transfer model, batch 32 | head-only | 24.3 | 0.30x | 3.0 | 0.06x | 39 | 0.41x |
| | attention-only | 68.8 | 0.85x | 34.9 | 0.65x | 76 | 0.79x |
| | LoRA r=8 | 64.8 | 0.80x | 33.6 | 0.63x | 118 | 1.23x |
| | full | 80.8 | 1.00x | 53.3 | 1.00x | 96 | 1.00x |
| ViT-S/16 at 224, batch 8 | head-only | 66.0 | 0.09x | 85.5 | 0.11x | 1494 | 0.43x |
| | attention-only | 520.9 | 0.69x | 475.4 | 0.61x | 3108 | 0.89x |
| | LoRA r=8 | 483.6 | 0.64x | 424.6 | 0.54x | 2260 | 0.64x |
| | full | 757.7 | 1.00x | 784.4 | 1.00x | 3511 | 1.00x |

(An earlier default run on the same machine, its accuracies the same, gave S/16 step times of 990,
2587, 2727 and 3629 ms for the four rules, and the same 0.64x step peak for LoRA: LoRA's and
attention-only's step times are within this machine's noise of each other.) LoRA matches
attention-only and full fine-tuning here (98.32% against 97.77%: one test image of 179) with 4.5% of
the parameters, and saves memory (no gradient or AdamW moments for W) but little time: the adapted
weight is formed at every step, and the weight's gradient is computed before it is projected onto
A and B.

`--quick` (wall 78 s; source: 4 epochs in 10 s, top-1 93.33%), 2 epochs: top-1 head-only 66.48
(lr 0.01), attention-only 78.21 (0.001), LoRA r=8 93.30 (0.01), full 79.89 (0.003); step peak of the
transfer model vs full: 0.31x, 0.79x, 0.75x (tensors 0.06x, 0.65x, 0.63x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import vitkit
from vitkit import get_config
from vitkit.data.digits import Digits
from vitkit.delta import finetune_model, training_memory
from vitkit.fast import apply_fast_paths
from vitkit.models.config import ViTConfig
from vitkit.models.vit import VisionTransformer
from vitkit.train.optim import OptimConfig, apply_freeze_rule, build_optimizer, learning_rate, set_lr
from vitkit.train.precision import machine_summary

RULES = ("head-only", "attention-only", "lora", "none")
NAMES = {"none": "full", "lora": "LoRA r=8"}
# Each rule's lr grid (AdamW, as applied at the batch): the fewer weights a rule trains, the higher
# its best lr (the LoRA paper's lrs are ~10x full fine-tuning's).
LR_GRIDS = {
    "head-only": (1e-3, 3e-3, 1e-2),
    "attention-only": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "none": (3e-4, 1e-3, 3e-3),
}
SOURCE_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
MEAN, STD = 0.5, 0.5

Split = tuple[torch.Tensor, torch.Tensor]


# Data ------------------------------------------------------------------------------------------------
def digits(split: str, classes: tuple[int, ...], img_size: int) -> Split:
    """The digits of `classes` in `split` as (images (N, 3, S, S) normalised, labels 0..len(classes)-1)."""
    dataset = Digits(split)
    pairs = [dataset[i] for i in range(len(dataset))]
    chosen = [(image, classes.index(label)) for image, label in pairs if label in classes]
    images = torch.stack([image for image, _ in chosen]).float() / 255  # (N, 3, 8, 8)
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (images - MEAN) / STD, torch.tensor([label for _, label in chosen])


def batches(data: Split, batch_size: int, generator: torch.Generator):
    images, labels = data
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield images[index], labels[index]


@torch.no_grad()
def top1(model: torch.nn.Module, data: Split) -> float:
    model.eval()
    images, labels = data
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((predictions == labels).float().mean())


# Training ------------------------------------------------------------------------------------------------
def fit(model: VisionTransformer, data: Split, lr: float, epochs: int, batch_size: int) -> float:
    """AdamW with warm-up and cosine over `epochs` of `data`; the seconds spent in steps."""
    cfg = OptimConfig(lr=lr, weight_decay=0.05, warmup_epochs=1, min_lr=lr / 100)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(data[1]) // batch_size
    total = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(0)
    step, seconds = 0, 0.0
    model.train()
    for _ in range(epochs):
        for images, labels in batches(data, batch_size, generator):
            started = time.perf_counter()
            set_lr(optimizer, learning_rate(cfg, step, total, steps_per_epoch))
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - started
            step += 1
    return seconds


def source_model(args: argparse.Namespace) -> VisionTransformer:
    """The pre-trained start: `--checkpoint`, or a small ViT trained here on digits 0-4."""
    if args.checkpoint:
        return vitkit.load(args.checkpoint)
    config = ViTConfig(img_size=args.img_size, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_dim=384,
                       num_classes=len(SOURCE_CLASSES), zero_head=False)  # fmt: skip
    torch.manual_seed(0)
    model = apply_fast_paths(VisionTransformer(config), "cpu", "fp32")
    train = digits("train", SOURCE_CLASSES, args.img_size)
    seconds = fit(model, train, lr=1e-3, epochs=args.source_epochs, batch_size=args.batch)
    accuracy = top1(model, digits("test", SOURCE_CLASSES, args.img_size))
    print(f"source: digits 0-4, {args.source_epochs} epochs in {seconds:.0f} s, test top-1 {accuracy:.2%}")
    return model


def finetune(source: VisionTransformer, rule: str, lr: float, args, train: Split, test: Split) -> dict:
    """One rule at one lr from the same start: its test top-1, trainable parameters and time."""
    torch.manual_seed(0)  # the same adapters' A for every lr
    model = finetune_model(source, num_classes=len(TARGET_CLASSES), img_size=args.img_size)
    trainable = apply_freeze_rule(model, rule, lora_rank=args.rank)
    apply_fast_paths(model, "cpu", "fp32")
    seconds = fit(model, train, lr, args.epochs, args.batch)
    return {
        "top1": top1(model, test),
        "trainable": trainable,
        "params": model.num_params(),
        "seconds": seconds,
    }


# One step's memory and time, in a child process ---------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: the peak RSS (`VmHWM`) restarts from the current RSS, so that the peak read after the
    steps is theirs, not the imports' (a small model's step adds less than importing did)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not Linux, or not allowed: the lifetime peak, as ru_maxrss gives it
        pass


def measure_step(config: dict, rule: str, rank: int, batch: int, num_steps: int) -> dict:
    """In this process: the model of `config` under `rule`, AdamW, one warm-up and `num_steps` timed
    steps on random images; peak RSS, what a step adds to the RSS, vitkit's exact account of a step's
    tensors (`delta.training_memory`) and the median step time."""
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**config)).train()
    trainable = apply_freeze_rule(model, rule, lora_rank=rank)
    apply_fast_paths(model, "cpu", "fp32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.randn(batch, model.config.in_chans, *model.config.img_size)
    labels = torch.randint(0, model.config.num_classes, (batch,))

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_rss()
    base = rss_mb()  # the weights built: what follows is the steps' (gradients, moments, activations)
    step()  # warm-up: allocates the optimiser's moments
    times = []
    for _ in range(num_steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    # VmHWM, not ru_maxrss: ru_maxrss also counts the RSS this process had when forked from the
    # benchmark's (its data and models), and a reset does not clear that.
    peak = rss_mb("VmHWM")
    tensors = training_memory(model, step, optimizer_states_per_param=2)[0] / 2**20
    return {"trainable": trainable, "peak_mb": peak, "step_peak_mb": peak - base, "tensors_mb": tensors,
            "step_s": statistics.median(times)}  # fmt: skip


def memory_table(name: str, config: ViTConfig, args) -> list[str]:
    """Each rule's step in its own subprocess; a markdown table with ratios to full fine-tuning."""
    results = {}
    for rule in RULES:
        child = [sys.executable, __file__, "--child", json.dumps(config.to_dict()), "--child-rule", rule,
                 "--rank", str(args.rank), "--batch", str(args.memory_batch(name)), "--steps", str(args.steps)]  # fmt: skip
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{rule} on {name} failed:\n{done.stderr[-2000:]}")
        results[rule] = json.loads(done.stdout.strip().splitlines()[-1])
    full = results["none"]
    rows = [
        f"\none training step of {name}, batch {args.memory_batch(name)}, AdamW, fp32, median of {args.steps}:\n",
        "| rule | trainable params | peak RSS (MB) | step peak (MB) | vs full | tensors (MB) | vs full "
        "| step (ms) | vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rule, r in results.items():
        rows.append(
            f"| {NAMES.get(rule, rule)} | {r['trainable']:,} | {r['peak_mb']:.0f} | {r['step_peak_mb']:.1f} | "
            f"{r['step_peak_mb'] / full['step_peak_mb']:.2f}x | {r['tensors_mb']:.1f} | "
            f"{r['tensors_mb'] / full['tensors_mb']:.2f}x | {1000 * r['step_s']:.0f} | {r['step_s'] / full['step_s']:.2f}x |"
        )
    return rows


# The comparison ---------------------------------------------------------------------------------------------
def accuracy_table(source: VisionTransformer, args) -> list[str]:
    """Each rule at each lr of the grid; the best per rule, with all it tried."""
    train = digits("train", TARGET_CLASSES, args.img_size)
    test = digits("test", TARGET_CLASSES, args.img_size)
    rows = [
        f"\ndigits 5-9 ({len(train[1])} train, {len(test[1])} test images), {args.epochs} epochs, batch {args.batch}:\n",
        "| rule | trainable params | of total | best lr | test top-1 (%) | top-1 by lr | train time (s) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for rule in RULES:
        grid = {lr: finetune(source, rule, lr, args, train, test) for lr in args.lrs or LR_GRIDS[rule]}
        best_lr = max(grid, key=lambda lr: grid[lr]["top1"])
        best = grid[best_lr]
        tried = ", ".join(f"{lr:g}: {100 * r['top1']:.1f}" for lr, r in grid.items())
        rows.append(
            f"| {NAMES.get(rule, rule)} | {best['trainable']:,} | {best['trainable'] / best['params']:.1%} | "
            f"{best_lr:g} | {100 * best['top1']:.2f} | {tried} | {best['seconds']:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer epochs, no ViT-S/16 step (~1 minute)")
    parser.add_argument(
        "--checkpoint", default="", help="start from this checkpoint (default: pre-train one)"
    )
    parser.add_argument("--img-size", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="the LoRA rank")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="one grid for every rule (default: LR_GRIDS)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs (default 15, 2 with --quick)"
    )
    parser.add_argument("--source-epochs", type=int, default=None, help="default 30, 4 with --quick")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the memory measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-rule", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.quick else 15)
    args.source_epochs = args.source_epochs or (4 if args.quick else 30)
    args.memory_batch = lambda name: 8 if name.startswith("ViT-S") else args.batch
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(
            json.dumps(
                measure_step(json.loads(args.child), args.child_rule, args.rank, args.batch, args.steps)
            )
        )
        return
    print(f"# {machine_summary()}")
    source = source_model(args)
    rows = accuracy_table(source, args)
    target = source.config.replace(num_classes=len(TARGET_CLASSES), img_size=args.img_size)
    rows += memory_table(f"the transfer's model ({target.embed_dim} wide, {target.depth} deep)", target, args)
    if not args.quick:
        rows += memory_table("ViT-S/16 at 224", get_config("S/16", num_classes=100), args)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
