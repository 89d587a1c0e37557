"""`vitkit serve`: predictions over HTTP from one trunk and many task deltas, batched per task."""

from __future__ import annotations

import argparse
import json
import signal

from .common import PORT, POSITIVE, add_precision_arg


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the base: a run folder or any checkpoint `vitkit.load` reads")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=DELTA",
        help="serve a task delta (vitkit.delta.save_delta) on the base's trunk; repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=PORT, default=8000, help="port (0: any free one, printed at start)")
    parser.add_argument(
        "--max-batch", type=POSITIVE, default=32, help="largest batch of one task's requests (1: no batching)"
    )
    parser.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others of its task to join its batch",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: tasks share the trunk's tensors; onnx: each task an onnxruntime graph (a full model each)",
    )
    add_precision_arg(parser)
    parser.add_argument("--workers", type=POSITIVE, default=1, help="batches that run at once (threads)")
    parser.add_argument(
        "--max-pixels",
        type=POSITIVE,
        default=None,
        help="largest image accepted, width x height (default: 25,000,000)",
    )
    parser.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body, in MiB")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at SIGTERM or SIGINT, how long in-flight requests may take to finish before they are "
        "cancelled (default: 30)",
    )
    parser.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help="ask every request but /health and /ready for 'Authorization: Bearer <key>', the key read "
        "from this environment variable (default: none, no key asked)",
    )


def listening_socket(host: str, port: int):
    """A bound socket on (host, port), IPv4 or IPv6 as the host is spelt."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"--host {host} --port {port}: {error.strerror}") from error
    return sock


def api_key(name: str | None) -> str | None:
    """The key in environment variable `name` (never a command-line value: others could read it)."""
    if name is None:
        return None
    import os

    key = os.environ.get(name, "")
    if not key.strip():
        raise ValueError(f"--api-key-env {name}: the environment variable {name} is unset or empty")
    return key


def check_serve_args(args: argparse.Namespace, max_pixels: int) -> None:
    """The numeric options in range, before any file is read."""
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--workers", args.workers, 1)):
        if value < low:
            raise ValueError(f"{flag} {value}: expected >= {low}")
    if args.batch_timeout_ms < 0 or args.shutdown_timeout < 0 or args.max_body_mb <= 0 or max_pixels < 1:
        raise ValueError(
            "--batch-timeout-ms and --shutdown-timeout must be >= 0, --max-body-mb and --max-pixels positive"
        )


def run_serve(args: argparse.Namespace) -> int:
    """Serve predictions over HTTP: one trunk, many task deltas, dynamically batched per task."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as error:
        raise ValueError(
            f"vitkit serve needs FastAPI and uvicorn ({error}): pip install 'vitkit[serve]'"
        ) from error
    from ..serve.tasks import DEFAULT_MAX_PIXELS, TaskSet, parse_task_specs

    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    check_serve_args(args, max_pixels)
    key = api_key(args.api_key_env)
    specs = parse_task_specs(args.task)
    tasks = TaskSet(
        args.checkpoint, specs, backend=args.backend, max_pixels=max_pixels, precision=args.precision
    )
    sock = listening_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def ready() -> None:
        served = {
            "url": url,
            "tasks": list(tasks.tasks),
            "backend": args.backend,
            "precision": tasks.precision,
        }
        print(json.dumps(served), flush=True)

    app = create_app(
        tasks,
        max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms,
        num_workers=args.workers,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        on_ready=ready,
        api_key=key,
        shutdown_timeout_s=args.shutdown_timeout,
    )

    class Server(uvicorn.Server):
        """uvicorn's graceful shutdown (stop accepting, let in-flight requests finish, then the app's
        lifespan drains the batcher), ending in exit status 0: uvicorn would raise the signal
        again once shut down, and a SIGTERM so raised kills the process with status -15."""

        def handle_exit(self, sig: int, frame) -> None:
            app.state.ready = False  # /ready answers 503 from the first signal on
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
            self.should_exit = True

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=args.shutdown_timeout
    )
    Server(config).run(sockets=[sock])
    return 0
