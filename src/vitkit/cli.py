"""`vitkit <command>`: each command is a thin call into the modules that own the work.

Commands register themselves in COMMANDS with a function that adds its arguments and a function that
runs it, so `vitkit --help` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .analysis.flops import count, human
from .registry import get_config, list_models
from .runtime import keep_freed_memory

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def add_set_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """`--set KEY=VALUE`, repeatable: the type-checked config overrides every experiment command takes."""
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=text
    )


# vitkit info ------------------------------------------------------------------------------------------
def add_info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_base_patch16_384 or B/16")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None)


def run_info(args: argparse.Namespace) -> int:
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    config = get_config(args.name, **overrides)
    counts = count(config)
    print(
        f"{args.name} at {counts.img_size[0]}x{counts.img_size[1]}: width {config.embed_dim}, depth "
        f"{config.depth}, heads {config.num_heads}, MLP {config.mlp_dim}, stem {config.stem}, patch "
        f"{config.patch_size}, {config.num_tokens} tokens, {config.num_classes} classes"
    )
    print(f"parameters  {counts.params:,}")
    print(
        f"MACs        {counts.macs:,}  ({human(counts.macs)}MACs; the 'FLOPs' of timm/MMClassification tables)"
    )
    print(f"FLOPs       {counts.flops:,}  ({human(counts.flops)}FLOPs = 2 x MACs of matmuls + norm ops)")
    print("\n| component | parameters | MACs |\n|---|---:|---:|")
    for part in ("stem", "tokens", "attention", "mlp", "norms", "head"):
        params = counts.params_by_component.get(part, 0)
        macs = counts.macs_by_component.get(part, 0)
        print(f"| {part} | {params:,} | {macs:,} |")
    return 0


# vitkit zoo -------------------------------------------------------------------------------------------
def add_zoo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit_base_*'")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="MMClassification's columns: model, pretrain, resolution, params, FLOPs, top-1, top-5",
    )
    parser.add_argument(
        "--metafile", default=None, help="write the zoo metafile (JSON) here, e.g. docs/model-index.json"
    )


def zoo_table(pattern: str = "*") -> str:
    rows = [
        "| model | resolution | params (M) | MACs (G) | width | depth | heads | patch | classes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in list_models(pattern):
        config = get_config(name)
        counts = count(config)
        rows.append(
            f"| {name} | {config.img_size[0]} | {counts.params / 1e6:.2f} | {counts.macs / 1e9:.2f} | "
            f"{config.embed_dim} | {config.depth}x{config.parallel} | {config.num_heads} | "
            f"{config.patch_size if config.stem != 'hybrid' else 'R' + str(config.stride)} | {config.num_classes} |"
        )
    return "\n".join(rows)


def run_zoo(args: argparse.Namespace) -> int:
    """List the registered models with parameters and MACs; --markdown, --metafile for the zoo files."""
    if args.metafile or args.markdown:
        from .analysis.zoo import markdown_table, write_metafile

        if args.metafile:
            print(f"wrote {write_metafile(args.metafile, args.pattern)}")
        if args.markdown:
            print(markdown_table(args.pattern))
        return 0
    print(zoo_table(args.pattern))
    return 0


# vitkit train / eval / predict / demo ----------------------------------------------------------------
def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="a name in configs/ (e.g. digits_vit), a .py file, or a run's config.json",
    )
    add_set_arg(
        parser,
        "override a config field, type-checked: optim.lr=1e-3, train.epochs=5, model.overrides.depth=6",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_train(args: argparse.Namespace) -> int:
    """Train an experiment from configs/ (resumes from its run folder); torchrun runs it on N processes."""
    import json

    from .train import NonFiniteLossError, load_experiment, train

    experiment = load_experiment(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(experiment.to_dict(), indent=1))
        return 0
    try:
        summary = train(experiment)
    except NonFiniteLossError as error:
        print(f"vitkit train: stopped: {error}", file=sys.stderr)
        return 3
    if "last" in summary:  # the main process
        print(json.dumps(summary, indent=1))
    return 0


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run folder (its best weights), or a .safetensors training checkpoint"
    )
    parser.add_argument("--split", default="test", help="split of the data set (train, val, test)")
    parser.add_argument(
        "--root", default=None,
        help="ImageFolder root with one folder per split (default: the data set the checkpoint was trained on)",
    )  # fmt: skip
    add_set_arg(
        parser, "override the data config stored with the checkpoint, e.g. root=/data/cifar10 batch_size=256"
    )
    parser.add_argument("--out", default=None, help="folder for results.json and the confusion matrix PNG")


def parse_data_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--set key=value` of a DataConfig field, the value read as YAML (256, [0.5, 0.5, 0.5], true)."""
    import yaml

    parsed = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--set {override!r}: expected key=value, e.g. root=/data/cifar10")
        parsed[key.strip().removeprefix("data.")] = yaml.safe_load(value)
    return parsed


