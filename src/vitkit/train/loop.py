"""The training loop: `train` runs an experiment (`experiment.py`) to the end.

One value moves through it: the config opens the run folder (`run_folder.open_run`), which names the
checkpoint to resume from; that checkpoint is read into one `TrainState` and restored whole into the
`Learner` (`learner.py`); steps change the learner; each epoch's end writes the whole state, then the
task's evaluator (`evaluator.py`) evaluates it. The task (`task.py`: classification, or masked-patch
pre-training in `pretrain.py`) supplies the model, optimiser, objective, evaluator and outputs.

It runs the same way on one CPU, one GPU or N processes under torchrun (nanoGPT's habit: one autocast
context, a grad scaler enabled only for fp16, and `main_process` guarding every write):

    for each optimiser step:  lr from the schedule
        for each micro-batch:  autocast forward -> loss; stop if not finite; scaled backward
        unscale, clip, step, EMA update;  log;  checkpoint every N steps
    each epoch: checkpoint (the whole state, resumable bitwise), then evaluate and keep the best

Only this file, `learner.py`, `precision.py` and `distributed.py` know about devices and ranks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import build_loader
from ..eval.classification import ClassificationResult
from ..models.config import ViTConfig
from ..models.vit import VisionTransformer
from . import distributed, run_folder
from .evaluator import read_evaluated, write_evaluated
from .experiment import Experiment, check_model_config
from .learner import Learner, choose_thread_count
from .metrics import MetricsLog, plot_curves
from .optim import learning_rate, progressive_size, set_lr
from .precision import setup_arithmetic
from .state import apply_retention, find_resumable, read_state, write_state
from .task import Batch, Task, build_model, classification_task

__all__ = ["NonFiniteLossError", "build_model", "run_config", "train"]

MakeTask = Callable[[Any, distributed.Env, Any], Task]
# Measuring the thread count costs ~3 passes per count tried: runs shorter than this keep the default.
MIN_STEPS_TO_MEASURE = 50


class NonFiniteLossError(RuntimeError):
    """Raised before the optimiser step that a NaN/inf loss would have poisoned."""


def run_config(experiment: Any) -> dict[str, Any]:
    """The config saved as config.json. train.resume says how this start was asked for (the history
    records it), not what the run is: it is saved as "auto", so a saved config resumes."""
    config = experiment.to_dict()
    config["train"]["resume"] = "auto"
    return config


def train(experiment: Any, make_task: MakeTask = classification_task) -> dict[str, Any]:
    """Run an experiment to the end (resuming from its run folder when it has a valid checkpoint):
    classification by default, another task (`pretrain.py`) by its `make_task`. Returns the final
    metrics and the paths of what was written (on the main process)."""
    cfg = experiment.train
    env = distributed.setup(cfg.device)
    init_from = getattr(experiment.model, "init_from", "")
    keep = (Path(init_from),) if init_from else ()
    try:
        with run_folder.open_run(
            cfg.out_dir, run_config(experiment), resume=cfg.resume, keep=keep, main=env.main_process
        ) as folder:
            return Run(experiment, env, make_task).run(folder)
    finally:
        distributed.cleanup()


class Run:
    """One training run: the task's parts, the learner, the schedule, and the loop over them."""

    def __init__(self, experiment: Experiment, env: distributed.Env, make_task: MakeTask):
        self.exp, self.env, cfg = experiment, env, experiment.train
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.arithmetic = setup_arithmetic(cfg.precision, cfg.num_threads, env.device, local_world_size)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.strategy == "fsdp" and cfg.compile:
            raise ValueError("train.strategy='fsdp' does not support train.compile; use 'ddp' to compile")
        if cfg.strategy == "fsdp" and experiment.optim.name == "muon":
            raise ValueError("train.strategy='fsdp' does not support optim.name='muon'; use 'ddp' or 'adamw'")
        planned = check_model_config(experiment.model, experiment.data)
        if planned is not None:  # a fresh model's stride is known before any data is read
            self.check_progressive(planned)
        self.train_loader = build_loader(experiment.data, "train", rank=env.rank, world_size=env.world_size)
        self.task = make_task(experiment, env, self.train_loader)
        self.evaluator = self.task.evaluator
        self.learner = Learner(self.task, cfg, env, self.arithmetic)
        self.progress = self.learner.progress
        self.steps_per_epoch = len(self.train_loader) // cfg.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch of {len(self.train_loader)} batches is shorter than train.accumulation={cfg.accumulation}"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(experiment.optim.warmup_epochs * self.steps_per_epoch)
        self.last_step = cfg.max_steps or math.inf
        self.step_samples = experiment.data.batch_size * cfg.accumulation
        # The ViT inside the task's model (the encoder of pre-training): its stride and channels.
        self.vit_config = next(
            (m.config for m in self.task.model.modules() if isinstance(m, VisionTransformer)), None
        )
        self.check_progressive(self.vit_config)  # a checkpoint's model is known once it is read
        self.train_size = experiment.data.img_size  # the training batches' side now (progressive resizing)
        self.result: ClassificationResult | None = None
        # The checkpoint whose evaluation an interrupt cut short: evaluated before training goes on.
        self.pending_evaluation: Path | None = None

    def check_progressive(self, vit_config: ViTConfig | None) -> None:
        """train.progressive_min_size against the model and the data: a multiple of the model's stride,
        below data.img_size."""
        minimum, size = self.exp.train.progressive_min_size, self.exp.data.img_size
        if not minimum:
            return
        if vit_config is None:
            raise ValueError(f"train.progressive_min_size={minimum}: this run's model is not a ViT")
        stride = vit_config.stride
        if minimum % stride or not stride <= minimum < size:
            raise ValueError(
                f"train.progressive_min_size={minimum}: expected a multiple of the model's stride {stride} "
                f"below data.img_size={size} (e.g. {max(stride, size * 3 // 4 // stride * stride)})"
            )

    # Start --------------------------------------------------------------------------------------------
    def resume(self, folder: run_folder.RunFolder) -> int | None:
        """Restore the run folder's checkpoint whole; its step (None: a fresh start). An evaluation that
        its epoch's end asked for and an interrupt cut short runs now."""
        if folder.checkpoint is None:
            return None
        state = read_state(folder.checkpoint)
        self.learner.restore(state, folder.checkpoint)
        self.progress = self.learner.progress
        evaluated = self.evaluator is None or read_evaluated(folder.checkpoint, self.progress)
        folder.check_finished(self.progress.step, self.limit_reached())
        if self.env.main_process:
            print(
                f"resumed from {folder.checkpoint} at step {self.progress.step} (epoch {self.progress.epoch}, "
                f"sample {self.progress.position} of the epoch)",
                file=sys.stderr,
            )
        self.check_position()
        if state.evaluation_due and not evaluated:
            self.pending_evaluation = folder.checkpoint
        return self.progress.step

    def limit_reached(self) -> str | None:
        """The setting that leaves nothing to train (None: training goes on)."""
        cfg, progress = self.exp.train, self.progress
        if progress.step >= self.last_step:
            return f"train.max_steps={cfg.max_steps}"
        if progress.epoch >= cfg.epochs:
            return f"train.epochs={cfg.epochs}"
        if self.budget_spent() >= 1:
            return f"train.time_budget_minutes={cfg.time_budget_minutes}"
        return None

    def check_position(self) -> None:
        """The resumed position in the epoch must fit the data as it is now: past the epoch's end (files
        removed from the data set) the epoch restarts; off a step boundary (another batch size or
        accumulation) it goes back to the step's start. One line says which."""
        position, epoch, step_samples = self.progress.position, self.progress.epoch, self.step_samples
        if position > self.steps_per_epoch * step_samples:
            self.progress.position = 0
            note = (
                f"resume: the saved position, sample {position} of epoch {epoch}, is past the end of an epoch "
                f"of the data as it is now ({self.steps_per_epoch * step_samples} samples: files removed?); "
                f"epoch {epoch} restarts from its first sample"
            )
        elif position % step_samples:
            self.progress.position = position - position % step_samples
            note = (
                f"resume: the saved position, sample {position} of epoch {epoch}, is not at a step of "
                f"{step_samples} samples (data.batch_size or train.accumulation changed); the epoch goes on "
                f"from sample {self.progress.position}"
            )
        else:
            return
        if self.env.main_process:
            print(note, file=sys.stderr)

    # The loop -----------------------------------------------------------------------------------------
    def run(self, folder: run_folder.RunFolder) -> dict[str, Any]:
        resumed_step = self.resume(folder)
        folder.record_start(resumed_step, self.env.world_size, self.train_loader.class_to_idx)
        if self.env.main_process:
            print("\n".join(self.arithmetic.notes), file=sys.stderr)
        if self.threads_to_measure():
            self.choose_threads()
        metrics = MetricsLog(self.out_dir, self.env.main_process, resumed_step)
        wrapped = torch.compile(self.learner.wrapped) if self.exp.train.compile else self.learner.wrapped
        wrapped.train()
        if self.pending_evaluation is not None:
            epoch = self.progress.epoch - 1 if self.progress.position == 0 else self.progress.epoch
            self.evaluate(metrics, epoch, self.pending_evaluation)
        while self.limit_reached() is None:
            self.run_epoch(wrapped, metrics)
        metrics.close()
        return self.finish(folder)

    def threads_to_measure(self) -> bool:
        """Whether the run measures its CPU thread count: train.num_threads left at 0 on a CPU, one
        process, no compilation (its first passes compile), more than one thread to choose from, and
        enough steps left to repay the few passes measured (a smoke run keeps the default)."""
        cfg = self.exp.train
        steps_left = min(self.total_steps, self.last_step) - self.progress.step
        return (
            self.env.device.type == "cpu"
            and cfg.num_threads == 0
            and not cfg.compile
            and self.env.world_size == 1
            and torch.get_num_threads() > 1
            and steps_left >= MIN_STEPS_TO_MEASURE
            and self.limit_reached() is None
        )

    def choose_threads(self) -> None:
        """Measure, never assume: a busy machine can make every free core slower than one. Throwaway
        passes of one random batch at each candidate count, before the first step, so the steps
        themselves are those of the count chosen."""
        data = self.exp.data
        in_chans = self.vit_config.in_chans
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(data.batch_size, in_chans, data.img_size, data.img_size, generator=generator)
        batch = (
            images.to(self.env.device),
            torch.zeros(data.batch_size, dtype=torch.long, device=self.env.device),
        )
        rates = self.learner.measure_threads(self.task.objective, batch, self.arithmetic)
        threads, line = choose_thread_count(rates, torch.get_num_threads())
        torch.set_num_threads(threads)
        print(line, file=sys.stderr)

    def budget_spent(self) -> float:
        """The fraction of train.time_budget_minutes spent on training steps (0 without a budget); the
        slowest rank's time, so that all ranks follow one lr schedule and stop at the same step."""
        budget = self.exp.train.time_budget_minutes * 60
        if not budget:
            return 0.0
        slowest = distributed.all_reduce_max(torch.tensor(self.progress.train_time, dtype=torch.float64))
        return slowest.item() / budget

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        self.train_loader.set_epoch(epoch)
        self.train_loader.set_start(start)
        device = self.env.device
        for images, targets in self.train_loader:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def run_epoch(self, wrapped: torch.nn.Module, metrics: MetricsLog) -> None:
        """The rest of the current epoch (or up to a limit); at its end the state, then its evaluation."""
        cfg, progress = self.exp.train, self.progress
        epoch = progress.epoch
        step_in_epoch = progress.position // self.step_samples
        batches = self.batches(epoch, progress.position)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=step_in_epoch,
            disable=not self.env.main_process,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            dynamic_ncols=True,
        )
        while step_in_epoch < self.steps_per_epoch and progress.step < self.last_step:
            spent = self.budget_spent()
            if spent >= 1:
                break
            started = time.perf_counter()
            schedule_step = max(progress.step, spent * self.total_steps)
            lr = learning_rate(self.exp.optim, schedule_step, self.total_steps, self.warmup_steps)
            self.resize_for(schedule_step / self.total_steps)
            totals, grad_norm = self.train_step(wrapped, batches, lr)
            step_in_epoch += 1
            progress.position += self.step_samples
            elapsed = time.perf_counter() - started
            progress.train_time += elapsed
            bar.update(1)
            at_epoch_end = step_in_epoch == self.steps_per_epoch
            if progress.step % cfg.log_every == 0 or at_epoch_end:
                self.log_step(metrics, bar, epoch, lr, elapsed, totals, grad_norm)
            if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and not at_epoch_end:
                self.save()
        bar.close()
        self.end_epoch(epoch, step_in_epoch == self.steps_per_epoch, metrics)

    def resize_for(self, progress: float) -> None:
        """The training image side at this point of the schedule (progressive resizing), said in one
        line when it changes."""
        cfg, full = self.exp.train, self.exp.data.img_size
        if not cfg.progressive_min_size:
            return
        stride = self.vit_config.stride
        size = progressive_size(cfg.progressive_min_size, full, stride, progress, cfg.progressive_end)
        if size != self.train_size:
            if self.env.main_process:
                print(
                    f"progressive resizing: training at {size}x{size} from step {self.progress.step}",
                    file=sys.stderr,
                )
            self.train_size = size

    def train_step(
        self, wrapped: torch.nn.Module, batches: Iterator[Batch], lr: float
    ) -> tuple[dict, float | None]:
        """One optimiser step over train.accumulation micro-batches, under the run's one autocast
        context; the metrics averaged over the micro-batches and the gradient norm (when clipping)."""
        accumulation, learner = self.exp.train.accumulation, self.learner
        set_lr(learner.optimizer, lr)
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            batch = next(batches)
            if self.train_size != self.exp.data.img_size:
                images = torch.nn.functional.interpolate(
                    batch[0], size=(self.train_size,) * 2, mode="bilinear", antialias=True
                )
                batch = (images, batch[1])
            # Gradients are all-reduced on the last micro-batch only.
            with distributed.gradient_sync(wrapped, enabled=micro == accumulation - 1):
                with self.arithmetic.autocast():
                    loss, step_metrics = self.task.objective(wrapped, batch, self.progress.step, micro)
                self.check_finite(loss, micro)
                learner.scaler.scale(loss / accumulation).backward()
            for key, value in step_metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) / accumulation
        return totals, learner.apply_gradients(self.exp.optim.clip_grad)

    def check_finite(self, loss: torch.Tensor, micro: int) -> None:
        """Every rank stops together before the step, also those whose own loss was finite."""
        finite = distributed.all_reduce_min(torch.isfinite(loss.detach()).float().cpu())
        if finite.item() != 0:
            return
        value = loss.item()
        what = value if not math.isfinite(value) else f"on another rank (here {value:.4g})"
        last_good = find_resumable(self.checkpoint_dir)[0] or "none (no checkpoint written yet)"
        raise NonFiniteLossError(
            f"non-finite loss {what} at step {self.progress.step} (epoch {self.progress.epoch}, micro-batch "
            f"{micro}) before the optimiser step; the last good checkpoint is {last_good}"
        )

    def log_step(self, metrics, bar, epoch: int, lr: float, elapsed: float, totals: dict, grad_norm) -> None:
        row = {"step": self.progress.step, "epoch": epoch, "kind": "train", "split": "train", "lr": lr}
        row["samples_per_s"] = self.step_samples * self.env.world_size / elapsed
        row.update(train_time_s=self.progress.train_time, **totals)
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        metrics.write(row)
        bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}")

    # Epoch ends, checkpoints and evaluation ---------------------------------------------------------------
    def end_epoch(self, epoch: int, completed: bool, metrics: MetricsLog) -> None:
        """The whole state first, then the evaluation: an interrupt during the evaluation loses nothing
        (the resumed run evaluates that checkpoint before it trains on)."""
        if completed:
            self.progress.epoch, self.progress.position = epoch + 1, 0
        finished = self.limit_reached() is not None
        due = self.evaluator is not None and self.evaluator.due(self.progress.epoch, finished)
        folder = self.save(evaluation_due=due)
        if due:
            self.evaluate(metrics, epoch, folder)

    def save(self, evaluation_due: bool = False) -> Path | None:
        """A resumable checkpoint of the whole state; every rank calls it, the main process writes."""
        state = self.learner.state()
        if state is None:
            return None
        state.evaluation_due = evaluation_due
        folder = write_state(self.checkpoint_dir, state, self.task.metadata)
        apply_retention(self.checkpoint_dir, self.exp.train.keep_last)
        return folder

    def evaluate(self, metrics: MetricsLog, epoch: int, checkpoint: Path | None) -> None:
        """Evaluate, keep the best, and record beside `checkpoint` that its evaluation ran."""
        model = self.learner.eval_model(self.exp.eval.use_ema)
        self.result = result = self.evaluator.evaluate(model, self.arithmetic.autocast)
        row = {"step": self.progress.step, "epoch": epoch, "kind": "eval", "split": self.exp.eval.split}
        metrics.write({**row, "train_time_s": self.progress.train_time, **result.metrics()})
        self.evaluator.keep_best(result, self.progress, model, self.task.metadata)
        if self.env.main_process:
            if checkpoint is not None:
                write_evaluated(checkpoint, self.progress, result)
            print(f"epoch {epoch + 1}: {self.exp.eval.split} top-1 {result.top_k(1):.2%}", file=sys.stderr)

    def finish(self, folder: run_folder.RunFolder) -> dict[str, Any]:
        """The final weights, results and figures (main process); the summary returned to the caller."""
        if self.evaluator is not None and self.result is None:
            model = self.learner.eval_model(self.exp.eval.use_ema)
            self.result = self.evaluator.evaluate(model, self.arithmetic.autocast)
        weights = distributed.full_state_dict(self.learner.wrapped)
        ema = self.learner.ema
        ema_weights = (
            distributed.full_state_dict(ema.model) if ema is not None and self.task.outputs_use_ema else None
        )
        summary: dict[str, Any] = {
            "out_dir": str(self.out_dir),
            "steps": self.progress.step,
            "precision": self.arithmetic.precision,
        }
        if not self.env.main_process:
            return summary
        summary["train_time_s"] = round(self.progress.train_time, 2)
        summary.update(self.task.write_outputs(weights, ema_weights, self.out_dir))
        curves = plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
        summary.update(metrics=str(self.out_dir / "metrics.jsonl"), curves=str(curves))
        if self.result is not None:
            summary.update(self.evaluator.summary(self.result, self.progress, summary))
        scores = {key: summary[key] for key in ("top1", "top5", "loss", "accuracy") if key in summary}
        split = self.exp.eval.split if self.result is not None else "train"
        folder.record_finish(step=self.progress.step, epoch=self.progress.epoch, split=split, **scores)
        return summary
