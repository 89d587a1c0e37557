"""The evaluation of a training run: one object that owns the evaluation split, the predict function
(the run's autocast context, flip TTA), the cap on samples, keep-best (`best.safetensors`) and the
final results (`results.json`, the confusion matrix).

The loop asks `due(epoch, finished)` and calls `evaluate`; it never sees the split or the metrics'
names. Evaluation draws no random numbers from the training's generators (their states are put back),
so a run resumed from the checkpoint written just before an evaluation continues bitwise.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data import build_loader
from ..eval.classification import (
    ClassificationResult,
    averaged_views,
    evaluate_classification,
    plot_confusion_matrix,
    write_results,
)
from ..files import CheckpointError, atomic_write, read_json
from . import distributed
from .experiment import EvalConfig, Experiment, check_top_k
from .state import Progress, capture_rng, restore_rng, write_weights

log = logging.getLogger(__name__)

EVALUATED_NAME = "evaluated.json"  # beside a checkpoint: its evaluation, written after it


def check_same_classes(train_classes: list[str], split_classes: list[str], split: str) -> None:
    """Refuse, before any training, an evaluation split whose classes are not the training split's."""
    if split_classes == train_classes:
        return
    unknown = [name for name in split_classes if name not in train_classes]
    missing = [name for name in train_classes if name not in split_classes]
    if unknown:
        raise ValueError(
            f"split {split!r} has classes the train split lacks: {', '.join(map(repr, unknown[:5]))}"
            f"{' ...' if len(unknown) > 5 else ''} ({len(split_classes)} classes vs {len(train_classes)})"
        )
    if missing:
        raise ValueError(
            f"split {split!r} lacks classes of the train split: {', '.join(map(repr, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''}; its labels would not match the model's outputs"
        )
    raise ValueError(f"split {split!r} lists the train split's classes in another order: {split_classes}")


