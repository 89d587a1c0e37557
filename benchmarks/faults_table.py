"""The fault suite as a table: each hostile input, what vitkit did, its wall time and peak memory.

    PYTHONPATH=src .venv/bin/python benchmarks/faults_table.py          # runs both suites below
    PYTHONPATH=src .venv/bin/python benchmarks/faults_table.py --suite tests/test_faults_cli.py
    PYTHONPATH=src .venv/bin/python benchmarks/faults_table.py --from results.json

Runs each suite with `VITKIT_FAULTS_TABLE` set, then prints one Markdown row per case.
- `tests/test_faults.py` (hostile files): each case runs in a process forked from a server that has
  imported torch and vitkit (tests/fault_runner.py) under RLIMIT_AS 2 GiB.
- `tests/test_faults_cli.py` (the CLI's user-facing faults): each case is `python -m vitkit ...`.
"peak RSS" is the case's process `ru_maxrss`, which includes the ~300 MB the imports leave resident;
"added" is the rise above it (for the CLI suite, above `vitkit --version`), what the case allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vitkit.train.precision import machine_summary

ROOT = Path(__file__).resolve().parent.parent


SUITES = ("tests/test_faults.py", "tests/test_faults_cli.py")


def run_suite(suite: str, table: Path) -> int:
    env = {**os.environ, "VITKIT_FAULTS_TABLE": str(table)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", suite]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def markdown(results: list[dict]) -> str:
    rows = [
        "| case | outcome | wall (s) | peak RSS (MiB) | added (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        outcome = result.get("outcome") or f"exit {result['rc']}"
        if result["timed_out"]:
            outcome = "KILLED at the deadline (hung)"
        added = max(result["peak_rss_mib"] - result["base_rss_mib"], 0)
        outcome = outcome.replace("|", "/")
        rows.append(
            f"| {result['case']} | {outcome} | {result['wall_s']:.2f} | {result['peak_rss_mib']:.0f} | {added:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", default=None, help="a results JSON written by a suite")
    parser.add_argument(
        "--suite", action="append", choices=SUITES, default=None, help="run only this suite (repeatable)"
    )
    args = parser.parse_args()
    print(f"# {machine_summary()}\n")
    if args.source:
        results = json.loads(Path(args.source).read_text())
    else:
        results = []
        with tempfile.TemporaryDirectory() as scratch:
            for number, suite in enumerate(args.suite or SUITES):
                table = Path(scratch) / f"faults-{number}.json"
                code = run_suite(suite, table)
                results += json.loads(table.read_text()) if table.exists() else []
                if code:
                    print(f"{suite} exited {code}", file=sys.stderr)
    print(markdown(results))


if __name__ == "__main__":
    main()
