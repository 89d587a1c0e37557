"""Processes and devices: torchrun setup, DDP/FSDP wrapping, rank helpers and `unwrap`.

The only importer of torch.distributed. Under `torchrun --nproc_per_node N -m vitkit train ...` the
environment names this process's rank; without it everything here degrades to one process, so
the loop runs the same lines at every world size. Only the main process (rank 0) writes files.
"""

from __future__ import annotations

import datetime
import os
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
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if chosen.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=chosen if chosen.type == "cuda" else None,
        )
    return Env(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: VisionTransformer, env: Env, strategy: Strategy = "ddp") -> nn.Module:
    """DDP (a full replica per process, gradients all-reduced) or FSDP (parameters sharded per
    encoder block, for models that do not fit one device). One process: the model itself."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, (Block, ParallelBlock)):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> VisionTransformer:
    """The plain VisionTransformer under torch.compile and DDP wrappers: the one whose state dict is
    saved, so checkpoints never carry `_orig_mod.` or `module.` prefixes."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, VisionTransformer):
        raise TypeError(f"cannot unwrap {type(model).__name__} to a VisionTransformer")
    return inner


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (gathers FSDP shards; every rank must call it)."""
    from torch.distributed.tensor import DTensor

    state = unwrap(model).state_dict()
    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for key, value in state.items()
    }


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
