"""The tasks one server answers: a trunk held once, each task's delta on top of it.

`TaskSet(checkpoint, {"pets": "pets.safetensors"})` loads the base checkpoint (a training checkpoint
brings its class names and data config, see `vitkit.eval.classification.load_classifier`) and adds
every task delta to one `MultiTaskModel`: each task holds its own attention weights, head and
position embeddings and the very trunk tensors for the rest, so a task costs its delta in memory.
The base itself is served as task "base" when it has a classification head.

Each task prepares an image as `vitkit predict` does: `decode_image_bytes` (the checks of
`decode_image`, plus a pixel limit) and the eval transform of the task's model
(`vitkit.data.eval_transform`), so the same image gets the same answer from both.

With backend="onnx" each task model is exported (`vitkit.export.export_onnx`, checked against
PyTorch) and run by onnxruntime; a graph holds all its weights, so there every task costs a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..data.datasets import decode_image_bytes
from ..data.model_transform import eval_transform, preprocessing_of
from ..delta import Delta, MultiTaskModel, read_delta
from ..eval.classification import CLASSES_KEY, check_finite, load_classifier
from ..eval.embed import pooled_features
from ..fast import apply_fast_paths, prepare_inference
from ..files import CheckpointError
from ..io import read_checkpoint
from ..models.vit import VisionTransformer

Backend = Literal["torch", "onnx"]
Kind = Literal["predict", "embed"]  # what a batch computes: class probabilities or pooled features
PREDICT: Kind = "predict"
EMBED: Kind = "embed"
BASE_TASK = "base"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_MAX_PIXELS = 25_000_000  # a 5000 x 5000 photograph; decoded, 75 MB of RGB
log = logging.getLogger(__name__)


class UnknownTaskError(KeyError):
    """A request for a task this server does not hold."""


@dataclass
class Task:
    """One served task: its model's forward (preprocessed images -> logits), class names, eval
    transform (uint8 (3, H, W) -> float (3, *img_size)) and where it came from."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    transform: Callable[[torch.Tensor, Any], torch.Tensor]
    source: str
    img_size: tuple[int, int]
    num_params: int  # parameters this task holds beyond the trunk (the whole model for the base)
    preprocessing: str = ""
    model: VisionTransformer | None = field(default=None, repr=False)


def parse_task_specs(specs: list[str]) -> dict[str, str]:
    """["pets=pets.safetensors", ...] -> {"pets": "pets.safetensors"}; names checked, none twice."""
    tasks: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--task {spec!r}: expected NAME=DELTA, e.g. pets=pets_delta.safetensors")
        if not TASK_NAME.match(name):
            raise ValueError(
                f"--task {spec!r}: the name must be 1-64 letters, digits, '_', '.' or '-', starting "
                f"with a letter or digit"
            )
        if name == BASE_TASK or name in tasks:
            raise ValueError(f"--task {spec!r}: the task name {name!r} is taken")
        tasks[name] = path
    return tasks


def file_signature(path: str | os.PathLike) -> tuple:
    """What identifies a file's (or a model folder's files') content without reading it: names,
    sizes, modification times and inodes, from `os.stat`."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    signature = []
    for file in files:
        info = file.stat()
        signature.append((file.name, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(signature)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes; of a folder (a model folder), of its regular files' names and
    bytes in name order."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def delta_classes(delta: Delta) -> list[str]:
    """The class names a delta records under the training checkpoints' key, else "0", "1", ..."""
    num_classes = delta.config.num_classes
    if delta.classes is None:
        return [str(index) for index in range(num_classes)]
    if len(delta.classes) != num_classes or not all(isinstance(name, str) for name in delta.classes):
        raise CheckpointError(
            f"{delta.path}: metadata {CLASSES_KEY!r}: expected {num_classes} class names (the head's outputs)"
        )
    return list(delta.classes)


