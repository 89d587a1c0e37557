"""ONNX export: a dynamic batch and, where the model allows it, a dynamic image size; the file says how
to feed it (class names, preprocessing, input layout) and is checked against PyTorch with onnxruntime.

    vitkit export model.safetensors model.onnx                 # any batch, any multiple of the stride
    vitkit export model.safetensors model.onnx --static-size   # fixed to the checkpoint's size
    vitkit export model.safetensors model_384.onnx --img-size 384

The graph takes `images` (batch, C, height, width), float32 NCHW RGB after the preprocessing
((pixel / 255 - mean) / std, recorded in the file), and returns `logits` (batch, classes).

Dynamic size. For another image size the model resamples its position embeddings in 2D
(`resample_pos_embed`, section 3.2 of the ViT paper); in the graph that is an ONNX Resize whose output
grid is computed from the input's shape. The TorchScript-based exporter is used (its dynamo successor
needs onnxscript); it records the code path of one example run, and at the model's own size
`position_embeddings` returns the table unchanged, so that run would record no resampling at all. The
example therefore runs at another size (one stride taller, two wider); at the model's own size the
recorded Resize is the identity (bicubic and bilinear at scale 1 land on the grid points). Height and
width must be multiples of the stride, as in PyTorch (where the graph floors instead of raising).

Static size. A model whose graph cannot follow another size is exported at its own size, with the
reason logged and recorded in the file (`static_size_reason`): position embeddings resampled with
antialiasing (no opset-17 Resize computes it). A hybrid's ResNet trunk follows other sizes: its
TensorFlow SAME padding is integer arithmetic on the traced size, and at multiples of the model's
stride every stride-2 layer sees an even size, so the padding is the same at every size the graph
takes. `dynamic_size=False` (`--static-size`) asks for a fixed size on any model.

Metadata. `metadata_props` hold JSON under `vitkit.*` keys, read back by `read_onnx_metadata(path)`:
`version`, `model` (a one-line summary), `config` (the `ViTConfig`), `classes` (where the checkpoint
has class names), `preprocessing` (`Preprocessing(**metadata["preprocessing"])` rebuilds it, where the
model has one), `input` (name, layout, channels, export size, dynamic or the reason it is not) and
`output`. Models over 2 GB (ViT-H in fp32) exceed protobuf's limit.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write
from .models.config import ViTConfig
from .models.preprocessing import Preprocessing
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a native op from opset 17
METADATA_PREFIX = "vitkit."  # each entry's value is JSON; the same key names as vitkit's weight files
BATCH_SIZE = 3  # the check's batch: not the trace's 2, so a batch fixed by mistake shows


@dataclass(frozen=True)
class SizeCheck:
    """How far onnxruntime's logits are from PyTorch's at one image size (height, width)."""

    size: tuple[int, int]
    max_abs_error: float
    max_abs_logit: float


@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime against PyTorch on a batch of another size than the trace's, at each image size
    checked: the export size and, for a graph of dynamic size, a second, non-square one."""

    path: Path
    batch_size: int
    sizes: tuple[SizeCheck, ...]

    @property
    def max_abs_error(self) -> float:
        return max(size.max_abs_error for size in self.sizes)

    @property
    def max_abs_logit(self) -> float:
        return max(size.max_abs_logit for size in self.sizes)

    def describe(self) -> str:
        errors = ", ".join(f"{s.max_abs_error:.2e} at {_size_text(s.size)}" for s in self.sizes)
        return (
            f"onnxruntime vs PyTorch on a batch of {self.batch_size}: max |error| {errors} "
            f"(logits up to {self.max_abs_logit:.2f})"
        )


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the file, the metadata it holds (as `read_onnx_metadata` reads it
    back) and the check, None when skipped."""

    path: Path
    metadata: dict[str, Any]
    check: ExportCheck | None

    @property
    def dynamic_size(self) -> bool:
        return self.metadata["input"]["dynamic_size"]

    @property
    def static_reason(self) -> str | None:
        return self.metadata["input"]["static_reason"]


def static_size_reason(config: ViTConfig) -> str | None:
    """Why an ONNX graph of this model cannot take other image sizes than its own; None if it can."""
    if config.pos_embed == "learn" and config.pos_embed_resample.endswith("antialias"):
        return (
            f"its position embeddings resample with {config.pos_embed_resample}, which no opset-{OPSET} "
            "Resize computes (the exporter refuses antialiased interpolation)"
        )
    return None


def _fixed_size_reason(config, path: Path, dynamic_size: bool) -> str | None:
    """Why the export has a fixed height and width (None: dynamic); a model that cannot follow other
    sizes is exported fixed even when dynamic was asked for, with a warning."""
    reason = static_size_reason(config)
    if reason is not None:
        if dynamic_size:
            log.warning("%s: exporting at the fixed size %s: %s", path, _size_text(config.img_size), reason)
        return reason
    return None if dynamic_size else "a fixed size was asked for (dynamic_size=False, --static-size)"


def _write_graph(tmp: str, model, example: torch.Tensor, axes: dict, metadata: dict) -> None:
    """Trace `model` on `example` into `tmp` with the dynamic `axes`, then add `metadata`."""
    onnx = _import_extra("onnx", "exporting to ONNX")
    # The tracer warns that the size checks are constants: shapes that reach tensors stay traced.
    # torch flags the TorchScript exporter as deprecated; its successor needs onnxscript.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            tmp,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": axes, "logits": {0: "batch"}},
            opset_version=OPSET,
        )
    proto = onnx.load(tmp)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value, sort_keys=True)
    onnx.save(proto, tmp)


def export_onnx(
    model: VisionTransformer,
    path: str | os.PathLike,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    dynamic_size: bool = True,
    classes: Sequence[str] | None = None,
) -> OnnxExport:
    """Write `model` as ONNX (fp32, eval mode) atomically, with its metadata; then, with check=True,
    compare it with PyTorch in onnxruntime (`check_onnx`) and raise ValueError if any logit is off by
    more than atol + rtol |x|.

    The batch is dynamic; height and width are too with `dynamic_size` unless the model cannot follow
    them (`static_size_reason`: then the export is static, with the reason logged and recorded).
    `classes` are the head's class names (a checkpoint's `CheckpointFile.classes`), recorded with the
    model's `preprocessing`, config and vitkit's version (see `read_onnx_metadata`).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"export_onnx takes a VisionTransformer (unwrap compile/DDP), got {type(model).__name__}"
        )
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the output file must end in .onnx")
    model = model.float().eval()
    config = model.config
    if classes is not None and len(classes) != config.num_classes:
        raise ValueError(f"{path}: {len(classes)} class names for a head of {config.num_classes} outputs")
    reason = _fixed_size_reason(config, path, dynamic_size)
    metadata = onnx_metadata(model, classes, reason)
    stride = config.stride
    height, width = config.img_size
    # The example runs at another size than the model's, so the trace records the resampling.
    trace_size = (height, width) if reason else (height + stride, width + 2 * stride)
    example = torch.randn(2, config.in_chans, *trace_size)
    axes = {0: "batch"} if reason else {0: "batch", 2: "height", 3: "width"}

    atomic_write(path, lambda tmp: _write_graph(tmp, model, example, axes, metadata))
    size = f"any multiple of {stride}" if reason is None else f"fixed {_size_text(config.img_size)}"
    log.info("%s: exported %s, image size %s, opset %d", path, metadata["model"], size, OPSET)
    result = check_onnx(model, path, atol=atol, rtol=rtol) if check else None
    return OnnxExport(path, metadata, result)


