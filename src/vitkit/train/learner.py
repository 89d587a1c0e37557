"""The live training state, gathered into one `TrainState` and restored from one.

`Learner` holds what a step changes: the model on its device (fast paths applied), its EMA, the
model as DDP/FSDP wrapped it, the optimiser, the grad scaler, the progress and the RNG streams.
`state()` gathers all of it (every rank calls it; under FSDP rank 0 alone receives the tensors) and
`restore(state)` checks a state read back against this run before any of it is copied.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..data.datasets import derive_seed
from ..fast import apply_fast_paths
from ..models.vit import VisionTransformer
from . import distributed
from .ema import ModelEma
from .experiment import TrainConfig
from .precision import Arithmetic
from .state import MODEL_NAME, OPTIMIZER_NAME, Progress, TrainState, capture_rng, restore_rng
from .state_checks import check_optimizer, check_tensors
from .task import Batch, Objective, Task, seed_everything

log = logging.getLogger(__name__)


class Learner:
    """The model, its EMA, the wrapped model, the optimiser, the grad scaler and the progress."""

    def __init__(self, task: Task, cfg: TrainConfig, env: distributed.Env, arithmetic: Arithmetic):
        self.env, self.seed = env, cfg.seed
        for module in task.model.modules():
            if isinstance(module, VisionTransformer):
                module.set_grad_checkpointing(cfg.grad_checkpointing)
        self.model = task.model.to(env.device)
        apply_fast_paths(self.model, env.device, arithmetic.precision)
        # Names and shapes of the whole state, taken before FSDP replaces the tensors by shards.
        self.shapes = {key: value.shape for key, value in self.model.state_dict().items()}
        self.ema = ModelEma(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        # FSDP replaces the parameters by their shards: wrap before the optimiser takes them.
        self.wrapped = distributed.wrap(self.model, env, cfg.strategy)
        if self.ema is not None and distributed.is_sharded(self.wrapped):
            # Sharded like the weights it follows: each rank averages its own shards.
            distributed.shard(self.ema.model)
        self.optimizer = task.build_optimizer(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = arithmetic.grad_scaler()
        self.progress = Progress()

    # One optimiser step's end -------------------------------------------------------------------------
    def apply_gradients(self, clip_grad: float) -> float | None:
        """Unscale, clip, step, EMA update; the gradient norm before clipping when clipping."""
        grad_norm = None
        if clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(distributed.unwrap(self.wrapped), self.progress.step + 1)
        self.progress.step += 1
        return grad_norm

    def eval_model(self, use_ema: bool) -> torch.nn.Module:
        """The weights evaluated and kept as best: the EMA's when it is on and asked for."""
        return self.ema.model if use_ema and self.ema is not None else self.wrapped

    # The whole state -----------------------------------------------------------------------------------
    def state(self) -> TrainState | None:
        """The whole state, unsharded on CPU; every rank calls it, the main process gets it."""
        rng = distributed.all_gather_object(capture_rng(self.env.device))
        model = distributed.full_state_dict(self.wrapped)
        optimizer = distributed.full_optimizer_state(self.wrapped, self.optimizer)
        ema = distributed.full_state_dict(self.ema.model) if self.ema is not None else None
        if not self.env.main_process:
            return None
        scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        return TrainState(model, optimizer, Progress(**vars(self.progress)), rng, ema, scaler)

    def check(self, state: TrainState, folder: Path) -> None:
        """The state's tensors fit this run's model and optimiser (CheckpointError naming the file)."""
        check_tensors(folder / MODEL_NAME, state.model, self.shapes)
        if self.ema is not None:
            if state.ema is None:
                raise ValueError(f"{folder}: has no EMA weights but train.ema_decay > 0")
            check_tensors(folder / "ema.safetensors", state.ema, self.shapes)
        names = {param: name for name, param in distributed.unwrap(self.wrapped).named_parameters()}
        shapes = [self.shapes[names[p]] for group in self.optimizer.param_groups for p in group["params"]]
        check_optimizer(folder / OPTIMIZER_NAME, state.optimizer, shapes)

    def restore(self, state: TrainState, folder: Path) -> None:
        """Put `state` back whole, after checking it against this run."""
        self.check(state, folder)
        distributed.load_model_state(self.wrapped, state.model)
        distributed.load_optimizer_state(self.wrapped, self.optimizer, state.optimizer)
        if self.ema is not None:
            distributed.load_model_state(self.ema.model, state.ema)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.progress = state.progress
        if state.world_size == self.env.world_size:
            restore_rng(state.rng[self.env.rank], self.env.device)
        else:
            log.warning(
                "resume: %s was written by %d processes, this run has %d: RNG streams are re-seeded",
                folder,
                state.world_size,
                self.env.world_size,
            )
            seed_everything(derive_seed("resume", self.seed, self.env.rank, self.progress.step))

    # Throwaway passes ----------------------------------------------------------------------------------
    def measure_threads(
        self, objective: Objective, batch: Batch, arithmetic: Arithmetic, num_passes: int = 2
    ) -> dict[int, float]:
        """Forward and backward passes per second of `batch` at each thread count of
        `thread_candidates`, each after one warm-up pass. The passes are thrown away: the gradients,
        the buffers (batch-norm statistics) and the RNG streams are put back as they were, so the run
        that follows is the one it would have been."""
        default = torch.get_num_threads()
        rng = capture_rng(self.env.device)
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        rates = {}
        try:
            for threads in thread_candidates(default):
                torch.set_num_threads(threads)
                self._throwaway_pass(objective, batch, arithmetic)
                started = time.perf_counter()
                for _ in range(num_passes):
                    self._throwaway_pass(objective, batch, arithmetic)
                rates[threads] = num_passes / (time.perf_counter() - started)
        finally:
            torch.set_num_threads(default)
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(buffers[name])
            self.optimizer.zero_grad(set_to_none=True)
            restore_rng(rng, self.env.device)
        return rates

    def _throwaway_pass(self, objective: Objective, batch: Batch, arithmetic: Arithmetic) -> None:
        with arithmetic.autocast():
            loss, _ = objective(self.wrapped, batch, self.progress.step, 0)
        loss.backward()
        for parameter in self.trainable:
            parameter.grad = None


def thread_candidates(default: int) -> list[int]:
    """The thread counts tried when train.num_threads is 0: the default (every core free to the
    process), half of it and one, most first."""
    return sorted({default, max(1, default // 2), 1}, reverse=True)


def choose_thread_count(rates: dict[int, float], default: int, margin: float = 1.1) -> tuple[int, str]:
    """The thread count to train with, from the passes per second measured at each count (`rates`),
    and a line saying the choice and its figures. The default stays unless another count ran
    `margin` times faster: closer figures are within the noise of a few passes."""
    fastest = max(rates, key=lambda threads: (rates[threads], threads))
    chosen = fastest if rates[fastest] >= margin * rates[default] else default
    figures = ", ".join(f"{threads}: {rates[threads]:.2f}" for threads in sorted(rates, reverse=True))
    why = "the default" if chosen == default else f"faster than the default {default}"
    return chosen, f"cpu threads: {chosen}, {why} (measured passes/s by thread count: {figures})"
