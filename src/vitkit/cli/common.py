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