def onnx_metadata(
    model: VisionTransformer, classes: Sequence[str] | None, static_reason: str | None
) -> dict[str, Any]:
    """The JSON values `export_onnx` records, by key (without the `vitkit.` prefix)."""
    config = model.config
    metadata: dict[str, Any] = {
        "version": _vitkit_version(),
        "model": (
            f"VisionTransformer: width {config.embed_dim}, depth {config.depth}, heads "
            f"{config.num_heads}, {config.stem} stem, patch {config.patch_size}, "
            f"{_size_text(config.img_size)} px, {config.num_classes} classes, "
            f"{model.num_params() / 1e6:.2f} M parameters"
        ),
        "config": config.to_dict(),
        "input": {
            "name": "images",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": config.in_chans,
            "color": "RGB" if config.in_chans == 3 else None,
            "values": "(pixel / 255 - mean) / std, as `preprocessing` gives",
            "size": list(config.img_size),
            "dynamic_size": static_reason is None,
            "multiple_of": config.stride,
            "static_reason": static_reason,
        },
        "output": {"name": "logits", "shape": ["batch", _num_outputs(model)]},
    }
    if classes is not None:
        metadata["classes"] = list(classes)
    preprocessing = getattr(model, "preprocessing", None)
    if isinstance(preprocessing, Preprocessing):
        metadata["preprocessing"] = preprocessing.as_dict()
    return metadata


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `vitkit.*` metadata of an exported file, each value decoded from JSON, keyed without the
    prefix: version, model, config, input, output, and classes and preprocessing where recorded."""
    onnx = _import_extra("onnx", "reading ONNX metadata")
    proto = onnx.load(str(path), load_external_data=False)
    metadata = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(METADATA_PREFIX):
            try:
                metadata[entry.key.removeprefix(METADATA_PREFIX)] = json.loads(entry.value)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: metadata {entry.key!r} is not JSON: {error}") from error
    return metadata


def check_onnx(
    model: VisionTransformer,
    path: str | os.PathLike,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> ExportCheck:
    """Compare onnxruntime's logits with the PyTorch model's on a batch of 3 (not the trace's 2) at
    each of `sizes`: by default the model's own size and, when the graph's height and width are
    dynamic, a non-square second one (two strides taller, one wider: 48x40 for 32 px at patch 8)."""
    onnxruntime = _import_extra("onnxruntime", "checking an ONNX export")
    path = Path(path)
    config = model.config
    model = model.float().eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if sizes is None:
        sizes = [tuple(config.img_size)]
        height, width = session.get_inputs()[0].shape[2:]
        if not isinstance(height, int) and not isinstance(width, int):  # symbolic: dynamic
            sizes.append((config.img_size[0] + 2 * config.stride, config.img_size[1] + config.stride))
    generator = torch.Generator().manual_seed(0)
    checks = []
    for size in sizes:
        images = torch.randn(BATCH_SIZE, config.in_chans, *size, generator=generator)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(logits)
        if got.shape != expected.shape:
            raise ValueError(
                f"{path}: at {_size_text(size)} onnxruntime gives logits of shape {tuple(got.shape)}, "
                f"PyTorch {tuple(expected.shape)}"
            )
        error = (got - expected).abs()
        checks.append(SizeCheck(tuple(size), error.max().item(), expected.abs().max().item()))
        if not torch.all(error <= atol + rtol * expected.abs()):
            raise ValueError(
                f"{path}: at {_size_text(size)} onnxruntime differs from PyTorch by up to "
                f"{checks[-1].max_abs_error:.3g} (logits up to {checks[-1].max_abs_logit:.3g}; "
                f"tolerance {atol} + {rtol} |x|)"
            )
    return ExportCheck(path, BATCH_SIZE, tuple(checks))


def _num_outputs(model: VisionTransformer) -> int:
    """The logits' width: the head's classes, or the pooled features of a model without a head."""
    config = model.config
    if config.num_classes > 0:
        return config.num_classes
    return config.representation_size or config.embed_dim


def _import_extra(name: str, purpose: str) -> Any:
    """A module of the `export` extra, or an ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{purpose} needs {name}: pip install 'vitkit[export]'") from error


def _size_text(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


def _vitkit_version() -> str:
    """The installed distribution's version (this layer may not import the package's `__version__`)."""
    try:
        return importlib.metadata.version("vitkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