def capped(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], max_samples: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_samples` samples of `batches` (the last batch cut short)."""
    left = max_samples
    for images, labels in batches:
        if left <= 0:
            return
        yield images[:left], labels[:left]
        left -= len(labels)


class Evaluator:
    """Evaluates the run's weights on `eval.split` after every `eval.every` epochs and at the end."""

    def __init__(self, cfg: EvalConfig, loader, classes: list[str], env: distributed.Env, out_dir: Path):
        self.cfg, self.loader, self.classes, self.env, self.out_dir = cfg, loader, classes, env, out_dir
        self.best_path = out_dir / "best.safetensors"

    @classmethod
    def build(cls, experiment: Experiment, env: distributed.Env, classes: list[str]) -> Evaluator | None:
        """None when the experiment evaluates nothing (eval.split="")."""
        cfg = experiment.eval
        if not cfg.split:
            return None
        check_top_k(cfg.top_k, len(classes))
        loader = build_loader(
            experiment.data, cfg.split, rank=env.rank, world_size=env.world_size, augment=False
        )
        check_same_classes(classes, loader.classes, cfg.split)
        return cls(cfg, loader, classes, env, Path(experiment.train.out_dir))

    def due(self, epoch: int, finished: bool) -> bool:
        """Whether the end of `epoch` (counted from 1) is evaluated."""
        return epoch % self.cfg.every == 0 or finished

    def batches(self, model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the split, at most eval.max_samples in all; under FSDP padded with empty
        batches so that every rank runs as many forwards."""
        batches, num_batches = iter(self.loader), len(self.loader)
        if self.cfg.max_samples:
            share = math.ceil(self.cfg.max_samples / self.env.world_size)
            batches = capped(batches, share)
            num_batches = min(num_batches, math.ceil(share / self.loader.cfg.batch_size))
        if distributed.is_sharded(model):
            config = distributed.unwrap(model).config
            empty = torch.zeros(0, config.in_chans, *config.img_size)
            batches = distributed.even_batches(batches, num_batches, empty)
        return batches

    def evaluate(self, model: torch.nn.Module, autocast: Callable) -> ClassificationResult:
        """Top-k accuracies and the confusion matrix of `model` (the EMA or the trained weights)."""
        inner = distributed.unwrap(model)
        was_training = inner.training
        inner.eval()

        def predict(images: torch.Tensor) -> torch.Tensor:
            with autocast():
                return inner(images)

        rng = capture_rng(self.env.device)
        result = evaluate_classification(
            averaged_views(predict, self.cfg.hflip_tta, self.cfg.shift_tta),
            self.batches(inner),
            self.classes,
            top_k=self.cfg.top_k,
            to_device=lambda tensor: tensor.to(self.env.device, non_blocking=True),
            reduce=distributed.all_reduce_sum,
            progress=self.env.main_process,
        )
        restore_rng(rng, self.env.device)
        inner.train(was_training)
        self.report_unreadable()
        return result

    def unreadable(self) -> int:
        """How many files of the split the loader skipped as unreadable (0 when it does not count)."""
        for source in (self.loader, getattr(self.loader, "dataset", None)):
            count = getattr(source, "unreadable", None)
            if isinstance(count, int) and not isinstance(count, bool):
                return count
            if isinstance(count, (list, tuple, set, dict)):
                return len(count)
        return 0

    def report_unreadable(self) -> None:
        count = self.unreadable()
        if count and self.env.main_process:
            print(f"eval: {count} unreadable files of split {self.cfg.split!r} skipped", file=sys.stderr)

    def keep_best(
        self, result: ClassificationResult, progress: Progress, model, metadata: dict[str, str]
    ) -> None:
        """Write `model`'s weights as best.safetensors when top-1 beats the best so far (every rank
        calls it: FSDP gathers the shards)."""
        top1 = result.top_k(1)
        if progress.best_metric is not None and top1 <= progress.best_metric:
            return
        progress.best_metric, progress.best_step = top1, progress.step
        weights = distributed.full_state_dict(model)
        if self.env.main_process:
            write_weights(self.best_path, weights, metadata)

    def summary(
        self, result: ClassificationResult, progress: Progress, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """The final results (main process): results.json, the confusion matrix, the metrics."""
        extra = {key: summary[key] for key in ("steps", "train_time_s") if key in summary}
        written = {
            **result.metrics(),
            "best": str(self.best_path),
            "best_top1": progress.best_metric,
            "confusion_matrix": str(plot_confusion_matrix(result, self.out_dir / "confusion_matrix.png")),
        }
        if self.unreadable():
            written["unreadable"] = self.unreadable()
        path = write_results(
            result,
            self.out_dir / "results.json",
            split=self.cfg.split,
            best_top1=progress.best_metric,
            **extra,
        )
        return {**written, "results": str(path)}


# The evaluation beside a checkpoint --------------------------------------------------------------------
def write_evaluated(folder: Path, progress: Progress, result: ClassificationResult) -> None:
    """Record beside the checkpoint `folder` that its evaluation ran, and the best it left."""
    record = {"step": progress.step, "best_metric": progress.best_metric, "best_step": progress.best_step}
    record["metrics"] = result.metrics()
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(folder / EVALUATED_NAME, lambda tmp: Path(tmp).write_text(text))


def read_evaluated(folder: Path, progress: Progress) -> bool:
    """Whether the checkpoint `folder` was evaluated; if so its best is put into `progress`."""
    path = folder / EVALUATED_NAME
    if not path.exists():
        return False
    record = read_json(path)
    best, best_step = record.get("best_metric"), record.get("best_step")
    valid = (
        record.get("step") == progress.step
        and type(best) in (int, float)
        and 0 <= best <= 1
        and type(best_step) is int
        and 0 <= best_step <= progress.step
    )
    if not valid:
        raise CheckpointError(
            f"{path}: 'step', 'best_metric' and 'best_step' do not describe this checkpoint"
        )
    progress.best_metric, progress.best_step = float(best), best_step
    return True
