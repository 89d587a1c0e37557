"""Commands that measure or show a trained checkpoint: eval, predict, embed, fewshot, plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import (
    POSITIVE,
    add_precision_arg,
    add_preprocessing_args,
    add_set_arg,
    int_in,
    preprocessing_overrides,
)


# vitkit eval --------------------------------------------------------------------------------------
def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run folder (its best weights), or a .safetensors training checkpoint"
    )
    parser.add_argument("--split", default="test", help="split of the data set (train, val, test)")
    parser.add_argument(
        "--root",
        default=None,
        help="ImageFolder root with one folder per split (default: the data set the checkpoint was trained on)",
    )
    add_set_arg(
        parser, "override the data config stored with the checkpoint, e.g. root=/data/cifar10 batch_size=256"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for results.json and the confusion matrix PNG (default: eval_<split> beside the weights; "
        "for an hf-hub: name, eval_<split>/<org>--<name> here)",
    )
    parser.add_argument(
        "--hflip-tta", action="store_true", help="average the predictions of each image and its mirror image"
    )
    parser.add_argument(
        "--shift-tta",
        type=int_in(0, what="pixels"),
        default=0,
        metavar="PX",
        help="also average two copies of each image shifted PX pixels along the diagonal (0: off)",
    )
    add_precision_arg(parser)
    add_preprocessing_args(parser, img_size=False)


def inference_precision(model: Any, precision: str) -> str:
    """Prepare `model` for inference on the CPU in `precision` ("auto": measured) and say which, on stderr."""
    from ..fast import prepare_inference

    _, chosen = prepare_inference(model, "cpu", precision)
    print(
        f"precision: {chosen}" + (" (measured fastest on this CPU)" if precision == "auto" else ""),
        file=sys.stderr,
    )
    return chosen


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
    from ..convert import read_checkpoint
    from ..data import build_loader
    from ..eval.classification import (
        averaged_views,
        describe_count,
        eval_folder,
        evaluate_classification,
        load_classifier,
        plot_confusion_matrix,
        write_results,
    )

    checkpoint = read_checkpoint(args.checkpoint)  # every file opened once, here
    path = checkpoint.path
    model, classes, data = load_classifier(checkpoint)
    config = eval_data_config(args, path, model, data)
    loader = build_loader(config, args.split, augment=False)
    if loader.classes != classes:
        raise ValueError(
            f"{path}: trained on classes {classes[:10]}{' ...' if len(classes) > 10 else ''}, but split "
            f"{args.split!r} of {config.root or config.dataset} has {loader.classes[:10]}"
            f"{' ...' if len(loader.classes) > 10 else ''}"
        )
    inference_precision(model, args.precision)
    predict = averaged_views(model, args.hflip_tta, args.shift_tta)
    result = evaluate_classification(predict, loader, classes, progress=True)
    unreadable = loader.unreadable
    if result.num_samples == 0:
        skipped = f" ({describe_count(0, unreadable)})" if unreadable else ""
        raise ValueError(f"split {args.split!r} of {config.root or config.dataset} has no images{skipped}")
    out = Path(args.out) if args.out else eval_folder(path, args.split)
    if checkpoint.hub is not None and not args.out:  # never into the Hub's cache
        out = Path(f"eval_{args.split}") / checkpoint.hub.repo.replace("/", "--")
    unreadable_fields = [{"path": file, "reason": reason} for file, reason in unreadable]
    results = write_results(
        result,
        out / "results.json",
        checkpoint=checkpoint.hub.name if checkpoint.hub else str(path),
        split=args.split,
        hflip_tta=args.hflip_tta,
        shift_tta=args.shift_tta,
        unreadable=unreadable_fields,
    )
    figure = plot_confusion_matrix(result, out / "confusion_matrix.png")
    print(
        f"{path} on {args.split} ({describe_count(result.num_samples, unreadable)}): top-1 "
        f"{result.top_k(1):.2%}, top-5 {result.top_k(5):.2%}, mean per-class "
        f"{result.metrics()['mean_class_accuracy']:.2%}"
    )
    print(f"wrote {results}\nwrote {figure}")
    return 0


def eval_data_config(args: argparse.Namespace, path: Path, model: Any, data: dict) -> Any:
    """The DataConfig `vitkit eval` reads: the checkpoint's, with --root, --set and preprocessing flags."""
    from ..data import DataConfig, preprocessing_of
    from ..data.model_transform import data_fields

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
        # A checkpoint trained elsewhere: its own preprocessing (recorded or its layout's default).
        data = data_fields(preprocessing_of(model))
    overrides.update(preprocessing_overrides(args))
    return DataConfig.from_dict(data).replace(**overrides)


