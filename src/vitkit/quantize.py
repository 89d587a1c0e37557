"""int8 inference: the linear layers of an exported ViT quantized by ONNX Runtime, and used only after
its top-1 has been measured against fp32 on a real evaluation split.

    vitkit quantize runs/cifar10 --root data/cifar10 --split test --out model.int8.onnx
    vitkit quantize model.safetensors --root data/val --split val --max-samples 2000 --max-drop 0.5 --out m.onnx

The steps (`quantize_int8`): the checkpoint is read once; the fp32 model is exported to ONNX
(`export.export_onnx`, checked against PyTorch); ONNX Runtime's `quantize_dynamic` rewrites each
MatMul and Gemm whose second input is a weight (every `nn.Linear`: qkv, projection, fc1, fc2, head;
not q k^T nor attention x v, whose operands are both activations) as an int8 product: weights int8
with one scale per output channel, stored; activations uint8 with one scale per tensor, measured on
each batch as it runs (QOperator format: `MatMulInteger` / `DynamicQuantizeLinear`). The patch
projection (a convolution), LayerNorm, softmax and GELU stay fp32. Then the PyTorch fp32 model and
the int8 graph are evaluated on the same images of the split (the checkpoint's eval preprocessing;
`max_samples` takes an evenly spaced, class-balanced subset), and the int8 file is written,
atomically, only when its top-1 is at most `max_top1_drop` points below fp32's; otherwise
`QuantizationRefused` says both figures in one line and nothing is written.

Why these settings (measured on ViT-B/16 at 224, batch 16, on the 2-core AVX-512 VNNI development
CPU; see benchmarks/int8.py): int8 weights with one scale per output channel (a row with large
weights does not coarsen every other row's steps) ran as fast as one scale per matrix, and signed
int8 weights about 1.8x faster than uint8 ones (VNNI multiplies u8 x s8); `reduce_range` (7-bit
weights) is for CPUs without VNNI, whose 16-bit intermediate sums can saturate: it is on by
default exactly there (`saturating_cpu`; on a 2-core AVX2-only EPYC the full range moved a test
model's logits by 18% of their scale, the 7-bit range by under 5%), and off elsewhere.
Dynamic quantization needs no calibration set; onnxruntime writes it as QOperator nodes (its QDQ
format is for static, calibrated quantization). On the demo model's digits test split every
combination of per-channel and reduce_range gave the fp32 top-1 exactly; on the 10000 CIFAR-10 test
images a briefly trained `cifar10_vit` model lost 0.02 points (40.41% -> 40.39%).

The int8 file keeps the export's metadata (class names, preprocessing, config, input layout;
`export.read_onnx_metadata`) and adds `vitkit.quantization`: the method and its settings, and the
evaluation that admitted it: split, data set, number of images, fp32 and int8 top-1, the drop and
the bound. `OnnxClassifier(path)` runs any such graph as a function images -> logits.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from .convert import CheckpointFile, read_checkpoint
from .data import DataConfig
from .data.loader import open_dataset
from .data.model_transform import data_fields
from .data.transforms import build_transforms
from .eval.classification import evaluate_classification, load_classifier
from .eval.fewshot import Transformed, evenly_spaced
from .export import METADATA_PREFIX, _import_extra, export_onnx, read_onnx_metadata
from .fast import apply_fast_paths
from .fast.machine import CpuInfo, cpu_info
from .files import atomic_write
from .models.preprocessing import Preprocessing, preprocessing_of
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)

OP_TYPES = ("MatMul", "Gemm")  # the linear layers; the convolution of the patch stem stays fp32
QUANTIZATION_KEY = "quantization"  # metadata key (under `vitkit.`) of the int8 file's record


class QuantizationRefused(ValueError):
    """int8 top-1 fell more than the bound below fp32's: nothing was written. `report` has the figures."""

    def __init__(self, message: str, report: QuantizeReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QuantizeReport:
    """The evaluation that admitted (or refused) an int8 graph; top-1 as fractions, bounds in points."""

    path: Path | None  # the int8 file, None when refused
    split: str
    data: str  # the data set's root folder, or its name (digits, synthetic)
    num_samples: int
    fp32_top1: float
    int8_top1: float
    max_top1_drop: float  # percentage points
    fp32_bytes: int
    int8_bytes: int
    settings: dict[str, Any]

    @property
    def top1_drop(self) -> float:
        """fp32 top-1 minus int8 top-1, in percentage points (negative: int8 did better)."""
        return 100 * (self.fp32_top1 - self.int8_top1)

    @property
    def accepted(self) -> bool:
        return self.top1_drop <= self.max_top1_drop

    def describe(self) -> str:
        return (
            f"top-1 on {self.split} of {self.data} ({self.num_samples} images): fp32 {self.fp32_top1:.2%}, "
            f"int8 {self.int8_top1:.2%} (a drop of {self.top1_drop:.2f} points; "
            f"{'within' if self.accepted else 'over'} the bound {self.max_top1_drop:.2f})"
        )

    def record(self) -> dict[str, Any]:
        """The int8 file's `vitkit.quantization` entry."""
        return {
            **self.settings,
            "evaluation": {
                "split": self.split,
                "data": self.data,
                "num_samples": self.num_samples,
                "fp32_top1": self.fp32_top1,
                "int8_top1": self.int8_top1,
                "top1_drop_points": self.top1_drop,
                "max_top1_drop_points": self.max_top1_drop,
            },
        }


class OnnxClassifier:
    """An exported (fp32 or int8) graph as a predict function: images (B, C, H, W) float, after the
    preprocessing its metadata records -> logits (B, classes) float32, on onnxruntime's CPU provider.
    `metadata`, `classes` and `preprocessing` are the file's (`read_onnx_metadata`)."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        onnxruntime = _import_extra("onnxruntime", "running an ONNX graph")
        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        self.classes: list[str] | None = self.metadata.get("classes")
        fields = self.metadata.get("preprocessing")
        self.preprocessing = Preprocessing(**fields) if fields is not None else None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits)


def _check_accepted(report: QuantizeReport, split: str, out_path: Path) -> None:
    """Raise unless the int8 figures were measured on some images and are within the bound."""
    if report.num_samples == 0:
        raise ValueError(f"split {split!r} of {report.data} has no images: int8 cannot be measured")
    if not report.accepted:
        refused = replace(report, path=None)
        raise QuantizationRefused(
            f"int8 refused, nothing written to {out_path}: {refused.describe()}", refused
        )


def quantize_int8(
    source: str | os.PathLike | CheckpointFile | VisionTransformer,
    out_path: str | os.PathLike,
    *,
    split: str = "test",
    root: str | os.PathLike | None = None,
    dataset: str | None = None,
    max_samples: int = 0,
    max_top1_drop: float = 1.0,
    batch_size: int = 32,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    dynamic_size: bool = True,
    classes: Sequence[str] | None = None,
) -> QuantizeReport:
    """Quantize the linear layers of `source` (a checkpoint, its `CheckpointFile`, or a model) to int8
    with onnxruntime, evaluate fp32 and int8 top-1 on `split` of the data set, and write `out_path`
    (.onnx, atomically) only if int8 is at most `max_top1_drop` points below fp32; else raise
    `QuantizationRefused` (a ValueError) with both figures, writing nothing.

    The data set: `root` (an ImageFolder with `split/` inside; `dataset` another kind by name), else
    the one the checkpoint was trained on. Images go through the checkpoint's eval preprocessing (its
    training data config where it has one, else its recorded preprocessing), the same for both.
    `max_samples` (0: all) takes an evenly spaced, class-balanced subset. `classes` name a model's
    outputs (a checkpoint's own are used otherwise).
    """
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the output file must end in .onnx")
    if max_samples < 0:
        raise ValueError(f"max_samples={max_samples}: expected 0 (all) or more")
    model, classes, data = _read_source(source, classes)
    apply_fast_paths(model, "cpu", "fp32")
    config = _split_config(model, data, root, dataset)
    images = _split_images(config, split, classes, max_samples, batch_size)
    settings = quantization_settings(per_channel, reduce_range)

    with tempfile.TemporaryDirectory(prefix="vitkit-quantize-") as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", dynamic_size=dynamic_size, classes=classes)
        int8_file = Path(folder) / "int8.onnx"
        quantize_linear_layers(fp32.path, int8_file, per_channel, settings["reduce_range"])
        with torch.inference_mode():
            fp32_result = evaluate_classification(model, images(), classes, top_k=(1,))
        int8_result = evaluate_classification(OnnxClassifier(int8_file), images(), classes, top_k=(1,))
        report = QuantizeReport(
            path=out_path,
            split=split,
            data=config.root or config.dataset,
            num_samples=fp32_result.num_samples,
            fp32_top1=fp32_result.top_k(1),
            int8_top1=int8_result.top_k(1),
            max_top1_drop=max_top1_drop,
            fp32_bytes=fp32.path.stat().st_size,
            int8_bytes=int8_file.stat().st_size,
            settings=settings,
        )
        _check_accepted(report, split, out_path)
        write_quantized(int8_file, out_path, fp32.metadata, report.record())
    log.info("%s: %s", out_path, report.describe())
    return report


# x86 CPU flags of int8 products that accumulate without 16-bit saturation (VNNI, AMX).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def saturating_cpu(cpu: CpuInfo | None = None) -> bool:
    """Whether onnxruntime's uint8 x int8 products can saturate here: an x86 CPU without VNNI, where
    they pair products into 16-bit sums (vpmaddubsw) before widening. `reduce_range=None` means 7-bit
    weights exactly then: a property of the instruction set, not a speed belief."""
    cpu = cpu or cpu_info()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and not any(flag in cpu.flags for flag in VNNI_FLAGS)


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """`reduce_range` as given, or (None) 7-bit weights exactly where `saturating_cpu`."""
    return saturating_cpu() if reduce_range is None else reduce_range


def quantization_settings(per_channel: bool, reduce_range: bool | None) -> dict[str, Any]:
    """What `quantize_linear_layers` does, as the int8 file records it (`reduce_range` None resolved
    by `resolve_reduce_range`)."""
    reduce_range = resolve_reduce_range(reduce_range)
    onnxruntime = _import_extra("onnxruntime", "quantizing to int8")
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "onnxruntime": onnxruntime.__version__,
        "format": "QOperator",
        "op_types": list(OP_TYPES),
        "weights": f"int8, {'per output channel' if per_channel else 'per tensor'}"
        + (", 7-bit range" if reduce_range else ""),
        "activations": "uint8, per tensor, dynamic (measured on each batch)",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
    }


def quantize_linear_layers(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    per_channel: bool = True,
    reduce_range: bool | None = None,
) -> None:
    """onnxruntime's dynamic quantization of the MatMul and Gemm nodes with a weight (constant second
    input) of an fp32 graph: weights int8, activations uint8 measured as the graph runs; 7-bit weights
    where `reduce_range` (None: where the CPU's int8 products saturate, `saturating_cpu`)."""
    reduce_range = resolve_reduce_range(reduce_range)
    _import_extra("onnx", "quantizing to int8")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime advises its pre-processing (shape inference) on the root logger; the export already
    # holds every shape the MatMul and Gemm quantizers need.
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            Path(fp32_path),
            Path(int8_path),
            op_types_to_quantize=list(OP_TYPES),
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root_logger.setLevel(level)


def write_quantized(
    int8_file: Path, out_path: Path, metadata: dict[str, Any], record: dict[str, Any]
) -> None:
    """Write the int8 graph to `out_path` atomically with the export's `vitkit.*` metadata and the
    quantization record (the quantizer does not promise to keep metadata_props)."""
    onnx = _import_extra("onnx", "writing the int8 graph")
    proto = onnx.load(str(int8_file))
    kept = [entry for entry in proto.metadata_props if not entry.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in {**metadata, QUANTIZATION_KEY: record}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value, sort_keys=True)
    atomic_write(out_path, lambda tmp: onnx.save(proto, tmp))


def _read_source(
    source: str | os.PathLike | CheckpointFile | VisionTransformer, classes: Sequence[str] | None
) -> tuple[VisionTransformer, list[str], dict[str, Any]]:
    """(fp32 model in eval mode, class names, the training data config) of a checkpoint, read once, or
    of a model (class names given or "0", "1", ...; no data config)."""
    if isinstance(source, VisionTransformer):
        model = source.float().eval()
        names = list(classes) if classes is not None else [str(i) for i in range(model.config.num_classes)]
        if len(names) != model.config.num_classes:
            raise ValueError(f"{len(names)} class names for a head of {model.config.num_classes} outputs")
        return model, names, {}
    checkpoint = source if isinstance(source, CheckpointFile) else read_checkpoint(source)
    model, names, data = load_classifier(checkpoint)
    return model.float(), list(classes) if classes is not None else names, data


def _split_config(
    model: VisionTransformer, data: dict[str, Any], root: str | os.PathLike | None, dataset: str | None
) -> DataConfig:
    """The evaluation's DataConfig: the checkpoint's training data config (else its preprocessing),
    with `root` (an ImageFolder unless `dataset` says otherwise) or `dataset`."""
    if not data and root is None and dataset is None:
        raise ValueError(
            "the model names no data set (it carries no training data config); pass --root FOLDER "
            "(an ImageFolder with the split inside)"
        )
    fields = dict(data) if data else data_fields(preprocessing_of(model))
    if root is not None:
        fields.update(root=str(root), dataset=dataset or "imagefolder")
    elif dataset is not None:
        fields["dataset"] = dataset
    return DataConfig.from_dict(fields)


def _split_images(
    config: DataConfig, split: str, classes: list[str], max_samples: int, batch_size: int
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A function giving the split's (images, labels) batches, the same images in the same order on
    each call: the eval transform is deterministic. An unreadable image stops the measurement
    (`BadImageError`, naming the file) rather than leaving a hole in it."""
    dataset = open_dataset(config, split)
    names = list((dataset.dataset if isinstance(dataset, Subset) else dataset).classes)
    if names != classes:
        more = " ..." if len(classes) > 10 else ""
        raise ValueError(
            f"the model's classes {classes[:10]}{more} are not those of split {split!r} of "
            f"{config.root or config.dataset}: {names[:10]}{' ...' if len(names) > 10 else ''}"
        )
    subset = evenly_spaced(Transformed(dataset, build_transforms(config, train=False)), max_samples)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in DataLoader(subset, batch_size=batch_size, shuffle=False):
            yield images, torch.as_tensor(labels)

    return batches
