"""Processes and devices: torchrun setup, DDP/FSDP wrapping, rank helpers and `unwrap`.

The only importer of torch.distributed. Under `torchrun --nproc_per_node N -m vitkit train ...` the
environment names this process's rank; without it everything here degrades to one process, so
the loop runs the same lines at every world size. Only the main process (rank 0) writes files.

Checkpoints hold the unsharded state in one layout for every strategy (FSDP's shards are gathered to
rank 0, its parameter names turned back into optimiser indices), so a run resumes at any world size,
under DDP, FSDP or in one process, and `vitkit.load` reads its weights.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.vit import Block, ParallelBlock, VisionTransformer

DeviceName = Literal["auto", "cpu", "cuda"]
Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class Env:
    """Where this process runs: rank and world size (1 without torchrun) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: DeviceName = "auto") -> Env:
    """Read torchrun's environment, pick the device and join the process group (gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but no CUDA device is available; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_the_agent(rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=chosen if chosen.type == "cuda" else None,
        )
    return Env(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def stop_with_the_agent(rank: int, poll_seconds: float = 1.0) -> None:
    """End this worker when the torchrun agent that started it dies (killed, say, with SIGKILL): it
    is then re-parented, and a daemon thread that watches `os.getppid()` exits the process. Left
    alone, workers would train to the end on their own, holding the run folder. (PR_SET_PDEATHSIG
    fires when the forking *thread* ends, which need not be the agent's end.)"""
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_seconds)
        print(f"vitkit: rank {rank}: the torchrun agent (pid {agent}) is gone; stopping", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="vitkit-agent-watch", daemon=True).start()


def cleanup() -> None:
    if dist.is_initialized():
        # FSDP's modules sit in reference cycles with their hooks: free them (and the collective
        # work they hold) now, while the process group is alive, not at interpreter exit.
        gc.collect()
        dist.destroy_process_group()


def wrap(model: VisionTransformer, env: Env, strategy: Strategy = "ddp") -> nn.Module:
    """DDP (a full replica per process, gradients all-reduced) or FSDP (parameters sharded per
    encoder block, for models that do not fit one device). One process: the model itself.

    FSDP shards in place and replaces every parameter by its shard (a DTensor): build the optimiser
    over `model.parameters()` after this call, never before.
    """
    if not env.distributed:
        return model
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        return shard(model)
    raise ValueError(f"train.strategy={strategy!r}: expected 'ddp' or 'fsdp'")


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 in place: each encoder block is one unit (its parameters are gathered for its forward
    and backward only), the root holds the rest (stem, tokens, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, (Block, ParallelBlock)):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP sharded this model (its parameters are DTensor shards, its state dict too).

    A process that never imported FSDP holds no sharded model: the check then costs nothing, where
    importing FSDP would cost a second of start-up."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(unwrap(model), fsdp.FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) of micro-batches whose gradients
    are only accumulated; the last micro-batch of a step syncs their sum."""
    if enabled:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(unwrap(model))
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model (a VisionTransformer, or the masked-patch model of pre-training) under
    torch.compile and DDP wrappers: the one whose state dict is saved, so checkpoints never carry
    `_orig_mod.` or `module.` prefixes."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    inner = getattr(inner, "_orig_mod", inner)
    if isinstance(inner, nn.parallel.DistributedDataParallel) or hasattr(inner, "_orig_mod"):
        raise TypeError(f"cannot unwrap {type(model).__name__}: wrapped more than once")
    return inner


# Checkpoint state: unsharded on save, resharded on load ---------------------------------------------
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU, with the plain VisionTransformer's keys.

    Under FSDP every rank must call it: the shards are gathered to rank 0, which alone receives the
    tensors (the other ranks get an empty dict, so no rank holds two copies of a large model).
    """
    if not is_sharded(model):
        return {key: value.detach().cpu() for key, value in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unwrap(model), options=_gather_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state in `optimizer.state_dict()`'s form (parameters numbered in param-group
    order), unsharded on CPU; under FSDP every rank must call it and only rank 0 receives it."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(unwrap(model), optimizer, options=_gather_options())
    if not state:
        return state
    # DCP names parameters by their fully qualified name; checkpoints number them like
    # optimizer.state_dict(), so one file resumes at any world size and strategy.
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: entry for name, entry in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state; under FSDP each rank keeps its own shard of every tensor."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # set_model_state_dict consumes the dict it is given.
    set_model_state_dict(unwrap(model), dict(state), options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state in `optimizer.state_dict()`'s form (as `full_optimizer_state`
    returns it); under FSDP each rank keeps the shard of each moment that matches its parameters."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {param: name for name, param in unwrap(model).named_parameters()}
    ordered = [names[param] for group in optimizer.param_groups for param in group["params"]]
    saved = [index for group in state["param_groups"] for index in group["params"]]
    if len(saved) != len(ordered):
        raise ValueError(
            f"the checkpoint's optimiser state has {len(saved)} parameters, this optimiser {len(ordered)} "
            "(a different model or freezing rule?)"
        )
    by_name = {
        "state": {ordered[index]: entry for index, entry in state["state"].items()},
        "param_groups": [
            {**group, "params": [ordered[index] for index in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        unwrap(model), optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )


def _gather_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload with full_state_dict: gathered shard by shard onto rank 0's CPU memory.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


# Collectives --------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def even_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_batches: int, empty_images: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's `num_batches` batches, then empty ones (`empty_images`, (0, C, H, W)) up to the
    most any rank has.

    An FSDP forward is collective (each block gathers its shards from every rank), so every rank
    must run as many as the others; evaluation splits ranks unevenly, and an empty batch adds
    nothing to the counts.
    """
    most = int(all_reduce_max(torch.tensor(num_batches)).item())
    yield from batches
    for _ in range(most - num_batches):
        yield empty_images, torch.zeros(0, dtype=torch.int64)


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (e.g. each rank's RNG state for a checkpoint)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (e.g. the checkpoint rank 0 chose to resume from)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_process(main_process: bool, function: Callable[[], Any]) -> Any:
    """`function()` run by the main process alone (e.g. the run folder's checks); its result on every
    rank, and a ValueError it raised (a one-line refusal) raised on every rank, so all stop together."""
    outcome: tuple[Any, ValueError | None] = (None, None)
    if main_process:
        try:
            outcome = (function(), None)
        except ValueError as error:
            outcome = (None, error)
    result, error = broadcast_object(outcome) if dist.is_initialized() else outcome
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
