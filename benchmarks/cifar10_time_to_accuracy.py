"""CIFAR-10 test top-1 against training wall time on this machine, with the curve as a PNG.

    python benchmarks/cifar10_time_to_accuracy.py                          # the hybrid recipe (configs/cifar10_vit.py), 30 minutes
    python benchmarks/cifar10_time_to_accuracy.py --config cifar10_vit_patch --out runs/bench_cifar10_patch
    python benchmarks/cifar10_time_to_accuracy.py --budget-minutes 5 10 30 # a sweep: one annealed run per budget
    python benchmarks/cifar10_time_to_accuracy.py --quick                  # a 2-minute check that it all works
    python benchmarks/cifar10_time_to_accuracy.py --loader-only            # data images/s: cache vs JPEG per image

Wall time counts training steps only (data loading included; evaluation, checkpoints and the one-time
decoding of the image cache excluded). A budget is the run's `train.time_budget_minutes`: the lr
schedule anneals within it and training stops when it is spent, so each budget of a sweep is its own
run, and the sweep's figure is the recipe's time-to-accuracy curve (best top-1 against budget) beside
each run's top-1 after every epoch. Prints the time to reach each threshold (50/70/80/85/90% and
`--target`, by default the config's: 90% for the hybrid, 80% for the pure ViT), the training
images/s, the CPU and the precision the run chose, and the machine's load average before and after
(the result depends on how much of the CPU the run had).
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
from vitkit.data.loader import open_dataset
from vitkit.io import atomic_write
from vitkit.train import load_experiment, train
from vitkit.train.metrics import read_metrics
from vitkit.train.precision import machine_summary

THRESHOLDS = (0.5, 0.7, 0.8, 0.85, 0.9)
# Each recipe's top-1 to reach in 30 minutes; `--target` overrides it (other configs: 90%).
TARGETS = {"cifar10_vit": 0.9, "cifar10_vit_patch": 0.8}


def main() -> None:
    args = parse_args()
    print(f"# {machine_summary()}")
    if args.loader_only:
        compare_loaders(load_experiment(args.config, args.overrides).data)
        return
    out = Path(args.out)
    runs = []
    for budget in args.budget_minutes:
        folder = out if len(args.budget_minutes) == 1 else out / f"budget_{budget:g}min"
        runs.append(run_one(args, budget, folder))
    if len(runs) > 1:
        print_sweep(runs, args.target)
    figure_path = plot(runs, out / "time_to_accuracy.png", args.target)
    results = out / "time_to_accuracy.json"
    atomic_write(
        results,
        lambda tmp: Path(tmp).write_text(
            json.dumps(
                {"config": args.config, "overrides": args.overrides, "target": args.target, "runs": runs},
                indent=1,
            )
        ),
    )
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure_path, args.figure)
        print(f"copied the curve to {args.figure}")
    print(f"wrote {figure_path}\nwrote {results}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="cifar10_vit")
    parser.add_argument("--out", default="runs/bench_cifar10")
    parser.add_argument(
        "--budget-minutes", type=float, nargs="+", default=[30.0], help="one or more budgets (a sweep)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="top-1 to reach within the budget (default: the config's, see TARGETS)",
    )
    parser.add_argument("--quick", action="store_true", help="60 steps, evaluated on 2%% of train held out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--figure", type=Path, help="also copy the curve PNG here")
    parser.add_argument(
        "--loader-only", action="store_true", help="time the train loader against per-image JPEG decoding"
    )
    args = parser.parse_args(argv)
    if any(budget <= 0 for budget in args.budget_minutes):
        parser.error(f"--budget-minutes must be > 0, got {args.budget_minutes}")
    if args.target is None:
        args.target = TARGETS.get(args.config, 0.9)
    elif not 0 < args.target <= 1:
        parser.error(f"--target is a top-1 in (0, 1], got {args.target}")
    return args


def run_one(args: argparse.Namespace, budget: float, out: Path) -> dict:
    """Train the config within `budget` minutes into `out`; print and return its curve."""
    overrides = [f"train.out_dir={out}", "train.resume=never", f"train.time_budget_minutes={budget}"]
    if args.quick:
        overrides += ["train.max_steps=60", "data.val_fraction=0.02", "eval.split=val", "train.epochs=1"]
    experiment = load_experiment(args.config, overrides + args.overrides)
    load_before = os.getloadavg()
    started = time.perf_counter()
    summary = train(experiment)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    evals = [row for row in read_metrics(out / "metrics.jsonl") if row["kind"] == "eval"]
    batch = experiment.data.batch_size
    images_per_s = summary["steps"] * batch / summary["train_time_s"]
    threads = experiment.train.num_threads or torch.get_num_threads()
    epochs = summary["steps"] * batch / len(open_dataset(experiment.data, "train"))
    print(
        f"\n{args.config}, {budget:g}-minute budget: {summary['steps']} steps ({summary['steps'] * batch:,} "
        f"images, {epochs:.1f} epochs) in "
        f"{summary['train_time_s'] / 60:.1f} training minutes ({images_per_s:.0f} images/s, {threads} threads, "
        f"{summary['precision']}), {wall / 60:.1f} min in all; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    print("| epoch | train minutes | top-1 |\n|---:|---:|---:|")
    for row in evals:
        print(f"| {row['epoch'] + 1} | {row['train_time_s'] / 60:.1f} | {row['top1']:.2%} |")
    for threshold in sorted({*THRESHOLDS, args.target}):
        print(f"time to {threshold:.0%}: {time_to(evals, threshold)}")
    best = max((row["top1"] for row in evals), default=0.0)
    reached = next((row for row in evals if row["top1"] >= args.target), None)
    if reached:
        ratio = reached["train_time_s"] / 60 / budget
        print(f"target {args.target:.0%}: reached at {ratio:.2f} x the {budget:g}-minute budget")
    else:
        print(
            f"target {args.target:.0%}: not reached; best {best:.2%} ({best / args.target:.2f} x the target)"
        )
    return {
        "budget_minutes": budget,
        "images_per_s": images_per_s,
        "precision": summary["precision"],
        "epochs": epochs,
        "best_top1": best,
        "load_average": [load_before[0], load_after[0]],
        "curve": [{"train_minutes": row["train_time_s"] / 60, "top1": row["top1"]} for row in evals],
    }


def time_to(evals: list[dict], threshold: float) -> str:
    reached = next((row for row in evals if row["top1"] >= threshold), None)
    return f"{reached['train_time_s'] / 60:.1f} min" if reached else "not reached"


def print_sweep(runs: list[dict], target: float) -> None:
    print(
        "\n| budget (min) | best top-1 | images/s | " + " | ".join(f"to {t:.0%}" for t in THRESHOLDS) + " |"
    )
    print("|---:|---:|---:|" + "---:|" * len(THRESHOLDS))
    for run in runs:
        evals = [{"train_time_s": p["train_minutes"] * 60, "top1": p["top1"]} for p in run["curve"]]
        cells = " | ".join(time_to(evals, t) for t in THRESHOLDS)
        print(f"| {run['budget_minutes']:g} | {run['best_top1']:.2%} | {run['images_per_s']:.0f} | {cells} |")


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


def plot(runs: list[dict], path: Path, target: float) -> Path:
    """Each run's top-1 after every epoch against training minutes; with several budgets, the best
    top-1 of each budget joined as the sweep's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for run in runs:
        axes.plot(
            [p["train_minutes"] for p in run["curve"]],
            [p["top1"] for p in run["curve"]],
            marker="o",
            markersize=3,
            alpha=0.8 if len(runs) > 1 else 1.0,
            label=f"{run['budget_minutes']:g}-minute run",
        )
    if len(runs) > 1:
        axes.plot(
            [run["budget_minutes"] for run in runs],
            [run["best_top1"] for run in runs],
            color="black",
            marker="s",
            label="best top-1 per budget",
        )
    axes.axhline(target, color="grey", linestyle="--", label=f"target {target:.0%}")
    axes.set_xlabel("training wall time (minutes)")
    axes.set_ylabel("CIFAR-10 test top-1")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