def run_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5, per-class accuracy and a confusion matrix PNG of a checkpoint on a split."""
    from .data import DataConfig, build_loader
    from .eval.classification import (
        evaluate_classification,
        load_classifier,
        plot_confusion_matrix,
        resolve_checkpoint,
        write_results,
    )

    path = resolve_checkpoint(args.checkpoint)
    model, classes, data = load_classifier(path)
    overrides = parse_data_overrides(args.overrides)
    if args.root is not None:
        overrides.setdefault("root", args.root)
        if not data:
            overrides.setdefault("dataset", "imagefolder")
    if not data and "root" not in overrides and "dataset" not in overrides:
        raise ValueError(
            f"{path} names no data set (it carries no training data config); pass --root FOLDER "
            f"(an ImageFolder with {args.split}/ inside) or --set dataset=..."
        )
    if not data:
        data = {"img_size": model.config.img_size[0]}
    config = DataConfig.from_dict(data).replace(**overrides)
    loader = build_loader(config, args.split, augment=False)
    if loader.classes != classes:
        raise ValueError(
            f"{path}: trained on classes {classes[:10]}{' ...' if len(classes) > 10 else ''}, but split "
            f"{args.split!r} of {config.root or config.dataset} has {loader.classes[:10]}"
            f"{' ...' if len(loader.classes) > 10 else ''}"
        )
    result = evaluate_classification(model, loader, classes, progress=True)
    if result.num_samples == 0:
        raise ValueError(f"split {args.split!r} of {config.root or config.dataset} has no images")
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / f"eval_{args.split}"
    results = write_results(result, out / "results.json", checkpoint=str(path), split=args.split)
    figure = plot_confusion_matrix(result, out / "confusion_matrix.png")
    print(
        f"{path} on {args.split} ({result.num_samples} images): top-1 {result.top_k(1):.2%}, "
        f"top-5 {result.top_k(5):.2%}, mean per-class {result.metrics()['mean_class_accuracy']:.2%}"
    )
    print(f"wrote {results}\nwrote {figure}")
    return 0


def add_predict_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder or a .safetensors training checkpoint")
    parser.add_argument("images", nargs="+", help="JPEG, PNG, WebP or BMP files")
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="classes shown per image, 1..classes (default: 5, or all if fewer)",
    )


def run_predict(args: argparse.Namespace) -> int:
    """The top-k class names and probabilities of each image."""
    from .data import DataConfig, build_transforms, decode_image
    from .data.datasets import BadImageError
    from .eval.classification import load_classifier, predict_images

    model, classes, data = load_classifier(args.checkpoint)
    if args.top_k is None:
        args.top_k = min(5, len(classes))
    if not 1 <= args.top_k <= len(classes):
        raise ValueError(f"--top-k {args.top_k}: expected 1..{len(classes)} (the checkpoint's classes)")
    config = DataConfig.from_dict(data) if data else DataConfig(img_size=model.config.img_size[0])
    transform = build_transforms(config, train=False)
    failed = 0
    for path in args.images:
        try:
            image = transform(decode_image(path), None)
        except BadImageError as error:
            print(f"{path}: skipped: {error.reason}", file=sys.stderr)
            failed += 1
            continue
        ranked = predict_images(model, classes, image[None], args.top_k)[0]
        print(f"{path}: " + ", ".join(f"{name} {probability:.3f}" for name, probability in ranked))
    return 1 if failed else 0


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder of the demo")
    add_set_arg(parser, "override the digits_vit config, e.g. train.epochs=5")


def command_name() -> str:
    """How to call this vitkit again from the user's shell: `vitkit` when it is on the PATH, else
    the path of the entry point beside this Python (e.g. .venv/bin/vitkit), else `python -m vitkit`."""
    entry = Path(sys.executable).parent / "vitkit"
    on_path = shutil.which("vitkit")
    if on_path and entry.exists() and Path(on_path).resolve() == entry.resolve():
        return "vitkit"
    if entry.exists():
        try:
            return str(entry.relative_to(Path.cwd()))
        except ValueError:
            return str(entry)
    return f"{sys.executable} -m vitkit"


def write_digit_samples(folder: Path, num_samples: int = 4) -> list[Path]:
    """A few test-split digits as PNG files (8x8, as in the data set), to try `vitkit predict` on."""
    from PIL import Image

    from .data import Digits

    test = Digits("test")
    paths = []
    for index in range(num_samples):
        image, label = test[index]
        path = folder / f"test{index:03d}_label{label}.png"
        pixels = image.permute(1, 2, 0).numpy()
        atomic_write_image(path, Image.fromarray(pixels))
        paths.append(path)
    return paths


def atomic_write_image(path: Path, image) -> None:
    from .io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def run_demo(args: argparse.Namespace) -> int:
    """The main job: train a small ViT on the embedded digits, evaluate it, write results and figures."""
    from .train import load_experiment, train

    started = time.perf_counter()
    experiment = load_experiment("digits_vit", [f"train.out_dir={args.out}", *args.overrides])
    print(
        f"vitkit demo: training {experiment.model.name} with {experiment.model.overrides} on the embedded "
        f"digits (scikit-learn, 8x8 upsampled to {experiment.data.img_size} px) for {experiment.train.epochs} epochs",
        file=sys.stderr,
    )
    summary = train(experiment)
    out = Path(summary["out_dir"])
    samples = write_digit_samples(out / "samples")
    print(
        f"\nvitkit demo: test top-1 {summary['top1']:.2%} (top-5 {summary['top5']:.2%}, best {summary['best_top1']:.2%}) "
        f"after {summary['steps']} steps; {summary['train_time_s']:.0f} s training, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    for what, key in (
        ("results (JSON)", "results"),
        ("loss/accuracy curves (PNG)", "curves"),
        ("confusion matrix (PNG)", "confusion_matrix"),
        ("best weights", "best"),
        ("last weights", "last"),
        ("metrics (JSONL; CSV beside it)", "metrics"),
    ):
        print(f"  {what:32s} {summary[key]}")
    print(f"  {'resolved config':32s} {out / 'config.json'}")
    print(f"  {'resumable checkpoints':32s} {out / 'checkpoints'}")
    print(f"  {'TensorBoard logs':32s} {out / 'tensorboard'}")
    print(f"  {'test digits to predict (PNG)':32s} {out / 'samples'}")
    vitkit = command_name()
    print(f"next: {vitkit} eval {out}   |   {vitkit} predict {out} {samples[0]}")
    return 0


# vitkit plot -----------------------------------------------------------------------------------------
def add_plot_args(parser: argparse.ArgumentParser) -> None:
    figures = ("pos-embed", "attention-distance", "filters", "attention")
    parser.add_argument("figure", choices=figures, help="which figure of the ViT paper (Figures 6 and 7)")
    parser.add_argument("checkpoint", help="any checkpoint `vitkit.load` reads")
    parser.add_argument(
        "images", nargs="*", help="attention-distance: image files or folders; attention: one image"
    )
    parser.add_argument("--out", default=None, help="PNG path (default: figures/<figure>.png)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--max-images", type=int, default=64, help="attention-distance: images used")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=-1, help="attention: block of the per-head maps")
    parser.add_argument("--num-components", type=int, default=28, help="filters: components shown")
    parser.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="input normalisation")
    parser.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5), help="input normalisation")


def run_plot(args: argparse.Namespace) -> int:
    """Draw a figure of the ViT paper from a checkpoint: position embeddings, attention, filters."""
    from .analysis.plots import figure_from_checkpoint
    from .eval.classification import resolve_checkpoint

    path, message = figure_from_checkpoint(
        args.figure,
        resolve_checkpoint(args.checkpoint),
        args.images,
        out=args.out,
        img_size=args.img_size,
        max_images=args.max_images,
        batch_size=args.batch_size,
        layer=args.layer,
        num_components=args.num_components,
        mean=tuple(args.mean),
        std=tuple(args.std),
    )
    print(f"{message}\nwrote {path}")
    return 0


# vitkit draw -----------------------------------------------------------------------------------------
def add_draw_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered name or alias, e.g. vit_small_patch16_18x2_224 or B/16")
    parser.add_argument("--out", default=None, help="path without suffix (default: figures/<name>)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None)


def run_draw(args: argparse.Namespace) -> int:
    """Draw a variant's architecture with its sizes (PNG and SVG) and print its stages and parameters."""
    from .analysis.draw import draw_architecture, summary

    overrides = {"img_size": args.img_size, "num_classes": args.num_classes}
    config = get_config(args.name, **{key: value for key, value in overrides.items() if value is not None})
    out = Path(args.out) if args.out else Path("figures") / args.name.replace("/", "_").replace("+", "_")
    print(summary(config, args.name))
    for path in draw_architecture(config, out, args.name):
        print(f"wrote {path}")
    return 0


