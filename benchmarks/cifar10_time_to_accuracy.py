"""CIFAR-10 test top-1 against training wall time on this machine, with the curve as a PNG.

    python benchmarks/cifar10_time_to_accuracy.py                       # the full recipe (configs/cifar10_vit.py)
    python benchmarks/cifar10_time_to_accuracy.py --quick               # a 2-minute check that it all works
    python benchmarks/cifar10_time_to_accuracy.py --budget-minutes 5    # the same recipe annealed in 5 minutes
    python benchmarks/cifar10_time_to_accuracy.py --loader-only         # data images/s: cache vs JPEG per image

Wall time counts training steps only (data loading included; evaluation, checkpoints and the one-time
decoding of the image cache excluded). The budget is the run's `train.time_budget_minutes`: the lr
schedule anneals within it and training stops when it is spent. Prints the top-1 after each epoch, the
time to reach each threshold, the ratio of the time to the target accuracy over the budget (< 1: the
target was met in time), the training images/s, and the machine's load average before and after (the
result depends on how much of the CPU the run had).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import torch

from vitkit.data import DataConfig, build_loader
from vitkit.io import atomic_write
from vitkit.train import load_experiment, train
from vitkit.train.metrics import read_metrics
from vitkit.train.precision import machine_summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cifar10_vit")
    parser.add_argument("--out", default="runs/bench_cifar10")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--target", type=float, default=0.85, help="top-1 to reach within the budget")
    parser.add_argument("--quick", action="store_true", help="60 steps, evaluated on 2%% of train held out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--figure", type=Path, help="also copy the curve PNG here")
    parser.add_argument(
        "--loader-only", action="store_true", help="time the train loader against per-image JPEG decoding"
    )
    args = parser.parse_args()
    print(f"# {machine_summary()}")
    if args.loader_only:
        compare_loaders(load_experiment(args.config, args.overrides).data)
        return

    overrides = [
        f"train.out_dir={args.out}",
        "train.resume=never",
        f"train.time_budget_minutes={args.budget_minutes}",
    ]
    if args.quick:
        overrides += ["train.max_steps=60", "data.val_fraction=0.02", "eval.split=val", "train.epochs=1"]
    experiment = load_experiment(args.config, overrides + args.overrides)
    load_before = os.getloadavg()
    started = time.perf_counter()
    summary = train(experiment)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()

    rows = read_metrics(Path(args.out) / "metrics.jsonl")
    evals = [row for row in rows if row["kind"] == "eval"]
    images_per_s = summary["steps"] * experiment.data.batch_size / summary["train_time_s"]
    print(
        f"\n{args.config}: {summary['steps']} steps ({summary['steps'] * experiment.data.batch_size:,} images) "
        f"in {summary['train_time_s'] / 60:.1f} training minutes ({images_per_s:.0f} images/s, "
        f"{experiment.train.num_threads or torch.get_num_threads()} threads), {wall / 60:.1f} min in all; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    print("| epoch | train minutes | top-1 |\n|---:|---:|---:|")
    for row in evals:
        print(f"| {row['epoch'] + 1} | {row['train_time_s'] / 60:.1f} | {row['top1']:.2%} |")
    for threshold in (0.5, 0.6, 0.7, 0.75, 0.8, args.target):
        reached = next((row for row in evals if row["top1"] >= threshold), None)
        when = f"{reached['train_time_s'] / 60:.1f} min" if reached else "not reached"
        print(f"time to {threshold:.0%}: {when}")
    reached = next((row for row in evals if row["top1"] >= args.target), None)
    if reached:
        ratio = reached["train_time_s"] / 60 / args.budget_minutes
        print(
            f"target {args.target:.0%}: reached at {ratio:.2f} x the {args.budget_minutes:.0f}-minute budget"
        )
    else:
        best = max((row["top1"] for row in evals), default=0.0)
        print(
            f"target {args.target:.0%}: not reached; best {best:.2%} ({best / args.target:.2f} x the target)"
        )
    figure_path = plot(evals, Path(args.out) / "time_to_accuracy.png", args.target, args.budget_minutes)
    results = Path(args.out) / "time_to_accuracy.json"
    curve = [{"train_minutes": row["train_time_s"] / 60, "top1": row["top1"]} for row in evals]
    atomic_write(
        results,
        lambda tmp: Path(tmp).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "overrides": args.overrides,
                    "images_per_s": images_per_s,
                    "load_average": [load_before[0], load_after[0]],
                    "curve": curve,
                },
                indent=1,
            )
        ),
    )
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure_path, args.figure)
        print(f"copied the curve to {args.figure}")
    print(f"wrote {figure_path}\nwrote {results}")


def compare_loaders(data: DataConfig, num_batches: int = 20) -> None:
    """Images/s of the config's train loader against the baseline that decodes and augments each JPEG
    (random-resized crop and flip, no cache), in this one run."""
    baseline = data.replace(cache=False, batch_augment=False, train_crop="inception", scale=(0.35, 1.0))
    speeds = {}
    for name, cfg in (("per-image JPEG (baseline)", baseline), ("config", data)):
        loader = build_loader(cfg, "train")  # the cache is decoded (or loaded) here, outside the timing
        started = time.perf_counter()
        for _ in itertools.islice(loader, num_batches):
            pass
        speeds[name] = num_batches * cfg.batch_size / (time.perf_counter() - started)
    base = speeds["per-image JPEG (baseline)"]
    for name, speed in speeds.items():
        print(f"{name:>26}: {speed:8.0f} images/s  ({speed / base:.1f}x)")
    print(f"load average {os.getloadavg()[0]:.1f}")


def plot(evals: list[dict], path: Path, target: float, budget_minutes: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(
        [row["train_time_s"] / 60 for row in evals],
        [row["top1"] for row in evals],
        marker="o",
        label="test top-1",
    )
    axes.axhline(target, color="grey", linestyle="--", label=f"target {target:.0%}")
    axes.axvline(budget_minutes, color="grey", linestyle=":", label=f"{budget_minutes:.0f}-minute budget")
    axes.set_xlabel("training wall time (minutes)")
    axes.set_ylabel("top-1")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
