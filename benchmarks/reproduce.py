"""The reproduction table: each claim of the two papers on CIFAR-10, from several seeds, with its spread.

    python benchmarks/reproduce.py --quick             # about a minute: shows that it all works
    python benchmarks/reproduce.py --jobs 2            # the README's table (2 runs at a time, 1 thread each; ~2 hours)

Every model is the same small ViT (width 128, 6 blocks, 4 heads, MLP 384, 64 tokens) on the first
`--train-per-class` training images of each class, trained for `--epochs` epochs (AdamW, warmup +
cosine, CIFAR's pad-crop-flip), and scored on the first `--test-per-class` test images of each class.
The runs, each once per seed:

- scratch, linear stem (4 px patches) / hMLP stem (4 px patches: a per-pixel projection, then two
  2x2 ones; the same 64 tokens) / convolutional stem (the hybrid: stride-2 3x3 conv-BN-ReLU layers, 32 -> 8 px) /
  parallel blocks (3 layers of 2 parallel blocks: the parameters of the 6 sequential ones);
- masked-patch pre-trained (ViT paper 4.6: 50% of patches corrupted, 3-bit mean colour predicted),
  linear and hMLP stems: as many epochs of pre-training, then the same supervised training as scratch;
  the 10-shot ridge accuracy of the frozen pre-trained encoder is shown too;
- fine-tuning the scratch linear-stem model at 48 px (64 -> 144 tokens) with the ViT paper's recipe
  (SGD 0.9, no decay, clip 1): full, attention-only, full with the position embeddings
  re-initialised instead of interpolated in 2D, and two peers of attention-only: LoRA adapters of
  rank 8 on every attention module, and head-only (a linear probe), on the same recipe.

`--pretrain-epochs` sets the pre-training apart from the supervised epochs; `--precision auto` takes
bf16 autocast where this machine measured bf16 products fast (vitkit's calibration), as training does.

Each claim is a difference between two rows paired by seed (one seed: the same
initialisation seed and the same batches). It holds when the mean paired difference is more than twice its standard
error (std of the differences / sqrt(seeds)) in the claimed direction; for a claim of "no loss" (the
cheaper method matches), it holds unless the difference is more than twice its standard error below
zero. Memory, step time and latency are measured after the training runs, with nothing else running
in this process; on a shared machine compare rows of one run, never runs.

Seen with --jobs 2 (2-core AMD EPYC with avx512_bf16, bf16 chosen, 117 minutes; the README has the
table): on all 50,000 training images, one epoch of masked-patch pre-training then one supervised,
pre-training helps (+4.8 ± 0.6 linear stem, +3.3 ± 0.4 hMLP), the hybrid +5.5 ± 0.2, parallel blocks
+2.9 ± 0.4, interpolated positions +1.6 ± 0.2 and attention-only fine-tuning -0.1 ± 0.2 hold; the hMLP
stem trails the linear one after pre-training (-3.6 ± 0.4) and LoRA trails full fine-tuning at the
shared lr (-1.0 ± 0.3). On 1,500 images for 10 epochs (an older default, fp32) pre-training was
within noise (+0.4 ± 0.2) and so were interpolated positions (+0.3 ± 0.2).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vitkit.data import ImageFolder
from vitkit.delta import finetune_model, measure_freezing
from vitkit.eval.fewshot import FewShotConfig, fewshot_accuracies
from vitkit.fast import apply_fast_paths
from vitkit.fast.machine import choose_precision
from vitkit.io import atomic_write
from vitkit.models.config import ViTConfig
from vitkit.models.masked import MaskedConfig, MaskedPatchModel
from vitkit.models.vit import VisionTransformer
from vitkit.train.optim import OptimConfig, apply_freeze_rule, learning_rate, param_groups, set_lr
from vitkit.train.precision import machine_summary

WIDTH, DEPTH, HEADS, MLP = 128, 6, 4, 384
FINETUNE_SIZE = 48
FULL = dict(
    train_per_class=5000, test_per_class=1000, epochs=1.0, finetune_epochs=0.2, seeds=3, batch_size=64,
    precision="auto",
)  # fmt: skip
QUICK = dict(
    train_per_class=20, test_per_class=10, epochs=1.0, finetune_epochs=1.0, seeds=2, batch_size=32,
    precision="fp32",
)  # fmt: skip

SCRATCH = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0, min_lr=1e-5, clip_grad=1.0)
# The ViT paper's fine-tuning recipe.
FINETUNE = OptimConfig(
    name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, warmup_epochs=0, min_lr=0.0, clip_grad=1.0
)


@dataclass(frozen=True)
class Settings:
    cache: str
    epochs: float
    finetune_epochs: float
    batch_size: int
    threads: int
    pretrain_epochs: float
    precision: str  # "fp32" or "bf16" (autocast), resolved before the workers start

    def autocast(self):
        return torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16")


@dataclass
class Data:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def steps(self, epochs: float, batch_size: int) -> int:
        return max(1, round(epochs * len(self.train_labels) / batch_size))


def load_cifar(root: Path, per_class_train: int, per_class_test: int, cache: Path) -> Data:
    """The first `per_class_*` images of each class, decoded once and cached as uint8 arrays."""
    if cache.exists():
        data = read_cache(cache)
        if len(data.train_labels) == 10 * per_class_train and len(data.test_labels) == 10 * per_class_test:
            return data

    def read(split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        folder = ImageFolder(root / split, on_bad="error")
        targets = torch.as_tensor(folder.targets)
        chosen = [torch.nonzero(targets == c).flatten()[:per_class] for c in range(10)]
        if any(len(c) < per_class for c in chosen):
            raise SystemExit(f"{root / split}: fewer than {per_class} images in a class")
        images, labels = [], []
        loader = DataLoader(Subset(folder, torch.cat(chosen).tolist()), batch_size=500, num_workers=2)
        for batch_images, batch_labels in tqdm(loader, desc=f"decoding {split}", leave=False):
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.cat(images), torch.cat(labels)

    data = Data(*read("train", per_class_train), *read("test", per_class_test))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            arrays = (data.train_images, data.train_labels, data.test_images, data.test_labels)
            np.savez(
                handle, **{k: a.numpy() for k, a in zip(("xtr", "ytr", "xte", "yte"), arrays, strict=True)}
            )

    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, write)
    return data


def read_cache(cache: Path) -> Data:
    with np.load(cache, allow_pickle=False) as arrays:
        return Data(*(torch.from_numpy(arrays[k]) for k in ("xtr", "ytr", "xte", "yte")))


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
    """The same batches for every run of one seed."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(num_steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data.train_labels), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        yield augment(data.train_images[index], generator), data.train_labels[index]