# vitkit convert --------------------------------------------------------------------------------------
def add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file or folder in any layout (detected)")
    parser.add_argument("dst", help="output: a file (.safetensors, .pth, .npz) or, for hf, a folder")
    parser.add_argument("--to", required=True, choices=["vitkit", "timm", "hf", "npz", "mmpretrain"])
    parser.add_argument(
        "--from",
        dest="layout",
        default=None,
        choices=["vitkit", "vit_jax", "big_vision", "timm", "hf", "dinov2", "mmpretrain", "deit"],
        help="force the source layout instead of detecting it",
    )
    parser.add_argument("--num-heads", type=int, default=None, help="heads, for widths not in the size table")
    parser.add_argument(
        "--img-size", type=int, default=None, help="resample position embeddings to this size"
    )
    parser.add_argument(
        "--keep-source-numerics",
        action="store_true",
        help="keep the source's GELU form, LayerNorm eps and position-embedding resampling",
    )
    parser.add_argument(
        "--drop-pre-logits", action="store_true", help="drop the ImageNet-21k pre-logits layer"
    )
    parser.add_argument("--non-strict", action="store_true", help="convert despite unused or missing keys")


def run_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint between layouts: vitkit, timm, HF, vit_jax .npz, mmpretrain."""
    from .convert import convert

    overrides = {}
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    report = convert(
        args.src,
        args.dst,
        to=args.to,
        layout=args.layout,
        strict=not args.non_strict,
        keep_source_numerics=args.keep_source_numerics,
        pre_logits=not args.drop_pre_logits,
        progress=True,
        **overrides,
    )
    config = report.config
    print(
        f"read {args.src} as {report.source_layout}: width {config.embed_dim}, depth {config.depth}, heads "
        f"{config.num_heads}, stem {config.stem}, patch {config.patch_size}, {config.img_size[0]}x"
        f"{config.img_size[1]} px, {config.num_classes} classes"
    )
    print(
        f"wrote {report.path} ({report.target}, {report.num_tensors} tensors; converted back bitwise equal)"
    )
    return 0


# vitkit finetune / pretrain / fewshot (the papers' methods) -------------------------------------------
def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="pre-trained weights: any file or folder vitkit.load reads")
    parser.add_argument("--config", default="finetune_cifar10", help="a fine-tuning experiment in configs/")
    parser.add_argument(
        "--img-size", type=int, default=None, help="fine-tuning resolution (default: config's)"
    )
    parser.add_argument(
        "--freeze", default=None, choices=["none", "attention-only", "head-only"],
        help="freezing rule; attention-only also writes delta.safetensors (default: the config's)",
    )  # fmt: skip
    add_set_arg(parser, "override a config field: optim.lr=0.01, train.epochs=5, data.root=/data/cifar10")
    parser.add_argument(
        "--compare-freezing", action="store_true",
        help="first print trainable parameters, memory and step time of full vs attention-only",
    )  # fmt: skip


def start_digest(checkpoint: str, num_classes: int, img_size: int) -> str:
    """A short digest of a fine-tuning start: the source file or folder (path, size, mtime) and the
    new head and resolution."""
    import hashlib

    path = Path(checkpoint).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    text = f"{path}|{num_classes}|{img_size}|" + "|".join(
        f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files if file.is_file()
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a pre-trained checkpoint as the ViT paper: new zero head, 2D-interpolated positions."""
    import dataclasses
    import json

    from .data.loader import open_dataset
    from .delta import finetune_model, format_freezing_report, freezing_report, save_delta
    from .eval.classification import resolve_checkpoint
    from .io import save
    from .train import load_experiment, train

    checkpoint = str(resolve_checkpoint(args.checkpoint))
    experiment = load_experiment(args.config, args.overrides)
    data = experiment.data
    if args.img_size is not None:
        data = data.replace(img_size=args.img_size)
    dataset = open_dataset(data, "train")
    num_classes = len(getattr(dataset, "dataset", dataset).classes)
    model = finetune_model(checkpoint, num_classes, data.img_size)
    freeze = args.freeze or experiment.model.freeze
    if args.compare_freezing:
        report = freezing_report(model.config, ("none", freeze if freeze != "none" else "attention-only"))
        print(format_freezing_report(report))
    out_dir = Path(experiment.train.out_dir)
    # Named by what it was made from, so that preparing another start never overwrites the one a run
    # in this folder began from: the run folder's own checks then name what differs.
    start = out_dir / f"init-{start_digest(checkpoint, num_classes, data.img_size)}.safetensors"
    if not start.exists():
        save(model, start)
    experiment = dataclasses.replace(
        experiment,
        data=data,
        model=dataclasses.replace(experiment.model, init_from=str(start), overrides={}, freeze=freeze),
    )
    summary = train(experiment)
    if "last" in summary and freeze != "none":
        from .io import load

        delta = save_delta(load(summary["last"]), checkpoint, out_dir / "delta.safetensors")
        summary["delta"] = str(delta)
        summary["delta_note"] = f"vitkit.load({checkpoint!r}, delta={str(delta)!r}) rebuilds the task model"
    if "last" in summary:
        print(json.dumps(summary, indent=1))
    return 0


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="pretrain_cifar10", help="a pre-training experiment in configs/")
    add_set_arg(
        parser, "override a field: masked.masking=blockwise, masked.target=pixels, model.overrides.stem=hmlp"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_pretrain(args: argparse.Namespace) -> int:
    """Masked-patch pre-training (ViT 4.6 mean colour, BeiT blockwise); writes encoder.safetensors."""
    import json

    from .train.pretrain import load_pretrain_experiment, pretrain

    experiment = load_pretrain_experiment(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(experiment.to_dict(), indent=1))
        return 0
    print(json.dumps(pretrain(experiment), indent=1))
    return 0


def add_fewshot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="weights to evaluate frozen: any file or folder vitkit.load reads")
    parser.add_argument(
        "--root", default=None,
        help="ImageFolder root with train/ and test/ (default: $VITKIT_DATA/cifar10, by default "
        "../shared/data/cifar10 beside the source checkout)",
    )  # fmt: skip
    parser.add_argument("--dataset", default="imagefolder", help="data set kind (DataConfig.dataset)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution (default: the model's)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25])
    parser.add_argument("--seeds", type=int, default=3, help="draws per shot count")
    parser.add_argument("--l2-reg", type=float, default=1024.0, help="ridge strength on whitened features")
    parser.add_argument("--no-probe", action="store_true", help="skip the logistic-regression linear probe")
    parser.add_argument(
        "--probe-per-class", type=int, default=500, help="probe training images per class (0: all)"
    )
    parser.add_argument(
        "--max-test", type=int, default=0, help="evaluate on the first N test images (0: all)"
    )
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")


def run_fewshot(args: argparse.Namespace) -> int:
    """Few-shot linear evaluation of frozen features (ViT paper): 1/5/10/25 shots, and a linear probe."""
    import json

    import torch
    from torch.utils.data import Subset

    from .data import DataConfig, build_transforms, data_root
    from .data.loader import open_dataset
    from .eval.classification import resolve_checkpoint
    from .eval.fewshot import FewShotConfig, Transformed, evaluate_fewshot, format_table
    from .io import atomic_write, load

    model = load(resolve_checkpoint(args.checkpoint)).eval()
    img_size = args.img_size or model.config.img_size[0]
    root = args.root if args.root is not None else str(data_root() / "cifar10")
    data = DataConfig(dataset=args.dataset, root=root, img_size=img_size, eval_resize="squash")
    transform = build_transforms(data, train=False)
    train_set = Transformed(open_dataset(data, "train"), transform)
    test_set = Transformed(open_dataset(data, "test"), transform)
    if args.max_test:
        # A class-balanced cut: every k-th image, since ImageFolder lists the test set class by class.
        stride = max(len(test_set) // args.max_test, 1)
        test_set = Subset(test_set, list(range(0, len(test_set), stride))[: args.max_test])
    config = FewShotConfig(
        shots=tuple(args.shots), num_seeds=args.seeds, l2_reg=args.l2_reg,
        linear_probe=not args.no_probe, probe_samples_per_class=args.probe_per_class,
    )  # fmt: skip

    def predict(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)

    metrics = evaluate_fewshot(predict, train_set, test_set, config)
    print(format_table(metrics, config.shots))
    if args.out:
        text = json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=1) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


# vitkit export ----------------------------------------------------------------------------------------
def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="native vitkit checkpoint (.safetensors file or folder)")
    parser.add_argument("output", help="ONNX file to write, e.g. model.onnx")
    parser.add_argument(
        "--img-size", type=int, default=None, help="resolution of the graph (default: the checkpoint's)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run_export(args: argparse.Namespace) -> int:
    """Export a checkpoint to ONNX (dynamic batch), checked against PyTorch with onnxruntime."""
    from .eval.classification import resolve_checkpoint
    from .export import export_onnx
    from .io import load

    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model = load(resolve_checkpoint(args.checkpoint), **overrides)
    check = export_onnx(model, args.output, check=not args.no_check)
    size = "x".join(map(str, model.config.img_size))
    print(f"wrote {args.output}: images (batch, {model.config.in_chans}, {size}) -> logits (batch, "
          f"{model.config.num_classes}), dynamic batch")  # fmt: skip
    if check is not None:
        print(
            f"onnxruntime vs PyTorch on a batch of {check.batch_size}: max |error| {check.max_abs_error:.2e} "
            f"(logits up to {check.max_abs_logit:.2f})"
        )
    return 0


COMMANDS: list[Command] = [
    ("info", add_info_args, run_info),
    ("zoo", add_zoo_args, run_zoo),
    ("demo", add_demo_args, run_demo),
    ("train", add_train_args, run_train),
    ("eval", add_eval_args, run_eval),
    ("predict", add_predict_args, run_predict),
    ("plot", add_plot_args, run_plot),
    ("draw", add_draw_args, run_draw),
    ("convert", add_convert_args, run_convert),
    ("finetune", add_finetune_args, run_finetune),
    ("pretrain", add_pretrain_args, run_pretrain),
    ("fewshot", add_fewshot_args, run_fewshot),
    ("export", add_export_args, run_export),
]


# How the API's arguments are spelt on the command line, for the advice in messages raised below
# the CLI ("pass num_heads=" becomes "pass --num-heads").
API_TO_FLAG = {
    "layout=": "--from",
    "num_heads=": "--num-heads",
    "img_size=": "--img-size",
    "strict=False": "--non-strict",
    "pre_logits=False": "--drop-pre-logits",
    "keep_source_numerics=True": "--keep-source-numerics",
}
ADVICE = re.compile(r"\b(pass|leave|load with|set) (" + "|".join(map(re.escape, API_TO_FLAG)) + ")")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(error: BaseException, parser: argparse.ArgumentParser) -> str:
    """A user-facing message of `error`: one line, no terminal escapes, the CLI's flags named."""
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    else:
        message = str(error) or type(error).__name__
    message = ANSI_ESCAPE.sub("", message)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    options = {option for action in parser._actions for option in action.option_strings}

    def to_flag(match: re.Match) -> str:
        flag = API_TO_FLAG[match[2]]
        return f"{match[1]} {flag}" if flag in options else match[0]

    return ADVICE.sub(to_flag, message)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="vitkit", description="Vision Transformers: train, convert, analyse."
    )
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and training do")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, add_args, run in COMMANDS:
        command_parser = sub.add_parser(name, help=(run.__doc__ or "").strip().split("\n")[0] or None)
        add_args(command_parser)
        command_parser.set_defaults(run=run)
        commands[name] = command_parser
    return parser, commands


def quiet_stdout() -> None:
    """After a closed pipe (`vitkit zoo | head`): send what is left to /dev/null, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        keep_freed_memory()  # steady training/inference loops reuse their pages (vitkit.runtime)
        code = args.run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print(f"vitkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (KeyError, ValueError, TypeError, OSError) as error:
        from .train.run_folder import RunFinishedError  # imported already by whatever raised it

        if isinstance(error, RunFinishedError):  # nothing to do: the run asked for is done
            print(f"vitkit {args.command}: {error}", file=sys.stderr)
            return 0
        # A user's mistake (a bad value, a missing or unreadable file, a full disk): one line.
        # `--verbose` keeps the traceback for a bug report.
        if args.verbose:
            traceback.print_exc()
        print(f"vitkit {args.command}: error: {one_line(error, commands[args.command])}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
