"""`vitkit serve` as a Ray Serve deployment: the same TaskSet and request handling, batched by `@serve.batch`.

    from ray import serve
    from vitkit.serve.ray_serve import deployment

    serve.run(deployment("base.safetensors", {"pets": "pets_delta.safetensors"}, max_batch=32))
    # POST http://127.0.0.1:8000/predict, GET /health: the API of vitkit.serve.app

Each replica holds the trunk once and every task's delta. `@serve.batch` gathers requests of all
tasks into one call; the call splits them by task (tasks differ in resolution and head) and runs
each task's images as one batch. Scale out with `deployment(..., num_replicas=4)` or Ray's
autoscaling options, passed through to `.options()`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from .app import DEFAULT_MAX_BODY_BYTES, Service, error_response
from .tasks import DEFAULT_MAX_PIXELS, Backend, TaskSet


@serve.deployment
class VitkitDeployment:
    """One replica: the TaskSet, the HTTP handling of `vitkit serve`, and Ray's batching."""

    def __init__(
        self,
        checkpoint: str,
        deltas: dict[str, str] | None = None,
        backend: Backend = "torch",
        max_batch: int = 32,
        batch_timeout_ms: float = 5.0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.tasks = TaskSet(checkpoint, deltas, backend=backend, max_pixels=max_pixels)
        self.service = Service(self.tasks, self.submit, max_body_bytes)
        self.batching = {"max_batch": max_batch, "batch_timeout_ms": batch_timeout_ms, "workers": 1}
        self.run_batch.set_max_batch_size(max_batch)
        self.run_batch.set_batch_wait_timeout_s(batch_timeout_ms / 1000)

    async def submit(self, task: str, image: torch.Tensor) -> torch.Tensor:
        result = await self.run_batch(task, image)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run_batch(self, tasks: list[str], images: list[torch.Tensor]) -> list[Any]:
        """Requests of any tasks -> each one's probabilities (or its error), in order."""
        results: list[Any] = [None] * len(tasks)
        for name in dict.fromkeys(tasks):
            rows = [index for index, task in enumerate(tasks) if task == name]
            task = self.tasks.tasks[name]
            try:
                batch = torch.stack([images[index] for index in rows])
                outputs = await asyncio.to_thread(self.tasks.run, task, batch)
                for index, output in zip(rows, outputs, strict=True):
                    results[index] = output
            except Exception:  # one bad request must not fail the others: run them alone
                for index in rows:
                    try:
                        results[index] = (await asyncio.to_thread(self.tasks.run, task, images[index][None]))[
                            0
                        ]
                    except Exception as error:
                        results[index] = error
        return results

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if path.endswith("/predict") and request.method == "POST":
            return await self.service.predict(request)
        if path.endswith("/health") and request.method == "GET":
            return self.service.health({"batching": self.batching, "server": "ray serve"})
        return error_response(
            404, f"{request.method} {request.url.path}: Not Found (POST /predict, GET /health)"
        )


def deployment(
    checkpoint: str | os.PathLike,
    deltas: dict[str, str | os.PathLike] | None = None,
    *,
    backend: Backend = "torch",
    max_batch: int = 32,
    batch_timeout_ms: float = 5.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **options: Any,
) -> Application:
    """The Ray Serve application of a checkpoint and its task deltas; `options` go to
    `VitkitDeployment.options` (num_replicas, ray_actor_options, autoscaling_config, ...)."""
    bound = VitkitDeployment.options(**options) if options else VitkitDeployment
    return bound.bind(
        str(checkpoint),
        {name: str(path) for name, path in (deltas or {}).items()},
        backend=backend,
        max_batch=max_batch,
        batch_timeout_ms=batch_timeout_ms,
        max_pixels=max_pixels,
        max_body_bytes=max_body_bytes,
    )
