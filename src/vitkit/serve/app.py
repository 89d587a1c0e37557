"""The HTTP API of `vitkit serve`, on FastAPI: `POST /predict`, `GET /health`.

    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/predict?task=pets&top_k=3'
    curl -F image=@cat.jpg http://127.0.0.1:8000/predict

`/predict` takes the image as the body (`Content-Type: image/*`) or as the multipart field `image`,
and the query parameters `task` (default: the base, or the only task) and `top_k` (default 5, or
every class if fewer; 1..classes). It answers `{"task": ..., "predictions": [{"label": ...,
"probability": ...}, ...]}`, most likely first. A bad request gets `{"error": ...}` naming the problem:
415 for a body that is not an image type, 400 for bytes that do not decode, 404 for an unknown task,
413 for a body over the size limit or an image over the pixel limit, 422 for a bad `top_k`.

`Service` holds the request handling (limits, decoding, errors) apart from batching: `create_app`
puts a `TaskBatcher` behind it; the Ray Serve deployment (`vitkit.serve.ray_serve`) its `@serve.batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..data.datasets import BadImageError, ImageTooLargeError
from .batcher import TaskBatcher
from .tasks import TaskSet, UnknownTaskError, top_k

DEFAULT_MAX_BODY_BYTES = 20 << 20
DEFAULT_TOP_K = 5
log = logging.getLogger(__name__)

Submit = Callable[[str, torch.Tensor], Awaitable[torch.Tensor]]


class RequestError(Exception):
    """A client's mistake: the HTTP status and a message naming it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_top_k(value: str | None, num_classes: int) -> int:
    if value is None:
        return min(DEFAULT_TOP_K, num_classes)
    try:
        k = int(value)
    except ValueError:
        raise RequestError(422, f"top_k={value[:40]!r}: expected an integer 1..{num_classes}") from None
    if not 1 <= k <= num_classes:
        raise RequestError(422, f"top_k={k}: expected 1..{num_classes} (the task's classes)")
    return k


def _replay(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class Service:
    """Request handling over a TaskSet; `submit(task_name, image)` runs one prepared image."""

    def __init__(self, tasks: TaskSet, submit: Submit, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.tasks = tasks
        self.submit = submit
        self.max_body_bytes = max_body_bytes

    async def predict(self, request: Request) -> JSONResponse:
        try:
            self._check_length(request)
            task = self.tasks.task(request.query_params.get("task"))
            k = parse_top_k(request.query_params.get("top_k"), len(task.classes))
            data = await self._image_bytes(request)
            image = await run_in_threadpool(self.tasks.prepare, task, data)
        except RequestError as error:
            return error_response(error.status, error.message)
        except UnknownTaskError as error:
            return error_response(404, str(error.args[0]))
        except ImageTooLargeError as error:
            return error_response(413, f"image over the pixel limit: {error.reason}")
        except BadImageError as error:
            return error_response(400, f"the body is not a decodable image: {error.reason}")
        probabilities = await self.submit(task.name, image)
        return JSONResponse({"task": task.name, "predictions": top_k(task, probabilities, k)})

    def health(self, extra: dict[str, Any] | None = None) -> JSONResponse:
        return JSONResponse({"status": "ok", **self.tasks.describe(), **(extra or {})})

    def _check_length(self, request: Request) -> None:
        length = request.headers.get("content-length")
        if length is None:
            return
        if not length.strip().isdigit():
            raise RequestError(400, f"Content-Length {length[:40]!r} is not a number")
        if int(length) > self.max_body_bytes:
            raise RequestError(413, f"body of {int(length)} bytes, over the limit of {self.max_body_bytes}")

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(413, f"body over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _image_bytes(self, request: Request) -> bytes:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not (media.startswith("image/") or media == "multipart/form-data"):
            raise RequestError(
                415,
                f"Content-Type {media or '(none)'!r}: send the image as the body with an image/* type, "
                f"or as the multipart/form-data field 'image'",
            )
        body = await self._read_body(request)
        if media == "multipart/form-data":
            body = await self._multipart_image(request, body)
        if not body:
            raise RequestError(400, "empty body: no image")
        return body

    async def _multipart_image(self, request: Request, body: bytes) -> bytes:
        replay = Request(request.scope, receive=_replay(body))
        try:
            form = await replay.form(max_files=4, max_fields=16)
        except Exception as error:  # starlette's parser raises its HTTPException or MultiPartException
            detail = getattr(error, "detail", None) or getattr(error, "message", None) or error
            raise RequestError(400, f"malformed multipart body: {detail}") from None
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "the multipart body has no file field 'image'")
            return await upload.read()
        finally:
            await form.close()


def create_app(
    tasks: TaskSet,
    max_batch: int = 32,
    batch_timeout_ms: float = 5.0,
    num_workers: int = 1,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app of `tasks`, each task's requests batched dynamically (`max_batch=1`: none)."""
    batcher: TaskBatcher[str] = TaskBatcher(
        lambda name, images: tasks.run(tasks.tasks[name], images),
        max_batch=max_batch,
        timeout_s=batch_timeout_ms / 1000,
        num_workers=num_workers,
    )
    service = Service(tasks, batcher.submit, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        await batcher.close()

    app = FastAPI(title="vitkit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.batcher = batcher

    @app.post("/predict")
    async def predict(request: Request):
        return await service.predict(request)

    @app.get("/health")
    async def health():
        batching = {
            "max_batch": max_batch,
            "batch_timeout_ms": batch_timeout_ms,
            "workers": num_workers,
            "batch_sizes": {str(size): count for size, count in sorted(batcher.batch_sizes.items())},
        }
        return service.health({"batching": batching})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return error_response(422, str(error.errors())[:500])

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    return app