class TaskSet:
    """The base checkpoint and its task deltas, ready to answer: `prepare` an upload, `run` a batch."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        deltas: dict[str, str | os.PathLike] | None = None,
        backend: Backend = "torch",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        precision: str = "fp32",
    ) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend {backend!r}: expected 'torch' or 'onnx'")
        if backend == "onnx" and precision == "bf16":
            raise ValueError(
                f"precision {precision!r}: the onnx backend runs fp32 graphs; use --precision fp32"
            )
        self.backend = backend
        self.max_pixels = max_pixels
        read = read_checkpoint(checkpoint)  # every file opened once, here
        self.checkpoint = str(read.path)
        # A Hub name's repo, commit and weight digests (checked on the bytes read): what /v1/models
        # reports for it, rather than a checksum of the files in the Hub's cache.
        self.hub = read.hub
        # Loading opens each file once; a file's SHA-256 is taken when first asked for (`checksum`),
        # from the file as `os.stat` saw it at load, or reported as changed since.
        self._signatures = {self.checkpoint: file_signature(self.checkpoint)}
        self._checksums: dict[str, str | None] = {}
        base, classes, _ = load_classifier(read)
        # The torch backend computes in `precision` ("auto": measured fastest here); onnx in fp32 only.
        self.precision = "fp32" if backend == "onnx" else prepare_inference(base, "cpu", precision)[1]
        self.base = base
        self.base_transform = eval_transform(base)
        self.trunk = MultiTaskModel(base)
        self.tasks: dict[str, Task] = {}
        self._onnx_folder = tempfile.TemporaryDirectory(prefix="vitkit-serve-") if backend == "onnx" else None
        if base.config.num_classes > 0:
            self._add(BASE_TASK, base, classes, self.checkpoint, base.num_params())
        trunk_ids = {id(p) for p in base.parameters()}
        for name, path in (deltas or {}).items():
            self._signatures[str(path)] = file_signature(path)
            delta = read_delta(path)
            model = self.trunk.add_task(name, delta)
            check_finite(model, path)
            own = sum(p.numel() for p in model.parameters() if id(p) not in trunk_ids)
            self._add(name, model, delta_classes(delta), str(path), own)
        if not self.tasks:
            raise ValueError(f"{checkpoint}: the base has no classification head and no --task was given")
        log.info("serving %s", ", ".join(f"{t.name} ({t.source})" for t in self.tasks.values()))

    def _add(self, name: str, model: VisionTransformer, classes: list[str], source: str, own: int) -> None:
        if self.backend == "onnx":
            apply_fast_paths(model, "cpu", "fp32")
        else:  # a task's own tensors in the base's precision (the shared ones are already)
            prepare_inference(model, "cpu", self.precision)
        preprocessing = preprocessing_of(model)
        self.tasks[name] = Task(
            name=name,
            forward=self._forward(name, model.eval()),
            classes=classes,
            transform=eval_transform(model),
            source=source,
            img_size=tuple(model.config.img_size),
            num_params=own,
            preprocessing=preprocessing.describe(),
            model=model,
        )

    def _forward(self, name: str, model: VisionTransformer) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.backend == "torch":
            return torch.no_grad()(model)
        import onnxruntime

        from ..export import export_onnx

        path = Path(self._onnx_folder.name) / f"{name}.onnx"
        export_onnx(model, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def forward(images: torch.Tensor) -> torch.Tensor:
            (logits,) = session.run(["logits"], {"images": images.numpy()})
            return torch.from_numpy(logits)

        return forward

    @property
    def default_task(self) -> str | None:
        """The task of a request that names none: the base, or the only task."""
        if BASE_TASK in self.tasks:
            return BASE_TASK
        return next(iter(self.tasks)) if len(self.tasks) == 1 else None

    def task(self, name: str | None) -> Task:
        if name is None:
            name = self.default_task
            if name is None:
                raise UnknownTaskError(
                    f"this server holds several tasks: name one with task= ({', '.join(self.tasks)})"
                )
        if name not in self.tasks:
            raise UnknownTaskError(f"unknown task {name!r}; served: {', '.join(self.tasks)}")
        return self.tasks[name]

    def decode(self, data: bytes, name: str = "<upload>") -> torch.Tensor:
        """Upload bytes -> uint8 (3, H, W); BadImageError / ImageTooLargeError."""
        return decode_image_bytes(data, name, self.max_pixels)

    def prepare(self, task: Task, data: bytes, name: str = "<upload>") -> torch.Tensor:
        """Upload bytes -> the task's model input (3, *img_size); BadImageError / ImageTooLargeError."""
        return task.transform(self.decode(data, name), None)

    def run(self, task: Task, images: torch.Tensor) -> torch.Tensor:
        """A batch (B, 3, H, W) of one task -> class probabilities (B, classes), float32."""
        return task.forward(images).float().softmax(dim=-1)

    def embedding_model(self, name: str) -> tuple[VisionTransformer, Callable]:
        """(model, eval transform) whose pooled features `embed` gives: the base ("base", also when
        the base has no head and so is no task), or a task's."""
        if name == BASE_TASK and BASE_TASK not in self.tasks:
            return self.base, self.base_transform
        task = self.task(name)
        return task.model, task.transform

    def embed(self, model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """A batch (B, 3, H, W) -> the pooled features (B, D) the head would see, float32."""
        with torch.no_grad():
            return pooled_features(model)(images)

    def compute(self, kind: Kind, name: str, images: torch.Tensor) -> torch.Tensor:
        """A batch (B, 3, H, W) for task `name` -> its class probabilities (kind "predict") or its
        model's pooled features (kind "embed"): what one batch of the batcher runs."""
        if kind == PREDICT:
            return self.run(self.tasks[name], images)
        model, _ = self.embedding_model(name)
        return self.embed(model, images)

    def checksum(self, path: str) -> str | None:
        """The SHA-256 of a served file, computed once when first asked for; None when the file
        changed on disk since it was loaded (its bytes are no longer the ones served)."""
        if path not in self._checksums:
            unchanged = file_signature(path) == self._signatures[path]
            self._checksums[path] = file_sha256(path) if unchanged else None
            if not unchanged:
                log.warning("%s changed on disk since it was loaded: no checksum of what is served", path)
        return self._checksums[path]

    def base_digest(self) -> str | dict[str, str] | None:
        """What identifies the base's bytes: the SHA-256 of a local file (`checksum`); for a Hub name,
        the SHA-256 of each weight file (name -> digest) as the Hub records it, checked when read."""
        return dict(self.hub.sha256) if self.hub is not None else self.checksum(self.checkpoint)

    def describe_models(self) -> dict[str, Any]:
        """What /v1/models shows: the base and every task, with the SHA-256 of their files; a base
        loaded by Hub name is named `hf-hub:org/name@commit` with its repo and resolved revision
        (`hub`), and its digests are the Hub's."""
        base = self.base_digest()
        hub = self.hub.as_dict() if self.hub is not None else None
        return {
            "object": "list",
            "base": {
                "checkpoint": self.hub.name if self.hub is not None else self.checkpoint,
                "sha256": base,
                "hub": hub,
            },
            "data": [
                {
                    "id": task.name,
                    "object": "model",
                    "source": task.source,
                    "base_sha256": base,
                    "base_hub": hub,
                    "delta_sha256": None if task.name == BASE_TASK else self.checksum(task.source),
                    "preprocessing": task.preprocessing,
                    "img_size": list(task.img_size),
                    "classes": task.classes,
                }
                for task in self.tasks.values()
            ],
        }

    def describe(self) -> dict[str, Any]:
        """What /health shows: the checkpoint, backend and every task's model."""
        return {
            "checkpoint": self.checkpoint,
            "backend": self.backend,
            "precision": self.precision,
            "default_task": self.default_task,
            "trunk_params": sum(p.numel() for p in self.trunk.trunk.parameters()),
            "tasks": {
                task.name: {
                    "model": task.source,
                    "num_classes": len(task.classes),
                    "img_size": list(task.img_size),
                    "own_params": task.num_params,
                    "preprocessing": task.preprocessing,
                }
                for task in self.tasks.values()
            },
        }


def top_k(task: Task, probabilities: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """One image's probabilities -> its k most likely classes, most likely first."""
    values, indices = probabilities.topk(k)
    return [
        {"label": task.classes[index], "probability": value}
        for value, index in zip(values.tolist(), indices.tolist(), strict=True)
    ]