def config(stem: str = "patch", parallel: int = 1, img_size: int = 32) -> ViTConfig:
    return ViTConfig(
        img_size=img_size, patch_size=4, stem=stem, embed_dim=WIDTH, depth=DEPTH // parallel, num_heads=HEADS,
        mlp_dim=MLP, parallel=parallel, num_classes=10,
    )  # fmt: skip


def optimizer_for(params_source, cfg: OptimConfig, extra: list | None = None) -> torch.optim.Optimizer:
    groups = param_groups(params_source, cfg.weight_decay) + (extra or [])
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train_steps(model, step_loss, optimizer, cfg: OptimConfig, data: Data, steps: int, batch: int, seed: int):
    """`steps` steps of warmup (10%) + cosine on the seed's batches; returns the seconds spent."""
    model.train()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = max(1, steps // 10)
    started = time.perf_counter()
    for step, (images, labels) in enumerate(batches(data, batch, steps, seed)):
        set_lr(optimizer, learning_rate(cfg, step, steps, warmup))
        loss = step_loss(images, labels, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def supervised(
    model: VisionTransformer, data: Data, steps: int, settings: Settings, cfg: OptimConfig, seed: int
) -> float:
    size = model.config.img_size[0]
    optimizer = optimizer_for(model, cfg)

    def loss(images, labels, step):
        with settings.autocast():
            return F.cross_entropy(model(to_model_input(images, size)), labels)

    return train_steps(model, loss, optimizer, cfg, data, steps, settings.batch_size, seed)


def masked_pretrain(
    encoder: VisionTransformer, data: Data, steps: int, settings: Settings, seed: int
) -> float:
    model = MaskedPatchModel(encoder, MaskedConfig())
    extra = [
        {"params": [model.mask_token], "weight_decay": 0.0},
        {"params": list(model.head.parameters()), "weight_decay": 0.0},
    ]
    optimizer = optimizer_for(encoder, SCRATCH, extra)
    size = encoder.config.img_size[0]

    def loss(images, labels, step):
        with settings.autocast():
            generator = torch.Generator().manual_seed(seed * 100_003 + step)
            return model(to_model_input(images, size), generator)[0]

    return train_steps(model, loss, optimizer, SCRATCH, data, steps, settings.batch_size, seed + 7919)


@torch.no_grad()
def accuracy(model: VisionTransformer, data: Data, settings: Settings) -> float:
    model.eval()
    size, correct = model.config.img_size[0], 0
    for start in range(0, len(data.test_labels), 250):
        images = to_model_input(data.test_images[start : start + 250], size)
        with settings.autocast():
            logits = model(images)
        correct += (logits.argmax(-1) == data.test_labels[start : start + 250]).sum().item()
    return correct / len(data.test_labels)


@torch.no_grad()
def fewshot10(model: VisionTransformer, data: Data) -> float:
    """10-shot ridge accuracy of the frozen pre-logits features (3 draws)."""
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

    pool = torch.cat([torch.nonzero(data.train_labels == c).flatten()[:100] for c in range(10)])
    metrics = fewshot_accuracies(
        features(data.train_images[pool]), data.train_labels[pool], features(data.test_images),
        data.test_labels, FewShotConfig(shots=(10,), num_seeds=3),
    )  # fmt: skip
    return metrics["10shot"]


# The runs. Each is a function of (run, seed) in a worker; phase 2 starts from phase 1's models.
BASE_RUNS = {
    "scratch, linear stem": dict(stem="patch"),
    "scratch, hMLP stem": dict(stem="hmlp"),
    "scratch, conv stem (hybrid)": dict(stem="conv"),
    "scratch, parallel 3x2 blocks": dict(stem="patch", parallel=2),
    "masked-patch pre-trained, linear stem": dict(stem="patch", pretrain=True),
    "masked-patch pre-trained, hMLP stem": dict(stem="hmlp", pretrain=True),
}
FINETUNE_RUNS = {
    "fine-tune 48 px, full": dict(rule="none", interpolate=True),
    "fine-tune 48 px, attention-only": dict(rule="attention-only", interpolate=True),
    "fine-tune 48 px, full, positions re-initialised": dict(rule="none", interpolate=False),
    "fine-tune 48 px, LoRA rank 8": dict(rule="lora", interpolate=True),
    "fine-tune 48 px, head-only": dict(rule="head-only", interpolate=True),
}
FINETUNE_FROM = "scratch, linear stem"

_DATA: Data | None = None


def init_worker(settings: Settings) -> None:
    global _DATA
    torch.set_num_threads(settings.threads)
    _DATA = read_cache(Path(settings.cache))


def run_base(task: tuple[str, int, Settings]) -> tuple[str, int, dict, dict | None]:
    name, seed, settings = task
    spec, data = BASE_RUNS[name], _DATA
    steps = data.steps(settings.epochs, settings.batch_size)
    torch.manual_seed(seed)
    model = apply_fast_paths(VisionTransformer(config(spec["stem"], spec.get("parallel", 1))), "cpu")
    row: dict = {"params": model.num_params(), "steps": steps}
    seconds = 0.0
    if spec.get("pretrain"):
        pretrain_steps = data.steps(settings.pretrain_epochs, settings.batch_size)
        seconds += masked_pretrain(model, data, pretrain_steps, settings, seed)
        row.update(pretrain_steps=pretrain_steps, fewshot10_encoder=fewshot10(model, data))
    seconds += supervised(model, data, steps, settings, SCRATCH, seed)
    row.update(top1=accuracy(model, data, settings), time_s=seconds)
    state = model.state_dict() if name == FINETUNE_FROM else None
    return name, seed, row, state


def run_finetune(task: tuple[str, int, Settings, dict]) -> tuple[str, int, dict, None]:
    name, seed, settings, state = task
    spec, data = FINETUNE_RUNS[name], _DATA
    base = VisionTransformer(config())
    base.load_state_dict(state)
    torch.manual_seed(seed)
    model = apply_fast_paths(finetune_model(base, num_classes=10, img_size=FINETUNE_SIZE), "cpu")
    if not spec["interpolate"]:
        with torch.no_grad():
            model.pos_embed.normal_(std=0.02)
    trainable = apply_freeze_rule(model, spec["rule"])
    steps = data.steps(settings.finetune_epochs, settings.batch_size)
    seconds = supervised(model, data, steps, settings, FINETUNE, seed)
    row = {
        "top1": accuracy(model, data, settings),
        "time_s": seconds,
        "trainable": trainable,
        "params": model.num_params(),
        "steps": steps,
    }
    return name, seed, row, None


def run_all(function, tasks: list, settings: Settings, jobs: int, bar: tqdm):
    """Run tasks in `jobs` worker processes (in this one, on the data main loaded, when jobs is 1)."""
    if jobs == 1:
        for task in tasks:
            yield function(task)
            bar.update()
        return
    with multiprocessing.get_context("spawn").Pool(jobs, init_worker, (settings,)) as pool:
        for result in pool.imap_unordered(function, tasks):
            yield result
            bar.update()


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


# Claims: (claim, baseline row, compared row, "better" or "no loss").
CLAIMS = [
    ("masked-patch pre-training beats scratch, linear stem (ViT 4.6)",
     "scratch, linear stem", "masked-patch pre-trained, linear stem", "better"),
    ("masked-patch pre-training beats scratch, hMLP stem",
     "scratch, hMLP stem", "masked-patch pre-trained, hMLP stem", "better"),
    ("after masked-patch pre-training the hMLP stem beats the linear stem (Three things #3)",
     "masked-patch pre-trained, linear stem", "masked-patch pre-trained, hMLP stem", "better"),
    ("attention-only fine-tuning at a higher resolution matches full fine-tuning (Three things #2)",
     "fine-tune 48 px, full", "fine-tune 48 px, attention-only", "no loss"),
    ("parallel blocks match sequential ones at equal parameters (Three things #1)",
     "scratch, linear stem", "scratch, parallel 3x2 blocks", "no loss"),
    ("2D-interpolated position embeddings beat re-initialised ones (ViT 3.2)",
     "fine-tune 48 px, full, positions re-initialised", "fine-tune 48 px, full", "better"),
    ("a hybrid (conv stem) beats the pure ViT on small data (ViT 4.2)",
     "scratch, linear stem", "scratch, conv stem (hybrid)", "better"),
    ("LoRA (rank 8) fine-tuning at a higher resolution matches full fine-tuning (Hu et al.)",
     "fine-tune 48 px, full", "fine-tune 48 px, LoRA rank 8", "no loss"),
]  # fmt: skip


def paired_difference(baseline: dict[int, float], compared: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard error of compared - baseline over the seeds both have (se is nan for one)."""
    seeds = sorted(set(baseline) & set(compared))
    diffs = np.array([compared[s] - baseline[s] for s in seeds])
    se = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return float(diffs.mean()), float(se), len(diffs)


def verdict(mean: float, se: float, kind: str) -> str:
    """Whether a claim holds: its paired difference against twice the difference's standard error."""
    if math.isnan(se):
        return "one seed: no spread"
    if kind == "better":
        if mean > 2 * se:
            return "holds"
        return (
            "does not hold: the opposite, beyond noise" if mean < -2 * se else "does not hold: within noise"
        )
    if kind == "no loss":
        return "does not hold: a loss beyond noise" if mean < -2 * se else "holds"
    raise ValueError(f"unknown claim kind {kind!r}")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def format_tables(rows: dict[str, dict], seeds: list[int], header: str) -> str:
    lines = [
        header,
        "",
        "| run | top-1 (%) | 10-shot of encoder (%) | trainable / params | memory (MiB) | step (ms) "
        "| latency b1 / b64 (ms) | train s per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        per_seed = row["per_seed"]
        fewshot = [r["fewshot10_encoder"] for r in per_seed.values() if "fewshot10_encoder" in r]
        first = next(iter(per_seed.values()))
        params = (
            f"{first['trainable']:,} / {first['params']:,}"
            if "trainable" in first
            else f"{first['params']:,}"
        )
        latency = (
            f"{row['latency_b1_ms']:.1f} / {row['latency_b64_ms']:.0f}" if "latency_b1_ms" in row else ""
        )
        memory = f"{row['memory_mib']:.0f}" if "memory_mib" in row else ""
        step = f"{row['step_ms']:.0f}" if "step_ms" in row else ""
        seconds = np.mean([r["time_s"] for r in per_seed.values()])
        lines.append(
            f"| {name} | {mean_std([r['top1'] for r in per_seed.values()])} "
            f"| {mean_std(fewshot) if fewshot else ''} | {params} | {memory} | {step} | {latency} | {seconds:.0f} |"
        )
    lines += [
        "",
        f"Each claim: the paired difference over {len(seeds)} seeds (compared - baseline, top-1 points, "
        "mean ± standard error) against twice its standard error.",
        "",
        "| claim | baseline -> compared | difference | verdict |",
        "|---|---|---:|---|",
    ]
    for claim, baseline, compared, kind in CLAIMS:
        if baseline not in rows or compared not in rows:
            continue
        top1 = {
            name: {s: r["top1"] for s, r in rows[name]["per_seed"].items()} for name in (baseline, compared)
        }
        mean, se, _ = paired_difference(top1[baseline], top1[compared])
        spread = "" if math.isnan(se) else f" ± {100 * se:.1f}"
        lines.append(
            f"| {claim} | {baseline} -> {compared} | {100 * mean:+.1f}{spread} | {verdict(mean, se, kind)} |"
        )
    return "\n".join(lines)


def measure_costs(rows: dict[str, dict], quick: bool, batch_size: int) -> None:
    """Memory and step time of the fine-tuning rules; latency of the sequential and parallel models."""
    repeats = 3 if quick else 20
    for name, spec in FINETUNE_RUNS.items():
        if name in rows and spec["interpolate"]:
            cost = measure_freezing(
                config(img_size=FINETUNE_SIZE), spec["rule"], batch_size=batch_size, num_steps=3
            )
            rows[name].update(memory_mib=cost.memory_bytes / 2**20, step_ms=1000 * cost.step_seconds)
    for name in ("scratch, linear stem", "scratch, parallel 3x2 blocks"):
        if name not in rows:
            continue
        model = apply_fast_paths(
            VisionTransformer(config(parallel=BASE_RUNS[name].get("parallel", 1))), "cpu"
        )
        rows[name].update(
            latency_b1_ms=latency_ms(model, 1, repeats * 4), latency_b64_ms=latency_ms(model, 64, repeats)
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    parser.add_argument("--train-per-class", type=int, help="default 5000: all (--quick: 20)")
    parser.add_argument("--test-per-class", type=int, help="default 1000: all (--quick: 10)")
    parser.add_argument(
        "--epochs", type=float, help="of each supervised training run: default 1 (--quick: 1)"
    )
    parser.add_argument(
        "--finetune-epochs", type=float, help="of each 48 px fine-tuning run: default 0.2 (--quick: 1)"
    )
    parser.add_argument(
        "--pretrain-epochs", type=float, help="of each masked-patch pre-training run: default --epochs"
    )
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"),
        help="of training and scoring; auto: bf16 where this machine measured it faster (default auto; --quick: fp32)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, help="default 3 (--quick: 2)")
    parser.add_argument("--batch-size", type=int, help="default 64 (--quick: 32)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--quick", action="store_true", help="a small check that it all works")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument(
        "--runs", nargs="+", metavar="RUN", help="only these rows (names as in the table); default every row"
    )
    args = parser.parse_args()
    defaults = QUICK if args.quick else FULL
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in ("train_per_class", "test_per_class", "seeds", "batch_size", "jobs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.pretrain_epochs is None:
        args.pretrain_epochs = args.epochs
    if min(args.epochs, args.finetune_epochs, args.pretrain_epochs) <= 0:
        parser.error("--epochs, --pretrain-epochs and --finetune-epochs must be positive")
    if args.train_per_class < 10:
        parser.error(f"--train-per-class must be at least 10 (the 10-shot draws), got {args.train_per_class}")
    chosen = args.runs or [*BASE_RUNS, *FINETUNE_RUNS]
    unknown = [name for name in chosen if name not in {**BASE_RUNS, **FINETUNE_RUNS}]
    if unknown:
        parser.error(
            f"--runs: no row {unknown[0]!r}; rows: {', '.join(map(repr, [*BASE_RUNS, *FINETUNE_RUNS]))}"
        )
    base_runs = [name for name in BASE_RUNS if name in chosen]
    finetune_runs = [name for name in FINETUNE_RUNS if name in chosen]
    if finetune_runs and FINETUNE_FROM not in base_runs:
        parser.error(f"--runs: the fine-tuning rows start from {FINETUNE_FROM!r}: name it too")
    for split in ("train", "test"):
        if not (Path(args.data) / split).is_dir():
            parser.error(
                f"{Path(args.data) / split}: no such folder (--data is CIFAR-10 in ImageFolder layout)"
            )
    torch.set_num_threads(args.threads)
    # A terminated run unwinds, so that its worker processes end with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"# {machine_summary()}", file=sys.stderr)
    out = Path(args.out)
    cache = out / f"cifar10_{args.train_per_class}_{args.test_per_class}.npz"
    global _DATA
    data = _DATA = load_cifar(Path(args.data), args.train_per_class, args.test_per_class, cache)
    precision, why = choose_precision(args.precision, torch.device("cpu"))
    settings = Settings(
        str(cache), args.epochs, args.finetune_epochs, args.batch_size, args.threads, args.pretrain_epochs,
        precision,
    )  # fmt: skip
    seeds = list(range(args.seeds))
    steps = data.steps(args.epochs, args.batch_size)
    header = (
        f"CIFAR-10, {len(data.train_labels):,} training and {len(data.test_labels):,} test images; "
        f"{args.epochs:g} epoch{'' if args.epochs == 1 else 's'} ({steps} steps of {args.batch_size}) per training run, "
        f"{args.pretrain_epochs:g} per pre-training run, {args.finetune_epochs:g} per fine-tuning run; "
        f"{precision} ({why}); {len(seeds)} seeds; {args.jobs} runs at a time, {args.threads} thread(s) each."
    )
    print(header, file=sys.stderr)

    rows: dict[str, dict] = {name: {"per_seed": {}} for name in [*base_runs, *finetune_runs]}
    started = time.perf_counter()
    with tqdm(total=len(seeds) * len(rows), desc="runs", unit="run") as bar:
        # Pre-trained runs cost twice as much: first, so that the workers finish together.
        tasks = [(name, seed, settings) for name in reversed(base_runs) for seed in seeds]
        bases = {}
        for name, seed, row, state in run_all(run_base, tasks, settings, args.jobs, bar):
            rows[name]["per_seed"][seed] = row
            if state is not None:
                bases[seed] = state
        tasks = [(name, seed, settings, bases[seed]) for name in finetune_runs for seed in seeds]
        for name, seed, row, _ in run_all(run_finetune, tasks, settings, args.jobs, bar):
            rows[name]["per_seed"][seed] = row
    wall = time.perf_counter() - started
    measure_costs(rows, args.quick, 8 if args.quick else args.batch_size)

    table = format_tables(rows, seeds, header + f" {wall / 60:.0f} minutes in all.")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    record = {"settings": asdict(settings), "seeds": seeds, "wall_s": wall, "rows": rows}
    atomic_write(out / "rows.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
