"""What the serving tests share: a trained-like tiny checkpoint with class names, two task deltas,
test images, the Python API's reference answers, and a `vitkit serve` subprocess."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import vitkit
from helpers import tiny_config
from test_delta import attention_only_finetune
from vitkit.data import DataConfig, decode_image, eval_transform
from vitkit.delta import save_delta
from vitkit.eval.classification import CLASSES_KEY, load_classifier
from vitkit.eval.embed import pooled_features
from vitkit.files import read_weights
from vitkit.models.vit import VisionTransformer
from vitkit.train.state import model_metadata, write_weights

REPO = Path(__file__).resolve().parents[1]
BASE_CLASSES = ["apple", "bee", "cat", "dog", "eel"]
PETS_CLASSES = ["tabby", "terrier", "goldfish"]


@dataclass
class Checkpoints:
    base: Path
    deltas: dict[str, Path]
    images: dict[str, Path]


def make_checkpoints(folder: Path) -> Checkpoints:
    """A base trained at 32 px with class names and a "crop" eval transform, and two attention-only
    deltas: "pets" (3 named classes, 32 px) and "wide" (7 unnamed classes, 48 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = VisionTransformer(tiny_config()).eval()
    data = DataConfig(
        img_size=32, eval_resize="crop", crop_pct=0.8, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)
    )
    base_path = folder / "base.safetensors"
    write_weights(base_path, base.state_dict(), model_metadata(base.config, BASE_CLASSES, data.to_dict()))
    deltas = {}
    for name, seed, overrides in (
        ("pets", 1, {"num_classes": 3}),
        ("wide", 2, {"num_classes": 7, "img_size": 48}),
    ):
        task = attention_only_finetune(base, seed=seed, **overrides)
        deltas[name] = save_delta(task, base, folder / f"{name}.safetensors")
    # A delta may carry class names under the training checkpoints' key.
    tensors, metadata = read_weights(deltas["pets"])
    write_weights(deltas["pets"], tensors, {**metadata, CLASSES_KEY: json.dumps(PETS_CLASSES)})
    generator = torch.Generator().manual_seed(3)
    images = {}
    for name, (width, height) in {"wide": (60, 40), "tall": (30, 50), "gray": (41, 41)}.items():
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels)
        images[name] = folder / f"{name}.png"
        (image.convert("L") if name == "gray" else image).save(images[name])
    return Checkpoints(base_path, deltas, images)


def reference(checkpoints: Checkpoints, task: str, image: Path, k: int) -> list[tuple[str, float]]:
    """The Python API's answer: `vitkit.load` (with the delta), its eval transform, softmax, top-k."""
    if task == "base":
        model, classes, _ = load_classifier(checkpoints.base)
    else:
        model = vitkit.load(checkpoints.base, delta=checkpoints.deltas[task]).eval()
        classes = PETS_CLASSES if task == "pets" else [str(i) for i in range(model.config.num_classes)]
    inputs = eval_transform(model)(decode_image(image), None)[None]
    with torch.no_grad():
        probabilities = model(inputs).float().softmax(dim=-1)[0]
    values, indices = probabilities.topk(k)
    return [(classes[i], v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def embeddings_reference(checkpoints: Checkpoints, task: str | None, images: list[Path]) -> torch.Tensor:
    """The Python API's pooled features of `images` (N, D): `vitkit.load` (with the task's delta; None:
    the base), its eval transform, `pooled_features`."""
    model = vitkit.load(checkpoints.base, delta=checkpoints.deltas[task] if task else None).eval()
    transform = eval_transform(model)
    inputs = torch.stack([transform(decode_image(path), None) for path in images])
    with torch.no_grad():
        return pooled_features(model)(inputs)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text `text`, 0 if absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds one empty data chunk: a decompression bomb's
    header, refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def start_server(*args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`vitkit serve ... --port 0` as a subprocess; returns it and its URL once it listens. In fp32
    unless the arguments say otherwise, so answers compare with the Python API's to float rounding."""
    if "--precision" not in args:
        args = (*args, "--precision", "fp32")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "vitkit", "serve", *args, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()
    if not line or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(f"vitkit serve did not start: {process.stderr.read()[-3000:]}")
    return process, json.loads(line)["url"]


def stop_server(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        _, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr
