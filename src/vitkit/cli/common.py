"""What the command modules share: the shape of a command and the `--set` argument."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def add_set_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """`--set KEY=VALUE`, repeatable: the type-checked config overrides every experiment command takes."""
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=text
    )


def add_preprocessing_args(parser: argparse.ArgumentParser, img_size: bool = True) -> None:
    """Flags overriding each field of the checkpoint's own preprocessing (`model.preprocessing`)."""
    group = parser.add_argument_group(
        "preprocessing (default: what the checkpoint records or its layout implies)"
    )
    if img_size:
        group.add_argument(
            "--img-size", type=int, default=None, help="input resolution (default: the model's)"
        )
    group.add_argument("--resize", choices=("crop", "squash"), default=None, help="eval resize mode")
    group.add_argument(
        "--crop-pct", type=float, default=None, help="crop: shorter side = img_size / crop_pct"
    )
    group.add_argument("--interpolation", choices=("bicubic", "bilinear"), default=None)
    group.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    group.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"))


def preprocessing_overrides(args: argparse.Namespace) -> dict:
    """The preprocessing fields given on the command line (unset flags left out)."""
    given = {
        "eval_resize": args.resize,
        "crop_pct": args.crop_pct,
        "interpolation": args.interpolation,
        "mean": tuple(args.mean) if args.mean is not None else None,
        "std": tuple(args.std) if args.std is not None else None,
    }
    return {key: value for key, value in given.items() if value is not None}
