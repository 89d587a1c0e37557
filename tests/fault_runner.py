"""The fault suite's runner: each hostile case in its own process, under a memory and a time limit.

A fork server: it imports torch and vitkit (and the CLI's lazy imports) once, then forks one child per request, so
each case costs milliseconds plus its own work. The child lowers RLIMIT_AS to the request's limit
(2 GiB by default; `import torch` needs about 1 GiB of address space, so what is left is what the case
may allocate) and runs the case; the server kills it with SIGKILL at the request's deadline, and
reports what happened with the child's own peak RSS from `wait4`.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
- request: {"argv": [...]} runs `vitkit.cli.main(argv)`; {"probe": NAME, "args": [...]} calls
  PROBES[NAME], which prints a JSON summary. Both take "timeout_s" and "memory_gib".
- reply: {"rc", "stdout", "stderr", "timed_out", "wall_s", "peak_rss_mib", "base_rss_mib"}; rc is the
  exit status (2: a one-line error, as the CLI gives; 1: an uncaught exception, traceback on stderr;
  -9: killed at the deadline).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import vitkit
import vitkit.cli
import vitkit.convert
import vitkit.delta
import vitkit.eval.classification
import vitkit.train
from vitkit.data.datasets import ImageFolder, ShardDataset
from vitkit.train.state import read_state

# Errors the CLI reports in one line (`vitkit.cli.main`); probes report them the same way.
ONE_LINE_ERRORS = (KeyError, ValueError, TypeError, FileNotFoundError)


def probe_imagefolder(root: str, on_bad: str = "skip", verify: str = "none") -> dict[str, Any]:
    folder = ImageFolder(root, on_bad=on_bad, verify=verify)
    return {"num_samples": len(folder), "bad_files": folder.bad_files}


def probe_shards(root: str) -> dict[str, Any]:
    return {"num_shards": len(ShardDataset(root).shard_files)}


def probe_load(path: str, **overrides: Any) -> dict[str, Any]:
    model = vitkit.load(path, **overrides)
    return {"num_params": sum(p.numel() for p in model.parameters())}


def probe_load_delta(base: str, delta: str) -> dict[str, Any]:
    return probe_load(base, delta=delta)


def probe_read_state(folder: str) -> dict[str, Any]:
    return {"step": read_state(folder).progress.step}


PROBES = {
    "imagefolder": probe_imagefolder,
    "shards": probe_shards,
    "load": probe_load,
    "load_delta": probe_load_delta,
    "read_state": probe_read_state,
}


def run_child(request: dict[str, Any], out_path: str, err_path: str) -> None:
    """In the forked child: redirect output, limit memory, run the case, exit with its status."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    limit = int(request.get("memory_gib", 2) * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    code = 1
    try:
        if "argv" in request:
            code = vitkit.cli.main(request["argv"])
        else:
            try:
                result = PROBES[request["probe"]](*request.get("args", []), **request.get("kwargs", {}))
                print(json.dumps(result, default=str))
                code = 0
            except ONE_LINE_ERRORS as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else error
                print(f"error: {message}", file=sys.stderr)
                code = 2
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_one(request: dict[str, Any], scratch: Path) -> dict[str, Any]:
    out_path, err_path = str(scratch / "stdout"), str(scratch / "stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    base_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        run_child(request, out_path, err_path)
    deadline = start + request.get("timeout_s", 30)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.002)
    wall_s = time.monotonic() - start
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "stdout": Path(out_path).read_text(errors="replace"),
        "stderr": Path(err_path).read_text(errors="replace"),
        "timed_out": timed_out,
        "wall_s": wall_s,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "base_rss_mib": base_rss_mib,
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vitkit-faults-") as scratch:
        for line in sys.stdin:
            reply = serve_one(json.loads(line), Path(scratch))
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
