"""What the command modules share: the shape of a command, the `--set` argument, bounded numbers."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def int_in(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in low..high (no upper bound when high is None); anything else
    is refused by argparse in one line naming the flag and the range."""
    expected = f"{low}..{high}" if high is not None else f">= {low}"
    expected = f"{what} ({expected})" if what else expected

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer, {expected}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: expected {expected}")
        return value

    parse.__name__ = f"integer {expected}"
    return parse


POSITIVE = int_in(1)
PORT = int_in(0, 65535, "a TCP port")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default value: "(default: 32)" after its text, unless the
    text already names it. Flags (on or off) and options without a default value say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or action.nargs == 0 or default in (None, argparse.SUPPRESS, [], ()):
            return text
        if "%(default)" in text or f"default: {default}" in text or f"default {default}" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


def add_set_arg(parser: argparse.ArgumentParser, text: str) -> None:
    """`--set KEY=VALUE`, repeatable: the type-checked config overrides every experiment command takes."""
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=text
    )


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """`--precision`: the arithmetic of the forward passes of an inference command."""
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto (default): the precision this machine measured fastest (bf16 where its products "
        "run clearly faster than fp32; cached per CPU and torch version); fp32: the reference arithmetic",
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
