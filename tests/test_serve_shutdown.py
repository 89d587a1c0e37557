"""Graceful shutdown of `vitkit serve`: at SIGTERM or SIGINT it stops accepting, answers every request
in flight (the batcher drains its queue), then exits 0; /ready answers 503 while it drains. A server
subprocess of a ViT-Ti/16 at 224 px answering one image at a time (slow enough to hold a queue), a
tiny one for the idle exit, and the app in process to watch the drain."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time

import pytest
import torch
from PIL import Image

import vitkit
from serve_helpers import make_checkpoints, metric, start_server, stop_server

httpx = pytest.importorskip(
    "httpx", reason="the serving tests need the serve extra: pip install 'vitkit[serve]'"
)
pytest.importorskip("fastapi", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")
pytest.importorskip("prometheus_client", reason="/metrics needs the serve extra: pip install 'vitkit[serve]'")

NUM_REQUESTS = 16
EXIT_BOUND_S = 60  # from the signal to the exit, on a busy 2-core machine


def jpeg(size: int = 64) -> bytes:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A ViT-Ti/16 at 224 px with random weights: about 20 ms an image on two CPU cores."""
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=4)
    return vitkit.save(model, tmp_path_factory.mktemp("shutdown") / "small.safetensors")


def test_sigterm_answers_every_request_in_flight_then_exits_0(small_checkpoint):
    process, url = start_server(
        str(small_checkpoint), "--max-batch", "1", "--shutdown-timeout", str(EXIT_BOUND_S), timeout=120
    )
    body = jpeg()

    async def scenario() -> tuple[list[tuple[int, float]], float, int]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS + 1)
        async with httpx.AsyncClient(timeout=EXIT_BOUND_S, limits=limits) as client:

            async def one() -> tuple[int, float]:
                headers = {"content-type": "image/jpeg"}
                response = await client.post(f"{url}/predict", content=body, headers=headers)
                return response.status_code, time.monotonic()

            sent = [asyncio.create_task(one()) for _ in range(NUM_REQUESTS)]
            # Every request has reached the app (in flight or answered) before the signal, so each
            # is one the server must finish; the scrape itself is one in flight.
            deadline = time.monotonic() + EXIT_BOUND_S
            while time.monotonic() < deadline:
                scraped = (await client.get(f"{url}/metrics")).text
                in_flight = metric(scraped, "vitkit_requests_in_flight") - 1
                answered = metric(
                    scraped, "vitkit_requests_total", endpoint="/predict", task="base", status="200"
                )
                if in_flight + answered >= NUM_REQUESTS:
                    break
                await asyncio.sleep(0.01)
            assert in_flight > 0, "every request was answered before the signal: nothing to drain"
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # uvicorn looks at its exit flag every 0.1 s
            with pytest.raises(httpx.ConnectError):  # a new connection is refused
                async with httpx.AsyncClient(timeout=5) as fresh:
                    await fresh.get(f"{url}/health")
            return await asyncio.gather(*sent), signalled, int(in_flight)

    try:
        answers, signalled, num_in_flight = asyncio.run(scenario())
        status = process.wait(timeout=EXIT_BOUND_S)
        exited = time.monotonic()
    finally:
        stderr = stop_server(process)
    assert [code for code, _ in answers] == [200] * NUM_REQUESTS, stderr[-3000:]
    assert sum(answered > signalled for _, answered in answers) >= 1  # answered while draining
    assert status == 0 and exited - signalled < EXIT_BOUND_S, (status, stderr[-3000:])
    assert "Traceback" not in stderr and "Cancel" not in stderr, stderr[-3000:]
    print(f"{num_in_flight} requests in flight at SIGTERM; exit 0 after {exited - signalled:.1f} s")


def test_sigint_exits_0_too(tmp_path):
    """Ctrl-C is a shutdown like SIGTERM: uvicorn would raise it again once shut down (a
    KeyboardInterrupt: "interrupted", exit status 130; SIGTERM: -15); vitkit serve exits 0."""
    checkpoints = make_checkpoints(tmp_path)
    process, url = start_server(str(checkpoints.base))
    assert httpx.get(f"{url}/ready").status_code == 200
    process.send_signal(signal.SIGINT)
    try:
        status = process.wait(timeout=30)
    finally:
        stderr = stop_server(process)
    assert status == 0 and "Traceback" not in stderr, (status, stderr[-3000:])


def test_shutdown_turns_ready_503_and_drains_the_batcher(tmp_path):
    """In process: a batch held in its worker thread and three requests queued behind it when the
    lifespan ends; /ready answers 503 and new requests 503 while the queue drains, and all four of
    the requests submitted before get their answers."""
    from vitkit.serve.app import create_app
    from vitkit.serve.tasks import TaskSet

    checkpoints = make_checkpoints(tmp_path)
    tasks = TaskSet(checkpoints.base)
    started, release = threading.Event(), threading.Event()
    compute = tasks.compute

    def held_compute(kind, name, images):
        started.set()
        release.wait(30)
        return compute(kind, name, images)

    tasks.compute = held_compute
    app = create_app(tasks, max_batch=1)
    png = checkpoints.images["wide"].read_bytes()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30) as client:

            def predict():
                return client.post("/predict", content=png, headers={"content-type": "image/png"})

            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            assert (await client.get("/ready")).status_code == 200
            sent = [asyncio.create_task(predict()) for _ in range(4)]
            while app.state.batcher.num_pending < 4 or not started.is_set():
                await asyncio.sleep(0.01)
            closing = asyncio.create_task(lifespan.__aexit__(None, None, None))
            await asyncio.sleep(0.05)
            during = (await client.get("/ready")).status_code, await predict()
            draining = not closing.done()
            release.set()
            answers = await asyncio.gather(*sent)
            await closing
            return during, draining, answers

    (ready_status, refused), draining, answers = asyncio.run(scenario())
    assert draining and ready_status == 503
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
    assert [answer.status_code for answer in answers] == [200] * 4
