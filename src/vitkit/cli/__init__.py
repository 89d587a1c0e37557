"""`vitkit <command>`: each command is a thin call into the modules that own the work.

Commands register themselves in COMMANDS with a function that adds its arguments and a function that
runs it, so `vitkit --help` lists them all. They live by what they do: models.py (info, zoo, draw),
training.py (train, demo, finetune, pretrain), evaluation.py (eval, predict, embed, fewshot, plot) and
files.py (convert, export), quantize.py (quantize), serve.py (serve); this file parses the command line and turns errors into one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from typing import NoReturn

from .. import __version__
from ..runtime import keep_freed_memory
from .common import Command, DefaultsHelpFormatter
from .evaluation import (
    add_embed_args,
    add_eval_args,
    add_fewshot_args,
    add_plot_args,
    add_predict_args,
    run_embed,
    run_eval,
    run_fewshot,
    run_plot,
    run_predict,
)
from .files import add_convert_args, add_export_args, run_convert, run_export
from .models import add_draw_args, add_info_args, add_zoo_args, run_draw, run_info, run_zoo
from .quantize import add_quantize_args, run_quantize
from .serve import add_serve_args, run_serve
from .training import (
    add_demo_args,
    add_finetune_args,
    add_pretrain_args,
    add_train_args,
    run_demo,
    run_finetune,
    run_pretrain,
    run_train,
)

COMMANDS: list[Command] = [
    ("info", add_info_args, run_info),
    ("zoo", add_zoo_args, run_zoo),
    ("demo", add_demo_args, run_demo),
    ("train", add_train_args, run_train),
    ("eval", add_eval_args, run_eval),
    ("predict", add_predict_args, run_predict),
    ("embed", add_embed_args, run_embed),
    ("plot", add_plot_args, run_plot),
    ("draw", add_draw_args, run_draw),
    ("convert", add_convert_args, run_convert),
    ("finetune", add_finetune_args, run_finetune),
    ("pretrain", add_pretrain_args, run_pretrain),
    ("fewshot", add_fewshot_args, run_fewshot),
    ("export", add_export_args, run_export),
    ("quantize", add_quantize_args, run_quantize),
    ("serve", add_serve_args, run_serve),
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
    "num_classes=0": "--num-classes 0",
}
# Advice that a command without the flag can follow: another command first, or Python.
WITHOUT_FLAG = {
    "num_heads=": "convert it first with `vitkit convert SRC DST --num-heads N` and give DST",
    "num_classes=0": 'drop the head first: python -c \'import vitkit; vitkit.save(vitkit.load("SRC", '
    'num_classes=0), "DST.safetensors")\' and give DST.safetensors',
}
ADVICE = re.compile(
    r"\b(pass|leave|load with|set) (" + "|".join(map(re.escape, {**API_TO_FLAG, **WITHOUT_FLAG})) + ")"
)
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
        flag = API_TO_FLAG.get(match[2])
        if flag is not None and flag.split()[0] in options:
            return f"{match[1]} {flag}"
        return WITHOUT_FLAG.get(match[2], match[0])

    return ADVICE.sub(to_flag, message)


class Parser(argparse.ArgumentParser):
    """argparse with a user's mistake in one line, naming the command and where its help is."""

    def error(self, message: str) -> NoReturn:
        # "argument --port: 70000: expected ..." reads as the user typed it: "--port 70000: expected ...".
        message = re.sub(r"^argument ([^:]+): (\S+): expected", r"\1 \2: expected", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = Parser(prog="vitkit", description="Vision Transformers: train, convert, analyse.")
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what loading and training do")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, add_args, run in COMMANDS:
        summary = (run.__doc__ or "").strip().split("\n")[0] or None
        command_parser = sub.add_parser(name, help=summary, formatter_class=DefaultsHelpFormatter)
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
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the command they were given to, not the top level
            commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit:  # --help, --version, or a mistake argparse has reported
        return exit.code if isinstance(exit.code, int) else 2
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
        from ..train.run_folder import RunFinishedError  # imported already by whatever raised it

        if isinstance(error, RunFinishedError):  # nothing to do: the run asked for is done
            print(f"vitkit {args.command}: {error}", file=sys.stderr)
            return 0
        # A user's mistake (a bad value, a missing or unreadable file, a full disk): one line.
        # `--verbose` keeps the traceback for a bug report.
        if args.verbose:
            traceback.print_exc()
        print(f"vitkit {args.command}: error: {one_line(error, commands[args.command])}", file=sys.stderr)
        return 2
