"""The fault suite as a table: each hostile input, what vitkit did, its wall time and peak memory.

    PYTHONPATH=src .venv/bin/python benchmarks/faults_table.py          # runs tests/test_faults.py
    PYTHONPATH=src .venv/bin/python benchmarks/faults_table.py --from results.json

Runs `tests/test_faults.py` with `VITKIT_FAULTS_TABLE` set, then prints one Markdown row per case.
Each case runs in a process forked from a server that has imported torch and vitkit (tests/
fault_runner.py) under RLIMIT_AS 2 GiB: "peak RSS" is that process's `ru_maxrss`, which includes the
~300 MB the import leaves resident; "added" is the rise above it, what the case itself allocated.
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


def run_suite(table: Path) -> int:
    env = {**os.environ, "VITKIT_FAULTS_TABLE": str(table)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py"]
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
    parser.add_argument("--from", dest="source", default=None, help="a results JSON written by the suite")
    args = parser.parse_args()
    print(f"# {machine_summary()}\n")
    if args.source:
        results = json.loads(Path(args.source).read_text())
    else:
        with tempfile.TemporaryDirectory() as scratch:
            table = Path(scratch) / "faults.json"
            code = run_suite(table)
            results = json.loads(table.read_text()) if table.exists() else []
            if code:
                print(f"tests/test_faults.py exited {code}", file=sys.stderr)
    print(markdown(results))


if __name__ == "__main__":
    main()
