"""What the command line says about itself holds: each flag the README documents exists on the command
it is documented for, and every option's --help states its default value."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vitkit.cli import COMMANDS, build_parser, one_line

README = Path(__file__).resolve().parents[1] / "README.md"
PARSERS = build_parser()[1]


def options_of(command: str) -> set[str]:
    return {option for action in PARSERS[command]._actions for option in action.option_strings}


def documented_commands() -> list[tuple[str, str, int]]:
    """(command, flag, README line) of every `vitkit COMMAND ... --flag` in a code block or span."""
    found = []
    lines = README.read_text().splitlines()
    spans = [
        (number, span) for number, line in enumerate(lines, 1) for span in re.findall(r"`([^`]+)`", line)
    ]
    in_block = False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = not in_block
        elif in_block:
            spans.append((number, line))
    for number, text in spans:
        for match in re.finditer(r"(?:^|\s|-m )vitkit (\w[\w-]*)(.*)", text.replace("\\", " ")):
            command, rest = match[1], match[2].split(" #")[0]
            if command not in PARSERS:
                continue
            for token in shlex.split(rest, comments=False, posix=False):
                if token.startswith("--"):
                    found.append((command, token.split("=")[0], number))
    return found


def table_flags() -> list[tuple[str, str]]:
    """(command, flag) of each row of the README's preprocessing-flags table."""
    text = README.read_text()
    table = text.split("<!-- preprocessing-flags -->")[1].split("<!-- /preprocessing-flags -->")[0]
    pairs = []
    for row in table.strip().splitlines()[2:]:
        commands_cell, flags_cell = [cell.strip() for cell in row.strip("|").split(" | ", 1)]
        flags = re.findall(r"`(--[\w-]+)", flags_cell.split(";")[0])
        pairs += [(command, flag) for command in re.findall(r"`(\w+)`", commands_cell) for flag in flags]
    return pairs


def test_readme_documents_only_flags_the_commands_take():
    documented = documented_commands()
    assert len(documented) > 20  # the README's examples were found
    missing = [
        f"README.md:{line}: vitkit {command} {flag}"
        for command, flag, line in documented
        if flag not in options_of(command)
    ]
    assert not missing, missing


def test_readme_preprocessing_table_matches_each_parser():
    pairs = table_flags()
    assert {command for command, _ in pairs} == {"predict", "eval", "fewshot", "plot", "finetune"}
    missing = [f"vitkit {command} {flag}" for command, flag in pairs if flag not in options_of(command)]
    assert not missing, missing


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_every_option_with_a_default_shows_it_in_help(command):
    parser = PARSERS[command]
    formatter = parser._get_formatter()
    hidden = []
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.nargs == 0 or default in (None, argparse.SUPPRESS, [], ()):
            continue
        text = formatter._expand_help(action) if action.help else ""
        if f"default: {default}" not in text and f"default {default}" not in text:
            hidden.append(f"{'/'.join(action.option_strings)} (default {default!r}): {text!r}")
    assert not hidden, hidden


@pytest.mark.parametrize(
    ("command", "message", "advice"),
    [
        ("convert", "width 48 is not in the size table; pass num_heads=", "pass --num-heads"),
        (
            "predict",
            "width 48 is not in the size table; pass num_heads=",
            "vitkit convert SRC DST --num-heads N",
        ),
        (
            "serve",
            "width 48 is not in the size table; pass num_heads=",
            "vitkit convert SRC DST --num-heads N",
        ),
        ("convert", "a classifier (SiglipVisionModel has none; load with num_classes=0)", "--num-classes 0"),
        ("export", "a classifier (SiglipVisionModel has none; load with num_classes=0)", "num_classes=0), "),
    ],
)
def test_advice_names_what_the_command_can_do(command, message, advice):
    line = one_line(ValueError(message), PARSERS[command])
    assert advice in line, line
    assert "pass num_heads=" not in line and "load with num_classes=0" not in line
