"""ONNX export with a dynamic batch axis, checked against PyTorch with onnxruntime.

    vitkit export model.safetensors model.onnx              # at the checkpoint's image size
    vitkit export model.safetensors model_384.onnx --img-size 384

The graph takes `images` (batch, C, H, W) and returns `logits` (batch, classes); the batch is dynamic,
the image size is fixed to the model's: the position embeddings are resampled to the grid at export
time, so an ONNX file serves one resolution (onnxruntime rejects other sizes with a shape error naming
the input). Export again with `img_size` for another resolution. The TorchScript-based exporter is
used (it needs no dependency beyond `onnx`); models over 2 GB (ViT-H in fp32) exceed protobuf's limit.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a native op from opset 17


@dataclass
class ExportCheck:
    """How far onnxruntime's logits are from PyTorch's on a batch of another size than the export's."""

    path: Path
    batch_size: int
    max_abs_error: float
    max_abs_logit: float


def export_onnx(
    model: VisionTransformer,
    path: str | os.PathLike,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ExportCheck | None:
    """Write `model` as ONNX (fp32, eval mode, dynamic batch) atomically; then, with check=True, run it in
    onnxruntime on 3 random images and raise ValueError if any logit is off by more than atol + rtol |x|.
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
    example = torch.randn(2, config.in_chans, *config.img_size)

    def write(tmp: str) -> None:
        # The tracer warns that the position-embedding grid is a constant: by design (see module doc).
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
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
            )

    atomic_write(path, write)
    log.info("%s: exported %s at %s, opset %d", path, type(model).__name__, config.img_size, OPSET)
    return check_onnx(model, path, atol=atol, rtol=rtol) if check else None


def check_onnx(
    model: VisionTransformer, path: str | os.PathLike, atol: float = 1e-4, rtol: float = 1e-4
) -> ExportCheck:
    """Compare onnxruntime's logits with the PyTorch model's on a batch of 3 (not the export's 2)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking an ONNX export needs onnxruntime: pip install 'vitkit[export]'"
        ) from error
    path = Path(path)
    config = model.config
    images = torch.randn(3, config.in_chans, *config.img_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        expected = model.float().eval()(images)
    got = torch.from_numpy(logits)
    if got.shape != expected.shape:
        raise ValueError(
            f"{path}: onnxruntime gives logits of shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    error = (got - expected).abs()
    result = ExportCheck(path, 3, error.max().item(), expected.abs().max().item())
    if not torch.all(error <= atol + rtol * expected.abs()):
        raise ValueError(
            f"{path}: onnxruntime differs from PyTorch by up to {result.max_abs_error:.3g} "
            f"(logits up to {result.max_abs_logit:.3g}; tolerance {atol} + {rtol} |x|)"
        )
    return result