# vitkit predict -----------------------------------------------------------------------------------
def add_images_args(parser: argparse.ArgumentParser) -> None:
    """The image arguments of `predict` and `embed`, and their batch size."""
    parser.add_argument(
        "images",
        nargs="+",
        help="JPEG, PNG, WebP or BMP files, folders (their image files, sorted) or glob patterns ('**' included)",
    )
    parser.add_argument("--batch-size", type=POSITIVE, default=32, help="images per forward pass")
    add_precision_arg(parser)


def add_predict_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder or a .safetensors training checkpoint")
    add_images_args(parser)
    parser.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="classes shown per image, 1..classes (default: 5, or all if fewer)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per image and line: {"path", "top_k": [{"label", "index", "probability"}]}, '
        'or {"path", "error"} for a file that cannot be read',
    )
    add_preprocessing_args(parser, img_size=False)


def run_predict(args: argparse.Namespace) -> int:
    """The top-k class names and probabilities of each image; exit 1 if any file could not be read."""
    import json

    from ..data import eval_transform
    from ..eval.classification import load_classifier
    from ..eval.images import expand_images, run_images

    model, classes, _ = load_classifier(args.checkpoint)
    if args.top_k is None:
        args.top_k = min(5, len(classes))
    if not 1 <= args.top_k <= len(classes):
        raise ValueError(f"--top-k {args.top_k}: expected 1..{len(classes)} (the checkpoint's classes)")
    transform = eval_transform(model, **preprocessing_overrides(args))
    inputs = expand_images(args.images)
    inference_precision(model, args.precision)

    def probabilities(images: Any) -> Any:
        return model(images).float().softmax(dim=-1)

    failed = 0
    for result in run_images(probabilities, inputs, transform, args.batch_size, desc="predict"):
        if result.error is not None:
            failed += 1
            if args.json:
                print(json.dumps({"path": result.path, "error": result.error}), flush=True)
            else:
                print(f"{result.path}: skipped: {result.error}", file=sys.stderr)
            continue
        values, indices = result.output.topk(args.top_k)
        ranked = [
            (classes[index], index, value)
            for value, index in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        if args.json:
            top_k = [{"label": name, "index": index, "probability": value} for name, index, value in ranked]
            print(json.dumps({"path": result.path, "top_k": top_k}), flush=True)
        else:
            print(f"{result.path}: " + ", ".join(f"{name} {value:.3f}" for name, _, value in ranked))
    if failed and args.json:
        print(f"{failed} of {len(inputs)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


# vitkit embed -------------------------------------------------------------------------------------
def add_embed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="any checkpoint `vitkit.load` reads, or a run folder")
    add_images_args(parser)
    parser.add_argument(
        "--out",
        default="features.npy",
        help="float32 N x D .npy of the pooled features, the image paths, in order, in a .json beside it; "
        "or a .parquet of both (columns path, features) with the model and preprocessing in its metadata "
        "(needs pyarrow: pip install 'vitkit[parquet]')",
    )
    add_preprocessing_args(parser, img_size=False)


def run_embed(args: argparse.Namespace) -> int:
    """The pooled features (what the head reads) of each image; exit 1 if any file could not be read."""
    import numpy as np
    import torch

    from ..data import resolve_preprocessing
    from ..data.model_transform import transform_of
    from ..eval.classification import check_finite
    from ..eval.embed import check_features_path, pooled_features, write_features
    from ..eval.images import expand_images, run_images
    from ..io import load, read_checkpoint

    out = check_features_path(args.out)
    checkpoint = read_checkpoint(args.checkpoint)  # every file opened once, here
    path = checkpoint.path
    model = load(checkpoint).eval()
    check_finite(model, path)
    preprocessing = resolve_preprocessing(model, **preprocessing_overrides(args))
    transform = transform_of(preprocessing)
    inputs = expand_images(args.images)
    precision = inference_precision(model, args.precision)
    rows, names = [], []
    for result in run_images(pooled_features(model), inputs, transform, args.batch_size, desc="embed"):
        if result.error is not None:
            print(f"{result.path}: skipped: {result.error}", file=sys.stderr)
            continue
        rows.append(result.output)
        names.append(result.path)
    if not rows:
        raise ValueError(f"none of the {len(inputs)} files given could be read as an image")
    features = torch.stack(rows).numpy().astype(np.float32)
    description = {
        "checkpoint": checkpoint.hub.name if checkpoint.hub else str(path),
        "layout": checkpoint.layout,
        "dimension": features.shape[1],
        "preprocessing": preprocessing.describe(),
        "precision": precision,
        **({"hub": checkpoint.hub.as_dict()} if checkpoint.hub else {}),
    }
    written = write_features(out, features, names, description)
    print(f"{len(names)} images, {features.shape[1]} features each")
    print("\n".join(f"wrote {file}" for file in written))
    return 1 if len(names) < len(inputs) else 0


# vitkit fewshot -----------------------------------------------------------------------------------
def add_fewshot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="weights to evaluate frozen: any file or folder vitkit.load reads")
    parser.add_argument(
        "--root",
        default=None,
        help="ImageFolder root with train/ and test/ (default: $VITKIT_DATA/cifar10, by default "
        "../shared/data/cifar10 beside the source checkout)",
    )
    parser.add_argument("--dataset", default="imagefolder", help="data set kind (DataConfig.dataset)")
    parser.add_argument(
        "--shots", type=POSITIVE, nargs="+", default=[1, 5, 10, 25], help="training images per class"
    )
    parser.add_argument("--seeds", type=POSITIVE, default=3, help="draws per shot count")
    parser.add_argument("--l2-reg", type=float, default=1024.0, help="ridge strength on whitened features")
    parser.add_argument("--no-probe", action="store_true", help="skip the logistic-regression linear probe")
    parser.add_argument(
        "--probe-per-class",
        type=int_in(0),
        default=0,
        help="cap the probe's training images per class (default 0: every image given)",
    )
    parser.add_argument(
        "--max-test", type=int_in(0), default=0, help="evaluate on the first N test images (0: all)"
    )
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    add_precision_arg(parser)
    add_preprocessing_args(parser)


