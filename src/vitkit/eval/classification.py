"""Classification evaluation: top-1, top-5, per-class accuracy and the confusion matrix.

One interface (big_vision's evaluators): an evaluator takes a predict function `images -> logits`
and batches, and returns metrics. It never sees devices or ranks: the caller passes `to_device` and
a `reduce` that sums counts over processes, so each rank evaluates its own share of the split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..convert import CheckpointFile, checkpoint_path, read_checkpoint
from ..convert.names import CLASSES_KEY, DATA_KEY
from ..io import CheckpointError, atomic_write, load
from ..models.vit import VisionTransformer

Predict = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteLogitsError(ValueError):
    """The model gave NaN or infinite logits: evaluation stops instead of scoring them."""


@dataclass
class ClassificationResult:
    """Counts over a split: `confusion[true, predicted]` and the number of top-k hits per k."""

    confusion: np.ndarray
    top_k_correct: dict[int, int]
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return int(self.confusion.sum())

    def top_k(self, k: int) -> float:
        return self.top_k_correct[k] / max(self.num_samples, 1)

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        """Recall of each class: correct predictions over its samples (NaN for a class with none)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.diag(self.confusion) / totals
        return {name: float(value) for name, value in zip(self.classes, recall, strict=True)}

    def metrics(self) -> dict[str, float]:
        """The scalar metrics, as logged: top1, top5, ... and the mean per-class accuracy."""
        out = {f"top{k}": self.top_k(k) for k in sorted(self.top_k_correct)}
        out["mean_class_accuracy"] = float(np.nanmean(list(self.per_class_accuracy.values())))
        out["num_samples"] = self.num_samples
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metrics(),
            "per_class_accuracy": self.per_class_accuracy,
            "classes": self.classes,
            "confusion_matrix": self.confusion.tolist(),
        }


