"""Transfer of a pre-trained checkpoint: few-shot and linear-probe accuracy through vitkit's own
pipeline, each recomputed independently on the same features, then full vs attention-only
fine-tuning with the recipe's batch-scaled lr.

    .venv/bin/python benchmarks/transfer.py CHECKPOINT --dataset digits
    .venv/bin/python benchmarks/transfer.py CHECKPOINT --root ../shared/data/cifar10 --max-test 2000

The features are those `vitkit fewshot` uses (the checkpoint's own preprocessing). Independent
recomputations on them:
- k-shot: scikit-learn's `Ridge` (its own solver) on the same design matrix (whitened features and
  a constant 100 column) and the same {-1, 1} targets and regulariser as vitkit's closed form;
- linear probe: a multinomial logistic regression with the probe's chosen C minimised by torch's
  L-BFGS in float64 (the same convex objective as scikit-learn's, another optimiser).
Then fine-tuning, each run a `vitkit finetune` subprocess: the default recipe (nothing but the
checkpoint and the data given; `vitkit.train.finetune_recipe`) against full and attention-only
fine-tuning with the ViT paper's SGD recipe (`finetune_cifar10`) at each lr of `--lrs` as applied, at
the default's batch, epochs and resolution; the table gives each one's test top-1 against the probe.

    .venv/bin/python benchmarks/transfer.py CHECKPOINT --dataset digits --shots 5
    .venv/bin/python benchmarks/transfer.py CHECKPOINT --root FOLDER --img-size 48 --shots 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vitkit
from vitkit.data import DataConfig, data_root, resolve_preprocessing
from vitkit.data.loader import open_dataset
from vitkit.data.model_transform import transform_of
from vitkit.eval.classification import resolve_checkpoint
from vitkit.eval.fewshot import (
    BIAS_CONSTANT,
    FewShotConfig,
    Transformed,
    evenly_spaced,
    extract_features,
    fewshot_accuracies,
    linear_probe,
    sample_shots,
)
from vitkit.fast import apply_fast_paths
from vitkit.train.precision import machine_summary


def ridge_by_sklearn(train_x, train_y, test_x, test_y, num_classes: int, l2_reg: float) -> float:
    from sklearn.linear_model import Ridge

    x = train_x.double().numpy()
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5

    def design(features: torch.Tensor) -> np.ndarray:
        z = (features.double().numpy() - mean) / std
        return np.concatenate([z, np.full((len(z), 1), BIAS_CONSTANT)], axis=1)

    targets = 2.0 * np.eye(num_classes)[train_y.numpy()] - 1.0
    model = Ridge(alpha=l2_reg, fit_intercept=False, solver="svd").fit(design(train_x), targets)
    return float((model.predict(design(test_x)).argmax(1) == test_y.numpy()).mean())


def probe_by_lbfgs(train_x, train_y, test_x, test_y, c: float) -> float:
    x = train_x.double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z, z_test = (x - mean) / std, (test_x.double() - mean) / std
    num_classes = int(train_y.max()) + 1
    weight = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=2000, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, train_y, reduction="sum")
        loss = loss + 0.5 / c * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((z_test @ weight + bias).argmax(1) == test_y).double().mean())


def finetune(checkpoint: str, args, out: Path, *options: str) -> dict:
    """One `vitkit finetune` subprocess on the benchmark's data; its final test top-1 (None when it
    stopped on a non-finite loss: diverged), resolved lr, batch, epochs and steps."""
    # Digits are not mirror-symmetric: no flips, for every recipe alike.
    data = (
        ["--set", "data.dataset=digits", "--set", "data.hflip=0.0"]
        if args.dataset == "digits"
        else ["--root", args.root]
    )
    size = ["--img-size", str(args.img_size)] if args.img_size else []
    command = [
        sys.executable, "-m", "vitkit", "finetune", checkpoint, *data, *size, *options,
        "--set", f"train.out_dir={out}", "--set", "data.num_workers=0", "--set", f"train.max_steps={args.max_steps}",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "results.json").read_text()) if result.returncode == 0 else {}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "top1": results.get("top1"),
        "lr": config["optim"]["lr"],
        "batch": config["data"]["batch_size"],
        "epochs": config["train"]["epochs"],
        "steps": max((row.get("step", 0) for row in steps), default=0),
        "config": config,
        "seconds": time.perf_counter() - start,
    }


def compare_finetuning(checkpoint: str, args, probe: float, folder: Path) -> list[str]:
    """The default recipe (nothing set) against full and attention-only fine-tuning with the ViT
    paper's recipe (SGD, `finetune_cifar10`) at each lr of `--lrs` as applied, at the default's batch,
    epochs, resolution and augmentation, so that only the recipe differs; the best lr of each is
    chosen on the test split (in the baselines' favour)."""
    default = finetune(checkpoint, args, folder / "default")
    data = default["config"]["data"]
    same = [
        "--set", f"data.batch_size={default['batch']}", "--set", f"train.epochs={default['epochs']}",
        "--set", f"data.scale=[{data['scale'][0]},{data['scale'][1]}]", "--set", f"data.hflip={data['hflip']}",
        "--set", f"eval.every={default['epochs']}", "--img-size", str(data["img_size"]),
    ]  # fmt: skip

    def percent(top1) -> str:
        return "diverged" if top1 is None else f"{100 * top1:.2f}"

    rows = [
        "| fine-tuning | lr as applied | batch | epochs | steps | test top-1 (%) | vs probe | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, result: dict) -> str:
        gain = "" if result["top1"] is None else f"{100 * (result['top1'] - probe):+.2f}"
        return (
            f"| {name} | {result['lr']:.3g} | {result['batch']} | {result['epochs']} | {result['steps']} | "
            f"{percent(result['top1'])} | {gain} | {result['seconds']:.0f} |"
        )

    rows.append(row("default recipe (nothing set)", default))
    for freeze in ("none", "attention-only"):
        grid = {
            lr: finetune(
                checkpoint,
                args,
                folder / f"{freeze}-{lr:g}",
                "--config",
                "finetune_cifar10",
                "--freeze",
                freeze,
                "--set",
                f"optim.lr={lr}",
                *same,
            )  # fmt: skip
            for lr in args.lrs
        }
        tried = ", ".join(f"{lr:g}: {percent(result['top1'])}" for lr, result in grid.items())
        best = max(grid.values(), key=lambda result: -1 if result["top1"] is None else result["top1"])
        name = "full" if freeze == "none" else freeze
        rows.append(row(f"{name}, SGD, best of lr {{{tried}}}", best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", default="imagefolder", choices=("digits", "imagefolder"))
    parser.add_argument("--root", default=str(data_root() / "cifar10"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-test", type=int, default=0, help="every k-th test image, at most N (0: all)")
    parser.add_argument(
        "--img-size", type=int, default=0, help="fine-tuning resolution (0: the default recipe's)"
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03], help="the SGD baselines' lrs, as applied"
    )
    parser.add_argument(
        "--max-steps", type=int, default=0, help="stop fine-tuning after N steps (0: the epochs)"
    )
    parser.add_argument("--no-finetune", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {machine_summary()}")
    checkpoint = str(resolve_checkpoint(args.checkpoint))
    model = apply_fast_paths(vitkit.load(checkpoint).eval(), "cpu", "fp32")
    preprocessing = resolve_preprocessing(model)
    print(f"checkpoint {checkpoint}: {model.config.embed_dim} wide, {model.config.depth} deep")
    print(f"preprocessing: {preprocessing.describe()}")
    data = DataConfig(dataset=args.dataset, root=args.root if args.dataset == "imagefolder" else "")
    transform = transform_of(preprocessing)
    train_set = Transformed(open_dataset(data, "train"), transform)
    test_set = Transformed(open_dataset(data, "test"), transform)
    test_set = evenly_spaced(test_set, args.max_test)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)

    config = FewShotConfig(shots=tuple(args.shots), num_seeds=args.seeds)
    train_x, train_y = extract_features(predict, train_set, desc="train features")
    test_x, test_y = extract_features(predict, test_set, desc="test features")
    num_classes = int(train_y.max()) + 1
    ours = fewshot_accuracies(train_x, train_y, test_x, test_y, config, num_classes)
    rows = [
        "| evaluation | rows per class | vitkit (%) | independent (%) | independent by |",
        "|---|---:|---:|---:|---|",
    ]
    for shots in config.shots:
        theirs = [
            ridge_by_sklearn(train_x[chosen], train_y[chosen], test_x, test_y, num_classes, config.l2_reg)
            for chosen in (
                sample_shots(train_y, shots, config.seed + s, num_classes) for s in range(config.num_seeds)
            )
        ]
        rows.append(
            f"| {shots}-shot (mean of {config.num_seeds}) | {shots} | {100 * ours[f'{shots}shot']:.2f} | "
            f"{100 * float(np.mean(theirs)):.2f} | scikit-learn Ridge |"
        )
    probe = linear_probe(train_x, train_y, test_x, test_y, config)
    other = probe_by_lbfgs(train_x, train_y, test_x, test_y, probe["linear_probe_c"])
    per_class = torch.bincount(train_y)
    rows.append(
        f"| linear probe (C={probe['linear_probe_c']:g}) | {int(per_class.min())}-{int(per_class.max())} | "
        f"{100 * probe['linear_probe']:.2f} | {100 * other:.2f} | torch L-BFGS, same objective |"
    )
    print(f"{len(train_y)} training and {len(test_y)} test images\n" + "\n".join(rows))
    if args.no_finetune:
        return
    with tempfile.TemporaryDirectory() as folder:
        rows = compare_finetuning(checkpoint, args, probe["linear_probe"], Path(folder))
    print(f"linear probe on the frozen features: {100 * probe['linear_probe']:.2f}%\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
