"""The training loop: `train` runs an experiment (`experiment.py`) to the end.

It runs the same way on one CPU, one GPU or N processes under torchrun (nanoGPT's habit: one autocast
context, a grad scaler enabled only for fp16, and `main_process` guarding every write):

    for each optimiser step:  lr from the schedule
        for each micro-batch:  autocast forward -> loss; stop if not finite; scaled backward
        unscale, clip, step, EMA update;  log;  checkpoint every N steps
    each epoch: evaluate, keep the best weights, checkpoint (the whole state, resumable bitwise)

Only this file, `precision.py` and `distributed.py` know about devices and ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..data import build_loader
from ..data.datasets import derive_seed
from ..eval.classification import (
    ClassificationResult,
    evaluate_classification,
    flip_averaged,
    plot_confusion_matrix,
    write_results,
)
from ..fast import apply_fast_paths
from ..io import atomic_write
from ..io import load as load_model
from ..models.vit import VisionTransformer
from ..registry import create_model
from . import distributed, run_folder
from .ema import ModelEma
from .experiment import Experiment, ModelConfig, check_model_config, check_top_k
from .metrics import MetricsLog, plot_curves
from .objectives import get_objective
from .optim import apply_freeze_rule, build_optimizer, learning_rate, set_lr
from .precision import setup_arithmetic
from .state import (
    Checkpoint,
    Progress,
    apply_retention,
    capture_rng,
    decode_bytes,
    encode_bytes,
    find_resumable,
    load_checkpoint,
    model_metadata,
    restore_rng,
    save_checkpoint,
    write_weights,
)

log = logging.getLogger(__name__)


# The model ------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, img_size: int, num_classes: int) -> VisionTransformer:
    """The model of `cfg` for this data: a registered name, or a checkpoint via `vitkit.load`."""
    overrides = {"img_size": img_size, "num_classes": num_classes, **cfg.overrides}
    if cfg.init_from:
        model = load_model(cfg.init_from, **overrides)
        log.info("model: initialised from %s with overrides %s", cfg.init_from, overrides)
    else:
        model = create_model(cfg.name, **overrides)
    num_trainable = apply_freeze_rule(model, cfg.freeze)
    log.info(
        "model: %s parameters, %s trainable (%s)", f"{model.num_params():,}", f"{num_trainable:,}", cfg.freeze
    )
    return model


class NonFiniteLossError(RuntimeError):
    """Raised before the optimiser step that a NaN/inf loss would have poisoned."""


# The loop -------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(experiment: Experiment) -> dict[str, Any]:
    """Run an experiment to the end (resuming from its run folder when it has a valid checkpoint).

    Returns the final metrics and the paths of what was written (on the main process).
    """
    env = distributed.setup(experiment.train.device)
    try:
        with hold_run_folder(experiment.train.out_dir, env):
            return Trainer(experiment, env).run()
    finally:
        distributed.cleanup()


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


@contextlib.contextmanager
def hold_run_folder(out_dir: str | Path, env: distributed.Env) -> Iterator[None]:
    """The run folder's lock, held by the main process for the whole run; a second writer's refusal
    (RunFolderError, naming the holder) stops every rank of the second run at once."""
    lock = run_folder.RunLock(out_dir)
    distributed.on_main_process(env.main_process, lock.acquire)
    try:
        yield
    finally:
        lock.release()


class Trainer:
    """One training run of an experiment. What differs between tasks is in the hooks `build_model`,
    `build_optimizer`, `build_eval_loader`, `build_metadata`, `objective`, `gather_final` and
    `write_final`: supervised
    classification here, masked-patch pre-training in `pretrain.py`; the loop, resumption, DDP/FSDP,
    EMA, precision, budget and logging are shared, and so is the run folder's contract
    (`run_folder.py`: one writer, checked resumes, start-overs set aside, finished runs not rerun)."""

    def __init__(self, experiment: Experiment, env: distributed.Env):
        self.exp = experiment
        self.env = env
        cfg = experiment.train
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.arithmetic = setup_arithmetic(cfg.precision, cfg.num_threads, env.device, local_world_size)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.strategy == "fsdp" and cfg.compile:
            raise ValueError("train.strategy='fsdp' does not support train.compile; use 'ddp' to compile")
        self._objective = get_objective(cfg.objective)
        data = experiment.data
        check_model_config(experiment.model, data)
        self.train_loader = build_loader(data, "train", rank=env.rank, world_size=env.world_size)
        self.classes = self.train_loader.classes
        self.eval_loader = self.build_eval_loader()
        # The same seed on every rank gives the same initial weights (DDP also broadcasts rank 0's).
        seed_everything(cfg.seed)
        model = self.build_model()
        for module in model.modules():
            if isinstance(module, VisionTransformer):
                module.set_grad_checkpointing(cfg.grad_checkpointing)
        self.model = model.to(env.device)
        apply_fast_paths(self.model, env.device, self.arithmetic.precision)
        self.ema = ModelEma(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # FSDP replaces the parameters by their shards: wrap before the optimiser takes them.
        self.wrapped = distributed.wrap(self.model, env, cfg.strategy)
        if self.ema is not None and distributed.is_sharded(self.wrapped):
            # Sharded like the weights it follows: each rank averages its own shards.
            distributed.shard(self.ema.model)
        self.optimizer = self.build_optimizer()
        self.scaler = self.arithmetic.grad_scaler()
        self.steps_per_epoch = len(self.train_loader) // cfg.accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch of {len(self.train_loader)} batches is shorter than train.accumulation={cfg.accumulation}"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(experiment.optim.warmup_epochs * self.steps_per_epoch)
        self.progress = Progress()
        self.resumed_from: Path | None = None
        self.metadata = self.build_metadata()

    # The task's hooks ---------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        return build_model(self.exp.model, self.exp.data.img_size, self.train_loader.num_classes)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Over `self.model`'s parameters, after FSDP has replaced them by their shards."""
        return build_optimizer(self.model, self.exp.optim)

    def build_eval_loader(self):
        split = self.exp.eval.split
        if not split:
            return None
        check_top_k(self.exp.eval.top_k, len(self.classes))
        loader = build_loader(
            self.exp.data, split, rank=self.env.rank, world_size=self.env.world_size, augment=False
        )
        check_same_classes(self.classes, loader.classes, split)
        return loader

    def build_metadata(self) -> dict[str, str]:
        """What makes the weight files self-describing (config, classes, data)."""
        return model_metadata(self.model.config, self.classes, self.exp.data.to_dict())

    def objective(self, wrapped: torch.nn.Module, batch, micro: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss and metrics (under autocast; the loop does the rest)."""
        return self._objective(wrapped, batch)

    def gather_final(self, wrapped: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The final states to write, unsharded (every rank calls it; FSDP gathers to rank 0)."""
        return {"weights": distributed.full_state_dict(wrapped)}

    def write_final(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
        """Write the final weight files (main process); their paths for the summary."""
        write_weights(self.out_dir / "last.safetensors", states["weights"], self.metadata)
        return {"last": str(self.out_dir / "last.safetensors")}

    # Resume ---------------------------------------------------------------------------------------------
    def resume(self) -> int | None:
        """Restore the newest valid checkpoint of the run folder; returns its step (None: fresh start)."""
        if self.exp.train.resume == "never":
            return None
        folder = distributed.on_main_process(
            self.env.main_process, lambda: run_folder.newest_valid_checkpoint(self.checkpoint_dir)
        )
        if folder is None:
            return None
        self.resumed_from = folder
        checkpoint: Checkpoint = load_checkpoint(folder)
        distributed.load_model_state(self.wrapped, checkpoint.model)
        distributed.load_optimizer_state(self.wrapped, self.optimizer, checkpoint.optimizer)
        if self.ema is not None:
            if checkpoint.ema is None:
                raise ValueError(f"{folder}: has no EMA weights but train.ema_decay > 0")
            distributed.load_model_state(self.ema.model, checkpoint.ema)
        if checkpoint.scaler:
            self.scaler.load_state_dict(checkpoint.scaler)
        self.progress = checkpoint.progress
        if checkpoint.world_size == self.env.world_size:
            self.restore_rng(checkpoint.rng[self.env.rank])
        else:
            log.warning(
                "resume: %s was written by %d processes, this run has %d: RNG streams are re-seeded",
                folder, checkpoint.world_size, self.env.world_size,
            )  # fmt: skip
            seed_everything(derive_seed("resume", self.exp.train.seed, self.env.rank, self.progress.step))
        return self.progress.step

    # The run folder's contract (run_folder.py) ------------------------------------------------------
    def run_config(self) -> dict[str, Any]:
        """The config saved as config.json. train.resume says how this start was asked for (the
        history records it), not what the run is: it is saved as "auto", so a saved config resumes."""
        config = self.exp.to_dict()
        config["train"]["resume"] = "auto"
        return config

    def prepare_folder(self) -> tuple[dict[str, list[Any]], Path | None]:
        """Main process, before the resume: set the folder's earlier run aside (train.resume=never),
        or clean the debris of killed writes and check this config against the folder's. Returns the
        schedule changes and where the earlier run went."""
        if self.exp.train.resume == "never":
            init_from = self.exp.model.init_from
            return {}, run_folder.set_aside(self.out_dir, (Path(init_from),) if init_from else ())
        changes = run_folder.check_resume(self.out_dir, self.run_config())
        run_folder.clean_debris(self.out_dir)
        return changes, None

    def check_finished(self, last_step: float, changes: dict[str, list[Any]]) -> None:
        """A resumed run with nothing left to train whose finish is recorded is not run again (one
        killed after its last checkpoint has no finish entry: `finish` writes what it had not): the
        same config is told so (RunFinishedError), changes that leave nothing to train are refused."""
        cfg, progress = self.exp.train, self.progress
        over_budget = self.budget_spent() >= 1
        if progress.epoch < cfg.epochs and progress.step < last_step and not over_budget:
            return
        entry = distributed.on_main_process(
            self.env.main_process, lambda: run_folder.finished_entry(self.out_dir, progress.step)
        )
        if entry is None:
            return
        if progress.step >= last_step:
            limit = f"train.max_steps={cfg.max_steps}"
        elif over_budget and progress.epoch < cfg.epochs:
            limit = f"train.time_budget_minutes={cfg.time_budget_minutes}"
        else:
            limit = f"train.epochs={cfg.epochs}"
        message = run_folder.finished_message(self.out_dir, entry, limit, changes)
        raise (run_folder.RunFolderError if changes else run_folder.RunFinishedError)(message)

    def check_position(self) -> None:
        """The resumed position in the epoch must fit the data as it is now: past the epoch's end (files
        removed from the data set) the epoch restarts; off a step boundary (another batch size or
        accumulation) it goes back to the step's start. One line says which."""
        step_samples = self.exp.data.batch_size * self.exp.train.accumulation
        position, epoch = self.progress.position, self.progress.epoch
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

    def record_start(
        self, resumed_step: int | None, changes: dict[str, list[Any]], previous_run: Path | None
    ) -> None:
        """Main process: this start's entry in history.jsonl (with its schedule changes), then the
        config (rewritten only after the history says what changed) and the class names."""
        common = {"world_size": self.env.world_size, "changes": changes}
        if resumed_step is None:
            run_folder.append_history(
                self.out_dir, "start", step=0, previous_run=str(previous_run) if previous_run else None,
                config=self.run_config(), **common,
            )  # fmt: skip
        else:
            run_folder.append_history(
                self.out_dir, "resume", step=resumed_step, checkpoint=str(self.resumed_from), **common
            )
        if changes:
            print(
                f"resume: schedule changes recorded in {self.out_dir / run_folder.HISTORY_NAME}: "
                f"{run_folder.describe_changes(changes)}",
                file=sys.stderr,
            )
        config_json = json.dumps(self.run_config(), indent=1) + "\n"
        atomic_write(self.out_dir / run_folder.CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_json))
        classes_json = json.dumps(self.train_loader.class_to_idx, indent=1) + "\n"
        atomic_write(self.out_dir / "class_to_idx.json", lambda tmp: Path(tmp).write_text(classes_json))

    def capture_rng(self) -> dict[str, Any]:
        state = capture_rng()
        if self.env.device.type == "cuda":
            state["cuda"] = encode_bytes(torch.cuda.get_rng_state(self.env.device))
        return state

    def restore_rng(self, state: dict[str, Any]) -> None:
        restore_rng(state)
        if "cuda" in state and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(decode_bytes(state["cuda"]), self.env.device)

    def save(self, wrapped: torch.nn.Module) -> Path | None:
        """A resumable checkpoint of the whole state; every rank calls it, rank 0 writes."""
        rng = distributed.all_gather_object(self.capture_rng())
        weights = distributed.full_state_dict(wrapped)
        optimizer = distributed.full_optimizer_state(wrapped, self.optimizer)
        ema = distributed.full_state_dict(self.ema.model) if self.ema is not None else None
        if not self.env.main_process:
            return None
        folder = save_checkpoint(
            self.checkpoint_dir,
            model=weights,
            metadata=self.metadata,
            optimizer=optimizer,
            progress=self.progress,
            rng=rng,
            ema=ema,
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )
        apply_retention(self.checkpoint_dir, self.exp.train.keep_last)
        return folder

    # Evaluation --------------------------------------------------------------------------------------
    def evaluate(self, wrapped: torch.nn.Module, autocast) -> ClassificationResult:
        use_ema = self.ema is not None and self.exp.eval.use_ema
        model = self.ema.model if use_ema else distributed.unwrap(wrapped)
        was_training = model.training
        model.eval()

        def predict(images: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(images)

        predict = flip_averaged(predict) if self.exp.eval.hflip_tta else predict

        batches = self.eval_loader
        if distributed.is_sharded(model):
            config = distributed.unwrap(model).config
            empty = torch.zeros(0, config.in_chans, *config.img_size)
            batches = distributed.even_batches(batches, len(self.eval_loader), empty)
        result = evaluate_classification(
            predict,
            batches,
            self.classes,
            top_k=self.exp.eval.top_k,
            to_device=lambda tensor: tensor.to(self.env.device, non_blocking=True),
            reduce=distributed.all_reduce_sum,
            progress=self.env.main_process,
        )
        model.train(was_training)
        return result

    def keep_best(self, result: ClassificationResult) -> None:
        top1 = result.top_k(1)
        if self.progress.best_metric is not None and top1 <= self.progress.best_metric:
            return
        self.progress.best_metric, self.progress.best_step = top1, self.progress.step
        use_ema = self.ema is not None and self.exp.eval.use_ema
        weights = distributed.full_state_dict(self.ema.model if use_ema else self.wrapped)
        if self.env.main_process:
            write_weights(self.out_dir / "best.safetensors", weights, self.metadata)

    # The loop ---------------------------------------------------------------------------------------------
    def budget_spent(self) -> float:
        """The fraction of train.time_budget_minutes spent on training steps (0 without a budget); the
        slowest rank's time, so that all ranks follow one lr schedule and stop at the same step."""
        budget = self.exp.train.time_budget_minutes * 60
        if not budget:
            return 0.0
        return (
            distributed.all_reduce_max(torch.tensor(self.progress.train_time, dtype=torch.float64)).item()
            / budget
        )

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.train_loader.set_epoch(epoch)
        self.train_loader.set_start(start)
        device = self.env.device
        for images, targets in self.train_loader:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def run(self) -> dict[str, Any]:
        exp, env, cfg = self.exp, self.env, self.exp.train
        main = env.main_process
        last_step = cfg.max_steps or math.inf
        changes, previous_run = distributed.on_main_process(main, self.prepare_folder)
        resumed_step = self.resume()
        if resumed_step is not None:
            self.check_finished(last_step, changes)
            if main:
                print(
                    f"resumed from {self.resumed_from} at step {self.progress.step} (epoch "
                    f"{self.progress.epoch}, sample {self.progress.position} of the epoch)",
                    file=sys.stderr,
                )
            self.check_position()
        if main:
            self.record_start(resumed_step, changes, previous_run)
            print("\n".join(self.arithmetic.notes), file=sys.stderr)
        metrics = MetricsLog(self.out_dir, main, resumed_step)
        wrapped = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        autocast = self.arithmetic.autocast
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        batch_size = exp.data.batch_size
        result = None
        wrapped.train()
        while self.progress.epoch < cfg.epochs and self.progress.step < last_step and self.budget_spent() < 1:
            epoch = self.progress.epoch
            step_in_epoch = self.progress.position // (batch_size * cfg.accumulation)
            batches = self.batches(epoch, self.progress.position)
            bar = tqdm(
                total=self.steps_per_epoch, initial=step_in_epoch, disable=not main,
                desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True,
            )  # fmt: skip
            while step_in_epoch < self.steps_per_epoch and self.progress.step < last_step:
                spent = self.budget_spent()
                if spent >= 1:
                    break
                started = time.perf_counter()
                step = self.progress.step
                schedule_step = max(step, spent * self.total_steps)
                lr = learning_rate(exp.optim, schedule_step, self.total_steps, self.warmup_steps)
                set_lr(self.optimizer, lr)
                totals: dict[str, float] = {}
                for micro in range(cfg.accumulation):
                    batch = next(batches)
                    # Gradients are all-reduced on the last micro-batch only.
                    with distributed.gradient_sync(wrapped, enabled=micro == cfg.accumulation - 1):
                        with autocast():
                            loss, step_metrics = self.objective(wrapped, batch, micro)
                        finite = distributed.all_reduce_min(torch.isfinite(loss.detach()).float().cpu())
                        if finite.item() == 0:
                            value = loss.item()
                            # Every rank stops together, also those whose own loss was finite.
                            what = (
                                value if not math.isfinite(value) else f"on another rank (here {value:.4g})"
                            )
                            raise NonFiniteLossError(
                                f"non-finite loss {what} at step {step} (epoch {epoch}, micro-batch "
                                f"{micro}) before the optimiser step; the last good checkpoint is "
                                f"{find_resumable(self.checkpoint_dir)[0] or 'none (no checkpoint written yet)'}"
                            )
                        self.scaler.scale(loss / cfg.accumulation).backward()
                    for key, value in step_metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) / cfg.accumulation
                grad_norm = None
                if exp.optim.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, exp.optim.clip_grad))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(distributed.unwrap(wrapped), self.progress.step + 1)
                self.progress.step += 1
                step_in_epoch += 1
                self.progress.position += batch_size * cfg.accumulation
                elapsed = time.perf_counter() - started
                self.progress.train_time += elapsed
                bar.update(1)
                if self.progress.step % cfg.log_every == 0 or step_in_epoch == self.steps_per_epoch:
                    row = {
                        "step": self.progress.step, "epoch": epoch, "kind": "train", "split": "train", "lr": lr,
                        "samples_per_s": batch_size * cfg.accumulation * env.world_size / elapsed,
                        "train_time_s": self.progress.train_time, **totals,
                    }  # fmt: skip
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    metrics.write(row)
                    bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}")
                # The epoch's last step is saved after its evaluation, below.
                at_epoch_end = step_in_epoch == self.steps_per_epoch
                if (
                    cfg.checkpoint_every
                    and self.progress.step % cfg.checkpoint_every == 0
                    and not at_epoch_end
                ):
                    self.save(wrapped)
            bar.close()
            if step_in_epoch == self.steps_per_epoch:
                self.progress.epoch, self.progress.position = epoch + 1, 0
            finished = (
                self.progress.step >= last_step
                or self.progress.epoch >= cfg.epochs
                or self.budget_spent() >= 1
            )
            if self.eval_loader is not None and (self.progress.epoch % exp.eval.every == 0 or finished):
                result = self.evaluate(wrapped, autocast)
                metrics.write(
                    {"step": self.progress.step, "epoch": epoch, "kind": "eval", "split": exp.eval.split,
                     "train_time_s": self.progress.train_time, **result.metrics()}
                )  # fmt: skip
                self.keep_best(result)
                if main:
                    print(f"epoch {epoch + 1}: {exp.eval.split} top-1 {result.top_k(1):.2%}", file=sys.stderr)
            self.save(wrapped)
        metrics.close()
        return self.finish(wrapped, autocast, result)

    def finish(
        self, wrapped: torch.nn.Module, autocast, result: ClassificationResult | None
    ) -> dict[str, Any]:
        """The final results file and figures (main process); the summary returned to the caller."""
        if self.eval_loader is not None and result is None:
            result = self.evaluate(wrapped, autocast)
        states = self.gather_final(wrapped)
        summary: dict[str, Any] = {"out_dir": str(self.out_dir), "steps": self.progress.step}
        if not self.env.main_process:
            return summary
        summary["train_time_s"] = round(self.progress.train_time, 2)
        summary.update(self.write_final(states))
        summary.update(
            metrics=str(self.out_dir / "metrics.jsonl"),
            curves=str(plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")),
        )
        if result is not None:
            summary.update(result.metrics())
            summary["best"] = str(self.out_dir / "best.safetensors")
            summary["best_top1"] = self.progress.best_metric
            summary["confusion_matrix"] = str(
                plot_confusion_matrix(result, self.out_dir / "confusion_matrix.png")
            )
            summary["results"] = str(
                write_results(result, self.out_dir / "results.json", split=self.exp.eval.split, **{
                    k: v for k, v in summary.items() if k in ("steps", "train_time_s", "best_top1")
                })
            )  # fmt: skip
        scores = {key: summary[key] for key in ("top1", "top5", "loss", "accuracy") if key in summary}
        split = self.exp.eval.split if result is not None else "train"
        run_folder.append_history(
            self.out_dir, "finish", step=self.progress.step, epoch=self.progress.epoch, split=split, **scores
        )
        return summary