def mixture_of_views(predict: Predict, views: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted mean of the class probabilities `predict` gives each view of a batch, as
    log-probabilities (logits whose softmax is that mean); one call on all the views."""
    logits = predict(torch.cat(views))  # (len(views) * B, classes)
    log_probs = logits.float().log_softmax(-1).unflatten(0, (len(views), len(views[0])))
    log_weights = torch.tensor(weights, device=log_probs.device).log()
    return torch.logsumexp(log_probs + log_weights[:, None, None], dim=0)


def flip_averaged(predict: Predict) -> Predict:
    """Test-time augmentation: the mean of the class probabilities of each image and of its left-right
    mirror image."""

    def averaged(images: torch.Tensor) -> torch.Tensor:
        return mixture_of_views(predict, [images, images.flip(-1)], [0.5, 0.5])

    return averaged


def shift_averaged(predict: Predict, pixels: int) -> Predict:
    """Test-time augmentation by translation (airbench's second level): each image's class
    probabilities averaged with those of two copies shifted by `pixels` along the diagonal (up-left
    and down-right, the frame reflect-padded), the two shifted views weighing as much as the image.
    Wrap a `flip_averaged` predict to average six views."""
    if pixels < 1:
        raise ValueError(f"shift_tta must be a positive number of pixels, got {pixels}")

    def averaged(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if pixels >= min(height, width):
            raise ValueError(
                f"shift_tta={pixels} px: the images ({height}x{width}) must be larger than the shift"
            )
        padded = torch.nn.functional.pad(images, (pixels,) * 4, mode="reflect")
        up_left, down_right = padded[..., :height, :width], padded[..., 2 * pixels :, 2 * pixels :]
        return mixture_of_views(predict, [images, up_left, down_right], [0.5, 0.25, 0.25])

    return averaged


def averaged_views(predict: Predict, hflip: bool, shift: int) -> Predict:
    """`predict` with the test-time augmentation asked for: mirror images (`hflip`) and diagonal
    shifts of `shift` pixels (0: none), each shifted view with its mirror when both are on."""
    predict = flip_averaged(predict) if hflip else predict
    return shift_averaged(predict, shift) if shift else predict


def evaluate_classification(
    predict: Predict,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classes: list[str],
    *,
    top_k: tuple[int, ...] = (1, 5),
    to_device: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
    progress: bool = False,
) -> ClassificationResult:
    """Run `predict` (images (B, C, H, W) -> logits (B, classes)) over labelled batches.

    k larger than the number of classes counts as the number of classes (every label is in the top k).
    """
    num_classes = len(classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    hits = torch.zeros(len(top_k), dtype=torch.int64)
    seen = 0
    for images, labels in tqdm(batches, desc="eval", leave=False, disable=not progress):
        logits = predict(to_device(images)).float().cpu()
        if logits.shape[-1] != num_classes:
            raise ValueError(
                f"the model predicts {logits.shape[-1]} classes but the data has {num_classes}: {classes[:5]}..."
            )
        finite = torch.isfinite(logits).all(dim=-1)
        if not finite.all():
            # An accuracy of NaN logits is the order topk happens to give them: meaningless.
            first = seen + int((~finite).nonzero()[0])
            raise NonFiniteLogitsError(
                f"non-finite logits for {int((~finite).sum())} of {len(logits)} images of a batch "
                f"(first: image {first} of the split); no accuracy is reported"
            )
        seen += len(logits)
        ranked = logits.topk(min(max(top_k), num_classes), dim=-1).indices  # (B, k)
        confusion += torch.bincount(
            labels * num_classes + ranked[:, 0], minlength=num_classes * num_classes
        ).reshape(num_classes, num_classes)
        for i, k in enumerate(top_k):
            hits[i] += (ranked[:, :k] == labels[:, None]).any(dim=-1).sum()
    counts = reduce(torch.cat([confusion.flatten(), hits]))
    confusion = counts[: num_classes * num_classes].reshape(num_classes, num_classes)
    return ClassificationResult(
        confusion=confusion.numpy(),
        top_k_correct={
            k: int(hit) for k, hit in zip(top_k, counts[num_classes * num_classes :], strict=True)
        },
        classes=list(classes),
    )


EVALUATORS: dict[str, Callable[..., ClassificationResult]] = {"classification": evaluate_classification}


def plot_confusion_matrix(result: ClassificationResult, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of the row-normalised confusion matrix (each true class sums to 1), counts in cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = result.confusion
    num_classes = len(result.classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = confusion / confusion.sum(axis=1, keepdims=True)
    size = max(4.0, 0.45 * num_classes + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(np.nan_to_num(rates), cmap="Blues", vmin=0, vmax=1)
    if num_classes <= 30:
        for true in range(num_classes):
            for predicted in range(num_classes):
                count = int(confusion[true, predicted])
                if count:
                    dark = rates[true, predicted] > 0.5
                    color = "white" if dark else "black"
                    axes.text(predicted, true, count, ha="center", va="center", fontsize=7, color=color)
        axes.set_xticks(range(num_classes), result.classes, rotation=90)
        axes.set_yticks(range(num_classes), result.classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or f"top-1 {result.top_k(1):.2%} on {result.num_samples} images")
    figure.colorbar(image, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return path


def write_results(result: ClassificationResult, path: str | os.PathLike, **extra: Any) -> Path:
    """The metrics, per-class accuracies and confusion matrix as JSON (plus any `extra` fields)."""
    path = Path(path)
    data = {**extra, **result.to_dict()}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))
    return path


def describe_count(num_samples: int, unreadable: list[tuple[str, str]], shown: int = 3) -> str:
    """ "10 images; 3 unreadable files skipped: a.jpg (reason), ...": what an evaluation counted."""
    text = f"{num_samples} images"
    if unreadable:
        listing = ", ".join(f"{path} ({reason})" for path, reason in unreadable[:shown])
        more = f", and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
        text += f"; {len(unreadable)} unreadable file{'s' if len(unreadable) > 1 else ''} skipped: {listing}{more}"
    return text


def eval_folder(checkpoint: Path, split: str) -> Path:
    """Where `vitkit eval` writes by default: `eval_<split>` beside a run's or checkpoint's weights; for a
    rotated training checkpoint (`<run>/checkpoints/step-N/`), `<run>/eval_<split>_step-N`, out of the
    folder that rotation deletes."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if folder.parent.name == "checkpoints" and folder.name.startswith("step-"):
        return folder.parent.parent / f"eval_{split}_{folder.name}"
    return folder / f"eval_{split}"


# Checkpoints with their classes: vitkit eval and vitkit predict -----------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """What to load for a checkpoint argument: a run folder's best (else last) weights, a
    pre-training run's encoder; any other folder (vitkit's or HuggingFace's config.json + weights)
    or file as it is (`vitkit.convert.checkpoint_path`)."""
    return checkpoint_path(path)


def load_classifier(
    path: str | os.PathLike | CheckpointFile,
) -> tuple[VisionTransformer, list[str], dict[str, Any]]:
    """(model in eval mode, class names, the training run's data config as a dict) of a checkpoint
    (or its `CheckpointFile`, already read), its files read once. Weights without class names get
    "0", "1", ... and an empty data config."""
    from ..data.loader import DataConfig  # the data package imports the models, not eval

    checkpoint = path if isinstance(path, CheckpointFile) else read_checkpoint(path)
    path = checkpoint.path
    data = dict(checkpoint.data or {})
    try:
        data_config = DataConfig.from_dict(data) if data else None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: metadata {DATA_KEY!r}: {error}") from error
    model = load(checkpoint).eval()
    check_finite(model, path)
    num_classes = model.config.num_classes
    classes = list(checkpoint.classes) if checkpoint.classes is not None else None
    if classes is None:
        classes = [str(index) for index in range(num_classes)]
    elif len(classes) != num_classes or not all(isinstance(name, str) for name in classes):
        where = f"metadata {CLASSES_KEY!r}" if CLASSES_KEY in checkpoint.metadata else "config.json id2label"
        raise CheckpointError(
            f"{path}: {where}: expected {num_classes} class names (the head's outputs), found "
            f"{len(classes)} entries"
        )
    # Training stores the resolution it trained at; another one from a file (the model runs at any
    # multiple of its stride) could ask for an attention over millions of tokens.
    if data_config is not None and (data_config.img_size,) * 2 != model.config.img_size:
        raise CheckpointError(
            f"{path}: metadata {DATA_KEY!r}: img_size {data_config.img_size}, but the model is "
            f"built for {model.config.img_size}"
        )
    return model, classes, data


def check_finite(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Refuse weights with NaN or infinity: every prediction from them would be meaningless."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            num_bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: non-finite weights: {name} has {num_bad} of {tensor.numel()} values NaN or "
                f"infinite; refusing to evaluate or predict with them"
            )


@torch.no_grad()
def predict_images(
    model: VisionTransformer, classes: list[str], images: torch.Tensor, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """Preprocessed images (B, 3, H, W) -> for each, the top-k (class name, probability) pairs."""
    probabilities = model(images).float().softmax(dim=-1)
    values, indices = probabilities.topk(min(top_k, len(classes)), dim=-1)
    return [
        [(classes[index], float(value)) for value, index in zip(row_values, row_indices, strict=True)]
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
    ]
