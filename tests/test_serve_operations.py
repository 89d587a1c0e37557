"""What operators ask of `vitkit serve`, against a server subprocess: readiness, Prometheus metrics
that move with requests, the OpenAPI pages, the model list with the files' SHA-256, OpenAI-shaped
embeddings equal to the Python API and batched across requests, and the optional API key; the app
in process for readiness."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest
import torch
from PIL import Image

from serve_helpers import embeddings_reference, make_checkpoints, metric, start_server, stop_server

httpx = pytest.importorskip(
    "httpx", reason="the serving tests need the serve extra: pip install 'vitkit[serve]'"
)
pytest.importorskip("fastapi", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")
pytest.importorskip("prometheus_client", reason="/metrics needs the serve extra: pip install 'vitkit[serve]'")

API_KEY = "test-key-3141"
KEY_ENV = "VITKIT_TEST_SERVE_KEY"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("serve_ops"))


@pytest.fixture(scope="module")
def server(checkpoints, monkeypatch_module):
    monkeypatch_module.setenv(KEY_ENV, API_KEY)
    tasks = [f"--task={name}={path}" for name, path in checkpoints.deltas.items()]
    process, url = start_server(
        str(checkpoints.base), *tasks, "--api-key-env", KEY_ENV, "--batch-timeout-ms", "20"
    )
    yield url
    stderr = stop_server(process)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert API_KEY not in stderr


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def encoded(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_and_ready_need_no_key_the_rest_does(server):
    assert httpx.get(f"{server}/health").status_code == 200
    ready = httpx.get(f"{server}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
        refused = httpx.get(f"{server}{path}")
        assert refused.status_code == 401 and "API key" in refused.json()["error"], path
        assert httpx.get(f"{server}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server}{path}", headers=AUTH).status_code == 200, path


def test_docs_and_openapi_list_the_routes(server):
    assert "swagger" in httpx.get(f"{server}/docs", headers=AUTH).text.lower()
    paths = httpx.get(f"{server}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/predict", "/v1/embeddings", "/v1/models", "/ready", "/metrics"} <= set(paths)


def test_models_give_the_sha256_of_the_files(server, checkpoints):
    listing = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    base_sha = hashlib.sha256(checkpoints.base.read_bytes()).hexdigest()
    assert listing["base"]["sha256"] == base_sha
    models = {entry["id"]: entry for entry in listing["data"]}
    assert set(models) == {"base", "pets", "wide"}
    for name, path in checkpoints.deltas.items():
        assert models[name]["base_sha256"] == base_sha
        assert models[name]["delta_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert models["base"]["delta_sha256"] is None
    assert models["pets"]["classes"] == ["tabby", "terrier", "goldfish"]
    assert "crop 32x32" in models["base"]["preprocessing"] and models["wide"]["img_size"] == [48, 48]


@pytest.mark.parametrize("task", [None, "wide"])
def test_embeddings_equal_the_python_api(server, checkpoints, task):
    images = list(checkpoints.images.values())
    body = {"input": [encoded(path) for path in images], **({"model": task} if task else {})}
    response = httpx.post(f"{server}/v1/embeddings", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "list" and answer["model"] == (task or "base")
    assert [item["index"] for item in answer["data"]] == list(range(len(images)))
    assert all(item["object"] == "embedding" for item in answer["data"])
    expected = embeddings_reference(checkpoints, task, images)
    got = torch.tensor([item["embedding"] for item in answer["data"]])
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


def test_concurrent_embeddings_are_batched_across_requests(server, checkpoints):
    """24 requests at once, of three models, one image each (every eighth all three): each answer
    equals the Python API, and the embeddings' batches (counted per task, kind "embed") held images
    of several requests."""
    images = list(checkpoints.images.values())
    models = [None, "wide", "pets"]
    expected = {task: embeddings_reference(checkpoints, task, images) for task in models}
    before = httpx.get(f"{server}/metrics", headers=AUTH).text

    async def send_all():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=24)) as client:

            async def one(n: int):
                task = models[n % 3]
                indices = [0, 1, 2] if n % 8 == 0 else [n % 3]
                body = {"input": [encoded(images[i]) for i in indices], **({"model": task} if task else {})}
                response = await client.post(f"{server}/v1/embeddings", json=body, headers=AUTH)
                return task, indices, response

            return await asyncio.gather(*(one(n) for n in range(24)))

    answers = asyncio.run(send_all())
    for task, indices, response in answers:
        assert response.status_code == 200, response.text
        got = torch.tensor([item["embedding"] for item in response.json()["data"]])
        assert torch.allclose(got, expected[task][indices], atol=1e-5), (task, indices)
    after = httpx.get(f"{server}/metrics", headers=AUTH).text

    def moved(name: str, task: str) -> float:
        labels = {"task": task, "kind": "embed"}
        return metric(after, name, **labels) - metric(before, name, **labels)

    images_sent = {task or "base": 0 for task in models}
    for task, indices, _ in answers:
        images_sent[task or "base"] += len(indices)
    for task, count in images_sent.items():
        assert moved("vitkit_batch_size_sum", task) == count, task  # every image went through a batch
        assert moved("vitkit_queue_seconds_count", task) == count, task
    batches = sum(moved("vitkit_batch_size_count", task) for task in images_sent)
    assert batches < len(answers)  # fewer batches than requests: requests shared batches
    assert metric(after, "vitkit_batch_size_count", task="pets", kind="predict") == metric(
        before, "vitkit_batch_size_count", task="pets", kind="predict"
    )  # embeddings are counted apart from predictions


@pytest.mark.parametrize(
    "body, content_type, status",
    [
        ('{"input": ["!!not base64!!"]}', "application/json", 400),
        ('{"input": ["' + base64.b64encode(b"not an image").decode() + '"]}', "application/json", 400),
        ("{not json", "application/json", 400),
        ('{"input": []}', "application/json", 422),
        ('{"input": [3]}', "application/json", 422),
        ('["a"]', "application/json", 422),
        ('{"input": ["aGk="], "model": "nope"}', "application/json", 404),
        ('{"input": ["aGk="]}', "text/plain", 415),
    ],
)
def test_bad_embedding_requests_get_their_4xx(server, body, content_type, status):
    response = httpx.post(
        f"{server}/v1/embeddings", content=body, headers={**AUTH, "content-type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]


def test_metrics_move_with_requests(server, checkpoints):
    def scrape() -> str:
        response = httpx.get(f"{server}/metrics", headers=AUTH)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    image = checkpoints.images["wide"].read_bytes()
    for _ in range(3):
        headers = {**AUTH, "content-type": "image/png"}
        ok = httpx.post(f"{server}/predict", params={"task": "pets"}, content=image, headers=headers)
        assert ok.status_code == 200
    bad = httpx.post(
        f"{server}/predict",
        params={"task": "pets"},
        content=b"x",
        headers={**AUTH, "content-type": "text/plain"},
    )
    assert bad.status_code == 415
    assert (
        httpx.post(f"{server}/predict", content=image, headers={"content-type": "image/png"}).status_code
        == 401
    )
    after = scrape()
    ok_labels = {"endpoint": "/predict", "task": "pets", "status": "200"}
    assert (
        metric(after, "vitkit_requests_total", **ok_labels)
        - metric(before, "vitkit_requests_total", **ok_labels)
        == 3
    )
    bad_labels = {**ok_labels, "status": "415"}
    assert (
        metric(after, "vitkit_requests_total", **bad_labels)
        - metric(before, "vitkit_requests_total", **bad_labels)
        == 1
    )
    assert metric(after, "vitkit_requests_total", endpoint="/predict", task="", status="401") >= 1
    assert (
        metric(after, "vitkit_batch_size_count", task="pets", kind="predict")
        - metric(before, "vitkit_batch_size_count", task="pets", kind="predict")
        == 3
    )
    assert metric(after, "vitkit_queue_seconds_count", task="pets", kind="predict") >= 3
    assert metric(after, "vitkit_request_seconds_count", endpoint="/predict") >= 5
    assert metric(after, "vitkit_requests_in_flight") == 1  # the scrape itself


def test_ready_is_503_before_the_warm_up(checkpoints):
    from vitkit.serve.app import create_app
    from vitkit.serve.tasks import TaskSet

    app = create_app(TaskSet(checkpoints.base))

    async def ask() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the app has not warmed up
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            before = (await client.get("/ready")).status_code
            async with app.router.lifespan_context(app):
                during = (await client.get("/ready")).status_code
            after = (await client.get("/ready")).status_code
        return before, during, after

    assert asyncio.run(ask()) == (503, 200, 503)


def test_apps_keep_their_own_metrics(checkpoints):
    from vitkit.serve.app import create_app
    from vitkit.serve.tasks import TaskSet

    tasks = TaskSet(checkpoints.base)
    first, second = create_app(tasks), create_app(tasks)
    first.state.metrics.observe_request("/predict", "base", 200, 0.01)
    assert "vitkit_requests_total" in first.state.metrics.render().decode()
    assert metric(second.state.metrics.render().decode(), "vitkit_requests_total") == 0


def test_api_key_env_must_name_a_set_variable(checkpoints, capsys, monkeypatch):
    from vitkit.cli import main

    monkeypatch.delenv("VITKIT_TEST_UNSET_KEY", raising=False)
    assert main(["serve", str(checkpoints.base), "--api-key-env", "VITKIT_TEST_UNSET_KEY"]) == 2
    assert "VITKIT_TEST_UNSET_KEY is unset or empty" in capsys.readouterr().err


def test_a_file_changed_on_disk_after_loading_has_no_checksum(tmp_path):
    """The checksum is of what is served: taken when first asked for, from the file as it was at
    load; a file rewritten since gets none."""
    from serve_helpers import make_checkpoints
    from vitkit.serve.tasks import TaskSet

    checkpoints = make_checkpoints(tmp_path)
    tasks = TaskSet(checkpoints.base, dict(checkpoints.deltas))
    name, path = next(iter(checkpoints.deltas.items()))
    path.write_bytes(path.read_bytes() + b" ")
    models = {entry["id"]: entry for entry in tasks.describe_models()["data"]}
    assert models[name]["delta_sha256"] is None
    assert models[name]["base_sha256"] == hashlib.sha256(checkpoints.base.read_bytes()).hexdigest()


def test_a_hub_base_is_named_by_repo_revision_and_the_hubs_digests(tmp_path, monkeypatch):
    """A base loaded by Hub name: /v1/models gives its repo, resolved commit and the SHA-256 the Hub
    records for each weight file, and takes no checksum of the files in the cache; a local delta on
    top still gets its file's."""
    from serve_helpers import make_checkpoints
    from test_hub import COMMIT, cache_repo, hf_files, tiny_model
    from vitkit.serve import tasks as serve_tasks

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = hf_files(tiny_model(num_classes=3), tmp_path, classes=["tabby", "terrier", "goldfish"])
    cache_repo(cache, "someone/tiny-vit", files)
    weights_sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    hashed = []
    monkeypatch.setattr(serve_tasks, "file_sha256", lambda path: hashed.append(str(path)) or "local")

    listing = serve_tasks.TaskSet("hf-hub:someone/tiny-vit").describe_models()
    assert listing["base"]["checkpoint"] == f"hf-hub:someone/tiny-vit@{COMMIT}"
    assert listing["base"]["sha256"] == {"model.safetensors": weights_sha}
    assert listing["base"]["hub"]["repo"] == "someone/tiny-vit"
    assert listing["base"]["hub"]["revision"] == COMMIT
    (model,) = listing["data"]
    assert model["base_sha256"] == {"model.safetensors": weights_sha} and model["delta_sha256"] is None
    assert model["base_hub"] == listing["base"]["hub"] and model["classes"] == [
        "tabby",
        "terrier",
        "goldfish",
    ]
    assert hashed == []  # nothing read again from the cache

    local = make_checkpoints(tmp_path / "local")
    listing = serve_tasks.TaskSet(local.base).describe_models()
    assert listing["base"]["checkpoint"] == str(local.base) and listing["base"]["hub"] is None
    assert listing["base"]["sha256"] == "local" and hashed == [str(local.base)]


def test_the_server_computes_in_the_precision_asked_and_says_so(checkpoints):
    """bf16 serving (what "auto" takes where bf16 measured fastest): the same top class as fp32, the
    probabilities within bf16 rounding, and /health naming the precision."""
    import io

    from vitkit.serve.tasks import TaskSet

    image = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 160, 40)).save(image, format="PNG")
    answers = {}
    for precision in ("fp32", "bf16"):
        tasks = TaskSet(checkpoints.base, precision=precision)
        assert tasks.describe()["precision"] == precision
        task = tasks.task(None)
        batch = tasks.prepare(task, image.getvalue())[None]
        answers[precision] = tasks.run(task, batch)
        assert answers[precision].dtype == torch.float32
    assert answers["bf16"].argmax() == answers["fp32"].argmax()
    assert (answers["bf16"] - answers["fp32"]).abs().max() < 0.02
    with pytest.raises(ValueError, match="the onnx backend runs fp32 graphs"):
        TaskSet(checkpoints.base, backend="onnx", precision="bf16")
