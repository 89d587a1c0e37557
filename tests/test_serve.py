"""`vitkit serve` as a user runs it: one server subprocess on loopback for the module, a tiny base with
class names and two task deltas; answers equal to the Python API and `vitkit predict`, every bad input
its status code, 64 concurrent requests; the batcher and the upload decoder on their own."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
import torch
from PIL import Image

from serve_helpers import (
    BASE_CLASSES,
    make_checkpoints,
    png_header,
    reference,
    start_server,
    stop_server,
)
from vitkit.cli import main
from vitkit.data.datasets import BadImageError, ImageTooLargeError, decode_image, decode_image_bytes
from vitkit.serve import TaskBatcher

httpx = pytest.importorskip(
    "httpx", reason="the serving tests need the serve extra: pip install 'vitkit[serve]'"
)
pytest.importorskip("fastapi", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")

MAX_PIXELS = 10_000  # the server's --max-pixels: 100 x 100
MAX_BODY_MB = 0.25


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoints):
    tasks = [f"--task={name}={path}" for name, path in checkpoints.deltas.items()]
    process, url = start_server(
        str(checkpoints.base), *tasks, "--max-batch", "16", "--batch-timeout-ms", "20",
        "--max-pixels", str(MAX_PIXELS), "--max-body-mb", str(MAX_BODY_MB),
    )  # fmt: skip
    yield url
    stderr = stop_server(process)
    assert "Traceback" not in stderr, stderr[-3000:]


def post_image(url: str, path, **params) -> httpx.Response:
    return httpx.post(
        f"{url}/predict", params=params, content=path.read_bytes(), headers={"content-type": "image/png"}
    )


def assert_matches(answer: dict, task: str, expected: list[tuple[str, float]]) -> None:
    assert answer["task"] == task
    assert [p["label"] for p in answer["predictions"]] == [label for label, _ in expected]
    got = torch.tensor([p["probability"] for p in answer["predictions"]])
    assert torch.allclose(got, torch.tensor([p for _, p in expected]), atol=1e-5), (got, expected)


def test_health_names_every_task_and_model(server, checkpoints):
    health = httpx.get(f"{server}/health").json()
    assert health["default_task"] == "base" and set(health["tasks"]) == {"base", "pets", "wide"}
    assert health["tasks"]["pets"]["model"] == str(checkpoints.deltas["pets"])
    assert health["tasks"]["wide"]["img_size"] == [48, 48] and health["tasks"]["wide"]["num_classes"] == 7
    # A task holds only its delta: attention, head and positions, not the MLPs and norms of the trunk.
    assert health["tasks"]["pets"]["own_params"] < 0.5 * health["trunk_params"]
    assert "crop 32x32" in health["tasks"]["base"]["preprocessing"]


@pytest.mark.parametrize("task", ["base", "pets", "wide"])
def test_each_task_answers_as_the_python_api(server, checkpoints, task):
    for name, image in checkpoints.images.items():
        response = post_image(server, image, task=task, top_k=3)
        assert response.status_code == 200, response.text
        assert_matches(response.json(), task, reference(checkpoints, task, image, 3)), name
    # The multipart form; no task: the base; no top_k: 5 (the base has 5 classes), every class named.
    files = {"image": ("tall.png", checkpoints.images["tall"].read_bytes(), "image/png")}
    answer = httpx.post(f"{server}/predict", files=files).json()
    assert_matches(answer, "base", reference(checkpoints, "base", checkpoints.images["tall"], 5))
    assert sorted(p["label"] for p in answer["predictions"]) == sorted(BASE_CLASSES)


def test_base_answers_as_vitkit_predict(server, checkpoints, capsys):
    image = checkpoints.images["wide"]
    assert main(["predict", str(checkpoints.base), str(image), "--top-k", "3"]) == 0
    printed = re.findall(r"(\w+) (\d\.\d{3})", capsys.readouterr().out.split(": ", 1)[1])
    answer = post_image(server, image, top_k=3).json()["predictions"]
    assert len(printed) == 3
    assert [(p["label"], f"{p['probability']:.3f}") for p in answer] == printed


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(server, checkpoints):
    png = checkpoints.images["wide"].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (101, 100)).save(big, format="PNG")  # 10,100 pixels: over the limit, a tiny file
    url = f"{server}/predict"
    cases = [
        (415, "Content-Type 'text/plain'", dict(content=b"hello", headers={"content-type": "text/plain"})),
        (415, "Content-Type '(none)'", dict(content=png)),
        (400, "not a decodable image", dict(content=b"not a png", headers={"content-type": "image/png"})),
        (400, "not a decodable image", dict(content=png[:200], headers={"content-type": "image/png"})),
        (400, "empty body", dict(content=b"", headers={"content-type": "image/png"})),
        (400, "no file field 'image'", dict(files={"picture": ("x.png", png, "image/png")})),
        (404, "unknown task 'nope'", dict(content=png, headers={"content-type": "image/png"}, params={"task": "nope"})),
        (413, "over the limit of 10000", dict(content=big.getvalue(), headers={"content-type": "image/png"})),
        (413, "DecompressionBomb", dict(content=png_header(40_000, 40_000), headers={"content-type": "image/png"})),
        (413, "over the limit of 262144", dict(content=b"\0" * 300_000, headers={"content-type": "image/png"})),
        (422, "top_k=0", dict(content=png, headers={"content-type": "image/png"}, params={"top_k": 0})),
        (422, "top_k=6: expected 1..5", dict(content=png, headers={"content-type": "image/png"}, params={"top_k": 6})),
        (422, "top_k=4: expected 1..3", dict(content=png, headers={"content-type": "image/png"}, params={"top_k": 4, "task": "pets"})),
        (422, "top_k='many'", dict(content=png, headers={"content-type": "image/png"}, params={"top_k": "many"})),
    ]  # fmt: skip
    for status, fragment, request in cases:
        response = httpx.post(url, **request)
        assert response.status_code == status, (fragment, response.status_code, response.text)
        assert fragment in response.json()["error"], (fragment, response.json())
    missing = httpx.get(f"{server}/predictions")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(url).status_code == 405
    assert_matches(post_image(server, checkpoints.images["gray"], task="pets", top_k=2).json(), "pets",
                   reference(checkpoints, "pets", checkpoints.images["gray"], 2))  # fmt: skip


def test_64_concurrent_requests_of_mixed_tasks_are_batched_and_all_answered(server, checkpoints):
    tasks = ["base", "pets", "wide"]
    images = list(checkpoints.images.values())
    expected = {(t, i): reference(checkpoints, t, images[i], 2) for t in tasks for i in range(len(images))}
    before = httpx.get(f"{server}/health").json()["batching"]["batch_sizes"]

    async def send_all():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:

            async def one(n: int):
                task, index = tasks[n % 3], n % len(images)
                # Bad requests among the good ones must fail alone.
                body = b"garbage" if n % 16 == 5 else images[index].read_bytes()
                response = await client.post(
                    f"{server}/predict", params={"task": task, "top_k": 2}, content=body,
                    headers={"content-type": "image/png"},
                )  # fmt: skip
                return n, task, index, response

            return await asyncio.gather(*(one(n) for n in range(64)))

    for n, task, index, response in asyncio.run(send_all()):
        if n % 16 == 5:
            assert response.status_code == 400
        else:
            assert response.status_code == 200, response.text
            assert_matches(response.json(), task, expected[task, index])
    after = httpx.get(f"{server}/health").json()["batching"]["batch_sizes"]
    new_batches = {int(size): count - before.get(size, 0) for size, count in after.items()}
    assert sum(size * count for size, count in new_batches.items()) == 60
    assert max(size for size, count in new_batches.items() if count > 0) > 1  # requests shared a batch


def test_batcher_isolates_a_failing_request_and_respects_max_batch():
    seen: list[tuple[str, int]] = []

    def run(task: str, images: torch.Tensor) -> torch.Tensor:
        seen.append((task, len(images)))
        if (images == -1).any():
            raise ValueError("poisoned input")
        return images * 2

    async def scenario():
        batcher = TaskBatcher(run, max_batch=4, timeout_s=0.05)
        items = [("a", torch.tensor([float(i)])) for i in range(6)] + [("b", torch.tensor([-1.0]))]
        items += [("b", torch.tensor([7.0]))]
        results = await asyncio.gather(*(batcher.submit(t, x) for t, x in items), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [float(r) for r in results[:6]] == [0, 2, 4, 6, 8, 10]
    assert isinstance(results[6], ValueError) and float(results[7]) == 14
    # Per task, at most 4 at a time; task "b"'s batch of 2 failed, then each ran alone.
    assert sorted(seen) == [("a", 2), ("a", 4), ("b", 1), ("b", 1), ("b", 2)]
    with pytest.raises(ValueError, match="max_batch 0"):
        TaskBatcher(run, max_batch=0)


def test_decode_image_bytes_checks_like_decode_image(checkpoints):
    data = checkpoints.images["wide"].read_bytes()
    assert torch.equal(decode_image_bytes(data, max_pixels=2400), decode_image(checkpoints.images["wide"]))
    with pytest.raises(ImageTooLargeError, match="upload: 60x40 = 2400 pixels, over the limit of 2399"):
        decode_image_bytes(data, "upload", max_pixels=2399)
    for max_pixels in (None, 10**12):  # Pillow's own guard, with or without the caller's limit
        with pytest.raises(ImageTooLargeError, match="DecompressionBombError"):
            decode_image_bytes(png_header(40_000, 40_000), max_pixels=max_pixels)
    with pytest.raises(BadImageError, match="UnidentifiedImageError") as caught:
        decode_image_bytes(b"not an image", max_pixels=100)
    assert not isinstance(caught.value, ImageTooLargeError)


def test_serve_mistakes_are_one_line_errors(checkpoints, capsys):
    assert main(["serve", str(checkpoints.base), "--task", "pets"]) == 2
    assert "--task 'pets': expected NAME=DELTA" in capsys.readouterr().err
    assert main(["serve", str(checkpoints.base), "--task", f"base={checkpoints.deltas['pets']}"]) == 2
    assert "task name 'base' is taken" in capsys.readouterr().err
    assert main(["serve", str(checkpoints.base), "--task", f"x={checkpoints.base}"]) == 2
    assert "not a vitkit task delta" in capsys.readouterr().err
    assert main(["serve", str(checkpoints.base), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err


def test_onnx_backend_answers_as_torch(checkpoints):
    pytest.importorskip("onnxruntime", reason="the onnx backend needs the export extra")
    from vitkit.serve import TaskSet

    deltas = {"wide": checkpoints.deltas["wide"]}
    data = checkpoints.images["tall"].read_bytes()
    by_backend = {}
    for backend in ("torch", "onnx"):
        tasks = TaskSet(checkpoints.base, deltas, backend=backend)
        by_backend[backend] = {
            name: tasks.run(task, torch.stack([tasks.prepare(task, data)] * 2))
            for name, task in tasks.tasks.items()
        }
    for name in ("base", "wide"):
        assert torch.allclose(by_backend["onnx"][name], by_backend["torch"][name], atol=1e-5), name
