"""The Ray Serve deployment of `vitkit serve` on a local Ray instance: the same answers and errors."""

from __future__ import annotations

import asyncio
import socket

import pytest

from serve_helpers import make_checkpoints, reference

ray = pytest.importorskip(
    "ray", reason="the Ray Serve deployment needs the ray extra: pip install 'vitkit[ray]'"
)
httpx = pytest.importorskip(
    "httpx", reason="the serving tests need the serve extra: pip install 'vitkit[serve]'"
)
# Ray's own configuration classes use pydantic features that pydantic 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


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
            checkpoints.base, checkpoints.deltas, max_batch=8, batch_timeout_ms=20,
            ray_actor_options={"num_cpus": 1},
        )  # fmt: skip
        serve.run(app, name="vitkit", route_prefix="/")
        yield f"http://127.0.0.1:{port}", checkpoints
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_answers_as_the_python_api(ray_server):
    url, checkpoints = ray_server
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["server"] == "ray serve" and set(health["tasks"]) == {"base", "pets", "wide"}
    image = checkpoints.images["wide"]

    async def send_all():
        async with httpx.AsyncClient(timeout=60) as client:
            requests = [
                client.post(
                    f"{url}/predict",
                    params={"task": task, "top_k": 2},
                    content=image.read_bytes(),
                    headers={"content-type": "image/png"},
                )  # fmt: skip
                for task in ("base", "pets", "wide") * 4
            ]
            return await asyncio.gather(*requests)

    for index, response in enumerate(asyncio.run(send_all())):
        task = ("base", "pets", "wide")[index % 3]
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = reference(checkpoints, task, image, 2)
        assert answer["task"] == task and [p["label"] for p in answer["predictions"]] == [
            e[0] for e in expected
        ]
        for got, (_, probability) in zip(answer["predictions"], expected, strict=True):
            assert abs(got["probability"] - probability) < 1e-5
    bad = httpx.post(f"{url}/predict", content=b"garbage", headers={"content-type": "image/png"}, timeout=30)
    assert bad.status_code == 400 and "not a decodable image" in bad.json()["error"]
    unknown = httpx.post(f"{url}/predict", params={"task": "nope"}, content=image.read_bytes(),
                         headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
    assert unknown.status_code == 404 and "unknown task 'nope'" in unknown.json()["error"]
