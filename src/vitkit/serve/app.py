"""The HTTP API of `vitkit serve`, on FastAPI: `POST /predict`, `POST /v1/embeddings`, `GET /v1/models`,
`GET /health` (alive), `GET /ready`, `GET /metrics` (Prometheus), `/docs` and `/openapi.json`.

    curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/predict?task=pets&top_k=3'
    curl -F image=@cat.jpg http://127.0.0.1:8000/predict

`/predict` takes the image as the body (`Content-Type: image/*`) or as the multipart field `image`,
and the query parameters `task` (default: the base, or the only task) and `top_k` (default 5, or
every class if fewer; 1..classes). It answers `{"task": ..., "predictions": [{"label": ...,
"probability": ...}, ...]}`, most likely first. A bad request gets `{"error": ...}` naming the problem:
415 for a body that is not an image type, 400 for bytes that do not decode, 404 for an unknown task,
413 for a body over the size limit or an image over the pixel limit, 422 for a bad `top_k`.

`/v1/embeddings` takes OpenAI's shape, `{"input": [base64 image, ...], "model": task name (default: the
base)}`, and answers `{"object": "list", "data": [{"object": "embedding", "index": i, "embedding":
[...]}], "model": ...}`: the pooled features the head would see, in that model's preprocessing, each
input image batched with those of other requests for the same model; 415
for a body that is not JSON, 400 for bad JSON, base64 or image bytes, 422 for a badly shaped body.
`/v1/models` lists the tasks with the SHA-256 of the base and delta files, preprocessing and classes.

`/ready` answers 503 until every task has run a warm-up batch, and again once shutdown begins; with an
API key, every request but `/health` and `/ready` needs `Authorization: Bearer <key>` (else 401).

`Service` holds the request handling (limits, decoding, errors); `create_app` puts one `TaskBatcher`
behind it, keyed by (kind, task): `/predict` and `/v1/embeddings` are both batched. At shutdown the
app's lifespan drains the batcher (every submitted image answered, new ones refused with 503); the
Ray Serve deployment (`vitkit.serve.ray_serve`) serves this same app.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..data.datasets import BadImageError, ImageTooLargeError
from .batcher import BatcherClosedError, TaskBatcher
from .metrics import ServeMetrics
from .tasks import BASE_TASK, EMBED, PREDICT, Kind, TaskSet, UnknownTaskError, top_k

DEFAULT_MAX_BODY_BYTES = 20 << 20
DEFAULT_TOP_K = 5
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
MAX_EMBEDDING_INPUTS = 64
OPEN_PATHS = frozenset({"/health", "/ready"})  # answered without the API key
TASK_SCOPE_KEY = "vitkit.task"  # the request's task, for the metrics' label
log = logging.getLogger(__name__)

BatchKey = tuple[Kind, str]  # (what the batch computes, the task's name)
Submit = Callable[[BatchKey, torch.Tensor], Awaitable[torch.Tensor]]


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
    """Request handling over a TaskSet; `submit((kind, task_name), image)` runs one prepared image."""

    def __init__(self, tasks: TaskSet, submit: Submit, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.tasks = tasks
        self.submit = submit
        self.max_body_bytes = max_body_bytes

    async def predict(self, request: Request) -> JSONResponse:
        return await self._answer(self._predict, request)

    async def embeddings(self, request: Request) -> JSONResponse:
        return await self._answer(self._embeddings, request)

    async def _answer(
        self, handle: Callable[[Request], Awaitable[JSONResponse]], request: Request
    ) -> JSONResponse:
        """`handle(request)`, a client's mistake answered with its status and message."""
        try:
            return await handle(request)
        except RequestError as error:
            return error_response(error.status, error.message)
        except UnknownTaskError as error:
            return error_response(404, str(error.args[0]))
        except ImageTooLargeError as error:
            return error_response(413, f"image over the pixel limit: {error.reason}")
        except BadImageError as error:
            return error_response(400, f"not a decodable image: {error.reason}")
        except BatcherClosedError as error:
            return error_response(503, str(error))

    async def _predict(self, request: Request) -> JSONResponse:
        self._check_length(request)
        task = self.tasks.task(request.query_params.get("task"))
        request.scope[TASK_SCOPE_KEY] = task.name
        k = parse_top_k(request.query_params.get("top_k"), len(task.classes))
        data = await self._image_bytes(request)
        image = await run_in_threadpool(self.tasks.prepare, task, data)
        probabilities = await self.submit((PREDICT, task.name), image)
        return JSONResponse({"task": task.name, "predictions": top_k(task, probabilities, k)})

    async def _embeddings(self, request: Request) -> JSONResponse:
        self._check_length(request)
        inputs, name = await self._embedding_request(request)
        name = name or BASE_TASK
        _, transform = self.tasks.embedding_model(name)
        request.scope[TASK_SCOPE_KEY] = name

        def prepare() -> list[torch.Tensor]:
            return [
                transform(self.tasks.decode(data, f"input[{index}]"), None)
                for index, data in enumerate(inputs)
            ]

        # Every input is decoded before any is submitted: a bad one fails the request alone.
        images = await run_in_threadpool(prepare)
        features = await asyncio.gather(*(self.submit((EMBED, name), image) for image in images))
        data = [
            {"object": "embedding", "index": index, "embedding": row.tolist()}
            for index, row in enumerate(features)
        ]
        return JSONResponse({"object": "list", "data": data, "model": name})

    async def _embedding_request(self, request: Request) -> tuple[list[bytes], str | None]:
        """The JSON body -> (the decoded base64 inputs, the model's name or None)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise RequestError(415, f"Content-Type {media or '(none)'!r}: send application/json")
        try:
            body = json.loads(await self._read_body(request))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(422, 'expected a JSON object {"input": [base64 image, ...], "model": ...}')
        inputs, name = body.get("input"), body.get("model")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
            raise RequestError(422, "'input': expected a base64 image string or a non-empty list of them")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise RequestError(
                422, f"'input': {len(inputs)} images, over the limit of {MAX_EMBEDDING_INPUTS}"
            )
        if name is not None and not isinstance(name, str):
            raise RequestError(422, "'model': expected a task name")
        decoded = []
        for index, item in enumerate(inputs):
            try:
                decoded.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(400, f"input[{index}]: not base64") from None
        return decoded, name

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


class Observed:
    """ASGI middleware: the API key's check and each request's metrics (status, latency, in flight)."""

    def __init__(self, app, metrics: ServeMetrics, endpoints: frozenset[str], api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        status = 500
        start = time.perf_counter()

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if self._authorized(scope):
                await self.app(scope, receive, record_status)
            else:
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            task = scope.get(TASK_SCOPE_KEY, "")
            self.metrics.observe_request(endpoint, task, status, time.perf_counter() - start)

    def _authorized(self, scope) -> bool:
        if self.expected is None or scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)


def warm_up(tasks: TaskSet) -> None:
    """One batch of one blank image through every task and the base's features: the first request
    then pays no first-call costs."""
    for task in tasks.tasks.values():
        tasks.run(task, torch.zeros(1, 3, *task.img_size))
    tasks.embed(tasks.base, torch.zeros(1, 3, *tasks.base.config.img_size))


def create_app(
    tasks: TaskSet,
    max_batch: int = 32,
    batch_timeout_ms: float = 5.0,
    num_workers: int = 1,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_ready: Callable[[], None] | None = None,
    api_key: str | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    server: str = "vitkit serve",
) -> FastAPI:
    """The FastAPI app of `tasks`, each task's predictions and embeddings batched dynamically
    (`max_batch=1`: none); with `api_key`, requests but /health and /ready need `Authorization:
    Bearer <api_key>`. At shutdown /ready turns 503 and the batcher answers what it holds, waiting
    at most `shutdown_timeout_s`; `server` names what runs the app in /health."""
    metrics = ServeMetrics()
    batcher: TaskBatcher[BatchKey] = TaskBatcher(
        lambda key, images: tasks.compute(*key, images),
        max_batch=max_batch,
        timeout_s=batch_timeout_ms / 1000,
        num_workers=num_workers,
        on_batch=metrics.observe_batch,
    )
    service = Service(tasks, batcher.submit, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(warm_up, tasks)
        app.state.ready = True
        if on_ready is not None:
            on_ready()
        yield
        app.state.ready = False
        await batcher.close(shutdown_timeout_s)

    app = FastAPI(title="vitkit serve", lifespan=lifespan)
    app.state.ready = False  # set by the lifespan once warm, cleared (also by the server) at shutdown
    app.state.service = service
    app.state.batcher = batcher
    app.state.metrics = metrics
    batching = {"max_batch": max_batch, "batch_timeout_ms": batch_timeout_ms, "workers": num_workers}
    add_routes(app, service, batching, server)
    add_error_handlers(app)
    endpoints = frozenset(route.path for route in app.routes)
    app.add_middleware(Observed, metrics=metrics, endpoints=endpoints, api_key=api_key)
    return app


def add_routes(app: FastAPI, service: Service, batching: dict[str, Any], server: str) -> None:
    batcher: TaskBatcher = app.state.batcher
    metrics: ServeMetrics = app.state.metrics

    @app.post("/predict")
    async def predict(request: Request):
        return await service.predict(request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await service.embeddings(request)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(service.tasks.describe_models())

    @app.get("/health")
    async def health():
        sizes = {str(size): count for size, count in sorted(batcher.batch_sizes.items())}
        state = {**batching, "batch_sizes": sizes, "pending": batcher.num_pending}
        return service.health({"server": server, "batching": state})

    @app.get("/ready")
    async def ready():
        if app.state.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready: warming up or shutting down"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)


def add_error_handlers(app: FastAPI) -> None:
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
