"""The Ray Serve deployment of `vitkit serve` on a local Ray instance: the FastAPI app's routes, answers
and errors. Skipped with its reason where Ray is not installed (the `ray` extra)."""

from __future__ import annotations

import asyncio
import base64
import re
import socket

import pytest
import torch

from serve_helpers import embeddings_reference, make_checkpoints, reference

ray = pytest.importorskip(
    "ray", reason="the Ray Serve deployment needs the ray extra: pip install 'vitkit[ray]'"
)
httpx = pytest.importorskip(
    "httpx", reason="the serving tests need the serve extra: pip install 'vitkit[serve]'"
)
# Ray's own configuration classes use pydantic features that pydantic 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
API_KEY = "ray-test-key-2718"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    from ray import serve

    from vitkit.serve.ray_serve import deployment

    checkpoints = make_checkpoints(tmp_path_factory.mktemp("ray"))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(
            checkpoints.base, checkpoints.deltas, max_batch=8, batch_timeout_ms=20, api_key=API_KEY,
            ray_actor_options={"num_cpus": 1},
        )  # fmt: skip
        serve.run(app, name="vitkit", route_prefix="/")
        yield f"http://127.0.0.1:{port}", checkpoints
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_has_the_routes_of_the_fastapi_app(ray_server):
    from vitkit.serve.app import create_app
    from vitkit.serve.tasks import TaskSet

    url, checkpoints = ray_server
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["server"] == "ray serve" and set(health["tasks"]) == {"base", "pets", "wide"}
    assert httpx.get(f"{url}/ready", timeout=30).json()["status"] == "ready"
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the app's API key check
    served = set(httpx.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()["paths"])
    local = set(create_app(TaskSet(checkpoints.base)).openapi()["paths"])
    assert served == local and {"/predict", "/v1/embeddings", "/v1/models", "/metrics"} <= served
    models = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()
    assert [entry["id"] for entry in models["data"]] == ["base", "pets", "wide"]


def test_ray_serve_answers_as_the_python_api(ray_server):
    url, checkpoints = ray_server
    image = checkpoints.images["wide"]
    body = {"input": [base64.b64encode(image.read_bytes()).decode()], "model": "wide"}

    async def send_all():
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
            requests = [
                client.post(
                    f"{url}/predict",
                    params={"task": task, "top_k": 2},
                    content=image.read_bytes(),
                    headers={"content-type": "image/png"},
                )  # fmt: skip
                for task in ("base", "pets", "wide") * 4
            ]
            requests += [client.post(f"{url}/v1/embeddings", json=body) for _ in range(4)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(send_all())
    for index, response in enumerate(responses[:12]):
        task = ("base", "pets", "wide")[index % 3]
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = reference(checkpoints, task, image, 2)
        assert answer["task"] == task and [p["label"] for p in answer["predictions"]] == [
            e[0] for e in expected
        ]
        for got, (_, probability) in zip(answer["predictions"], expected, strict=True):
            assert abs(got["probability"] - probability) < 1e-5
    expected = embeddings_reference(checkpoints, "wide", [image])
    for response in responses[12:]:
        assert response.status_code == 200, response.text
        got = torch.tensor([item["embedding"] for item in response.json()["data"]])
        assert torch.allclose(got, expected, atol=1e-5)
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30).text
    assert re.search(r'vitkit_batch_size_count\{kind="embed",task="wide"\} [1-4]\.0', metrics), metrics
    assert re.search(r'vitkit_batch_size_count\{kind="predict",task="pets"\} [1-4]\.0', metrics)


def test_ray_serve_gives_the_apps_errors(ray_server):
    url, checkpoints = ray_server
    image = checkpoints.images["wide"].read_bytes()
    png = {**AUTH, "content-type": "image/png"}
    bad = httpx.post(f"{url}/predict", content=b"garbage", headers=png, timeout=30)
    assert bad.status_code == 400 and "not a decodable image" in bad.json()["error"]
    unknown = httpx.post(f"{url}/predict", params={"task": "nope"}, content=image, headers=png, timeout=30)
    assert unknown.status_code == 404 and "unknown task 'nope'" in unknown.json()["error"]
    not_json = httpx.post(
        f"{url}/v1/embeddings", content=b"{", headers={**AUTH, "content-type": "text/plain"}
    )
    assert not_json.status_code == 415
    missing = httpx.get(f"{url}/predictions", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
