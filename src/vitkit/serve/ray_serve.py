"""`vitkit serve` as a Ray Serve deployment: the very FastAPI app of `vitkit.serve.app`, as its ingress.

    from ray import serve
    from vitkit.serve.ray_serve import deployment

    serve.run(deployment("base.safetensors", {"pets": "pets_delta.safetensors"}, max_batch=32))
    # POST http://127.0.0.1:8000/predict, /v1/embeddings; GET /health, /ready, /metrics, /v1/models, /docs

Each replica builds the app once it starts (`@serve.ingress` of a builder function: Ray 2.47 or
newer, ray-project/ray#52892): the TaskSet (the trunk once, every task's delta), the routes, limits,
errors, API key and metrics of `create_app`, and its `TaskBatcher`, which batches each task's
predictions and embeddings inside the replica. Ray runs the app's lifespan: the replica warms up before /ready answers 200 and drains its
batcher when it stops. Scale out with `deployment(..., num_replicas=4)` or Ray's autoscaling options,
passed through to `serve.deployment`; each replica's /metrics counts its own requests.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_SHUTDOWN_TIMEOUT_S, create_app
from .tasks import DEFAULT_MAX_PIXELS, Backend, TaskSet

DEPLOYMENT_NAME = "vitkit"


def deployment(
    checkpoint: str | os.PathLike,
    deltas: dict[str, str | os.PathLike] | None = None,
    *,
    backend: Backend = "torch",
    max_batch: int = 32,
    batch_timeout_ms: float = 5.0,
    num_workers: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    **options: Any,
) -> Application:
    """The Ray Serve application of a checkpoint and its task deltas; `options` go to
    `serve.deployment` (num_replicas, ray_actor_options, autoscaling_config, ...).
    `max_ongoing_requests` defaults to twice `max_batch` (Ray's own default, 5, would cap every
    batch at 5 requests)."""
    checkpoint = str(checkpoint)
    deltas = {name: str(path) for name, path in (deltas or {}).items()}

    def build_app() -> FastAPI:  # runs in each replica, after Ray starts it
        tasks = TaskSet(checkpoint, deltas, backend=backend, max_pixels=max_pixels)
        return create_app(
            tasks,
            max_batch=max_batch,
            batch_timeout_ms=batch_timeout_ms,
            num_workers=num_workers,
            max_body_bytes=max_body_bytes,
            api_key=api_key,
            shutdown_timeout_s=shutdown_timeout_s,
            server="ray serve",
        )

    options = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": 2 * max_batch,
        "graceful_shutdown_timeout_s": shutdown_timeout_s,
        **options,
    }
    return serve.deployment(serve.ingress(build_app)(), **options).bind()
