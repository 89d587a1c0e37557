"""`vitkit quantize`: an int8 ONNX graph of a checkpoint, written only when its top-1 on a real split is
within a bound of fp32's (vitkit.quantize)."""

from __future__ import annotations

import argparse

from .common import POSITIVE, int_in


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="a run folder (its best weights), or a checkpoint file or folder vitkit.load reads"
    )
    parser.add_argument("--out", required=True, help="int8 ONNX file to write, e.g. model.int8.onnx")
    parser.add_argument(
        "--root",
        default=None,
        help="ImageFolder root with one folder per split (default: the data set the checkpoint was trained on)",
    )
    parser.add_argument("--split", default="test", help="split that measures int8 against fp32")
    parser.add_argument(
        "--max-samples",
        type=int_in(0),
        default=0,
        help="evaluate an evenly spaced, class-balanced subset of N images (0: the whole split)",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="refuse (write nothing) when int8 top-1 is more than this many points below fp32",
    )
    parser.add_argument("--batch-size", type=POSITIVE, default=32, help="images per forward pass")
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per matrix instead of one per output channel",
    )
    parser.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="7-bit weights (default: on exactly where the CPU lacks VNNI, whose int8 products can saturate)",
    )
    parser.add_argument("--static-size", action="store_true", help="fix height and width to the checkpoint's")


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize a checkpoint's linear layers to int8 (ONNX Runtime), measured against fp32 on a split."""
    from ..quantize import quantize_int8

    report = quantize_int8(
        args.checkpoint,
        args.out,
        split=args.split,
        root=args.root,
        max_samples=args.max_samples,
        max_top1_drop=args.max_drop,
        batch_size=args.batch_size,
        per_channel=not args.per_tensor,
        reduce_range=args.reduce_range,
        dynamic_size=not args.static_size,
    )
    print(report.describe())
    print(
        f"wrote {report.path}: {report.int8_bytes / 1e6:.1f} MB (fp32 graph {report.fp32_bytes / 1e6:.1f} MB), "
        f"weights {report.settings['weights']}; activations {report.settings['activations']}"
    )
    return 0