def run_fewshot(args: argparse.Namespace) -> int:
    """Few-shot linear evaluation of frozen features (ViT paper): 1/5/10/25 shots, and a linear probe."""
    import json

    from ..data import DataConfig, data_root, resolve_preprocessing
    from ..data.loader import open_dataset
    from ..data.model_transform import transform_of
    from ..eval.embed import pooled_features
    from ..eval.fewshot import FewShotConfig, Transformed, evaluate_fewshot, evenly_spaced, format_table
    from ..io import atomic_write, load

    model = load(args.checkpoint)
    inference_precision(model, args.precision)
    overrides = preprocessing_overrides(args)
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    preprocessing = resolve_preprocessing(model, **overrides)
    print(f"preprocessing: {preprocessing.describe()}", file=sys.stderr)
    root = args.root if args.root is not None else str(data_root() / "cifar10")
    data = DataConfig(dataset=args.dataset, root=root)
    transform = transform_of(preprocessing)
    train_set = Transformed(open_dataset(data, "train"), transform)
    test_set = Transformed(open_dataset(data, "test"), transform)
    test_set = evenly_spaced(test_set, args.max_test)
    config = FewShotConfig(
        shots=tuple(args.shots),
        num_seeds=args.seeds,
        l2_reg=args.l2_reg,
        linear_probe=not args.no_probe,
        probe_samples_per_class=args.probe_per_class,
    )

    metrics = evaluate_fewshot(pooled_features(model), train_set, test_set, config)
    print(format_table(metrics, config.shots))
    if args.out:
        text = json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=1) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


# vitkit plot --------------------------------------------------------------------------------------
def add_plot_args(parser: argparse.ArgumentParser) -> None:
    figures = ("pos-embed", "attention-distance", "filters", "attention")
    parser.add_argument("figure", choices=figures, help="which figure of the ViT paper (Figures 6 and 7)")
    parser.add_argument("checkpoint", help="any checkpoint `vitkit.load` reads")
    parser.add_argument(
        "images", nargs="*", help="attention-distance: image files or folders; attention: one image"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="PNG path, or a folder to write <figure>.png in (default: figures/<figure>.png)",
    )
    parser.add_argument("--img-size", type=POSITIVE, default=None, help="resolution (default: the model's)")
    parser.add_argument("--max-images", type=POSITIVE, default=64, help="attention-distance: images used")
    parser.add_argument(
        "--batch-size", type=POSITIVE, default=32, help="attention-distance: images per forward pass"
    )
    parser.add_argument("--layer", type=int, default=-1, help="attention: block of the per-head maps")
    parser.add_argument("--num-components", type=POSITIVE, default=28, help="filters: components shown")
    add_preprocessing_args(parser, img_size=False)


def run_plot(args: argparse.Namespace) -> int:
    """Draw a figure of the ViT paper from a checkpoint: position embeddings, attention, filters."""
    from ..analysis.plots import figure_from_checkpoint
    from ..eval.classification import resolve_checkpoint

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
        preprocessing=preprocessing_overrides(args),
    )
    print(f"{message}\nwrote {path}")
    return 0
