"""Task models from a pre-trained trunk: the fine-tuning start, task deltas and multi-task serving.

`finetune_model` is the ViT paper's start of fine-tuning: drop pre-logits and head, attach a
zero-initialised head, interpolate the position embeddings in 2D to the new resolution.

A model fine-tuned with the `attention-only` rule shares every MLP, norm and stem weight with its
pre-trained base. So a task is stored as a *delta*, the tensors that differ from the base (bitwise,
or in shape), and many tasks run from one trunk:

- `save_delta(task_model, base, path)`: a safetensors file of the changed tensors; its metadata holds
  the task's ViTConfig and a fingerprint of the base tensors it relies on.
- `load_delta(base, path)`, also `vitkit.load(base, delta=path)`: the task model, bitwise equal to the
  one that was saved; a wrong base is an error, not a silently different model.
- `MultiTaskModel`: one frozen trunk and per-task tensors (head, position embeddings, attention
  weights); each task's model holds the *same* parameter objects as the trunk for everything else,
  so tasks at several resolutions run in one process without copying the shared tensors.
- `freezing_report`: trainable parameters, training memory and step time of freezing rules side by
  side (for ViT-B/16 at 384, attention-only trains 29,560,552 of 86,859,496 parameters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .convert import CheckpointFile, build_model, read_checkpoint
from .convert.names import CONFIG_KEY, DELTA_KEY
from .convert.native import compare_shapes, expected_shapes, load_state, shapes_of
from .convert.preprocessing_files import attach_preprocessing, preprocessing_metadata
from .files import CheckpointError, atomic_write
from .models.config import ViTConfig
from .models.preprocessing import Preprocessing, preprocessing_of
from .models.vit import VisionTransformer

log = logging.getLogger(__name__)
Source = VisionTransformer | CheckpointFile | str | os.PathLike


def _model(source: Source) -> VisionTransformer:
    """A model as it is, or built from a checkpoint (a path is read once)."""
    if isinstance(source, VisionTransformer):
        return source
    return build_model(source if isinstance(source, CheckpointFile) else read_checkpoint(source))


# Fine-tuning's starting point -------------------------------------------------------------------------------
def finetune_model(
    checkpoint: Source,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    **overrides,
) -> VisionTransformer:
    """The ViT paper's fine-tuning start (section 3.2): a pre-trained model, its pre-logits layer and
    head dropped, a zero-initialised linear head for `num_classes`, and at a new `img_size` the
    position embeddings interpolated in 2D. `checkpoint` is anything `vitkit.load` reads; the model
    keeps its preprocessing (at the new size)."""
    base = _model(checkpoint)
    config = base.config.replace(
        num_classes=num_classes,
        representation_size=None,
        zero_head=True,
        img_size=base.config.img_size if img_size is None else img_size,
        **overrides,
    )
    model = VisionTransformer(config)
    state = _state(base)
    dropped = sorted(key for key in state if key.startswith(("head.", "pre_logits.")))
    for key in dropped:
        del state[key]
    # The new head is the fresh model's own zeros; everything else must come from the checkpoint.
    state.update({key: value for key, value in model.state_dict().items() if key.startswith("head.")})
    origin = str(checkpoint)[:200]
    load_state(model, state, source_config=base.config, strict=True, origin=origin)
    if isinstance(getattr(base, "preprocessing", None), Preprocessing):  # images prepared as the base's
        attach_preprocessing(model, base.preprocessing, "vitkit", origin)
    log.info(
        "fine-tuning start: dropped %s; zero head for %d classes; grid %s -> %s",
        ", ".join(dropped) or "no head",
        num_classes,
        base.config.grid_size,
        config.grid_size,
    )
    return model


# Deltas --------------------------------------------------------------------------------------------------
def _state(model_or_state: VisionTransformer | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {key: value.detach() for key, value in model_or_state.state_dict().items()}
    return dict(model_or_state)


def changed_tensors(
    task: VisionTransformer | dict[str, torch.Tensor], base: VisionTransformer | dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The task's tensors that the base lacks, or holds with another shape, dtype or any other bit."""
    task_state, base_state = _state(task), _state(base)
    return {
        key: value
        for key, value in task_state.items()
        if key not in base_state
        or base_state[key].shape != value.shape
        or base_state[key].dtype != value.dtype
        or not torch.equal(base_state[key].to(value.device), value)
    }


def fingerprint(state: dict[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `keys`: identifies the base a delta needs."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_delta(
    task: VisionTransformer,
    base: Source,
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the tensors of `task` that differ from `base` (a model or any checkpoint `vitkit.load`
    reads) to `path` (.safetensors), with the task's config, its preprocessing, the base's
    fingerprint and any `metadata` (e.g. the task's class names and data config)."""
    base_model = _model(base)
    task_state, base_state = _state(task), _state(base_model)
    delta = changed_tensors(task_state, base_state)
    shared = [key for key in task_state if key not in delta]
    info = {
        "base_fingerprint": fingerprint(base_state, shared),
        "num_shared_tensors": len(shared),
        "num_delta_params": sum(value.numel() for value in delta.values()),
        "num_params": sum(value.numel() for value in task_state.values()),
    }
    metadata = {
        "format": "pt",
        CONFIG_KEY: json.dumps(task.config.to_dict(), sort_keys=True),
        DELTA_KEY: json.dumps(info, sort_keys=True),
        **preprocessing_metadata(task),
        **(metadata or {}),
    }
    tensors = {key: value.cpu().contiguous() for key, value in delta.items()}
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a task delta is one .safetensors file")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


@dataclass
class Delta:
    """A task delta read from disk: the changed tensors, the task's config and the base's fingerprint."""

    tensors: dict[str, torch.Tensor]
    config: ViTConfig
    base_fingerprint: str
    path: str
    preprocessing: Preprocessing | None = None  # the task's recorded preprocessing
    classes: tuple[str, ...] | None = None


def read_delta(path: str | os.PathLike | CheckpointFile) -> Delta:
    """A task delta file (or its `CheckpointFile`, already read) -> `Delta`."""
    checkpoint = path if isinstance(path, CheckpointFile) else read_checkpoint(path, layout="vitkit")
    if checkpoint.delta is None or checkpoint.config is None:
        raise CheckpointError(
            f"{checkpoint.origin}: not a vitkit task delta (no {DELTA_KEY!r} metadata); write one with save_delta"
        )
    fingerprint = checkpoint.delta.get("base_fingerprint")
    if not isinstance(fingerprint, str):
        raise CheckpointError(f"{checkpoint.origin}: metadata {DELTA_KEY!r} has no base_fingerprint")
    return Delta(
        dict(checkpoint.tensors()),
        checkpoint.config,
        fingerprint,
        checkpoint.origin,
        checkpoint.preprocessing,
        checkpoint.classes,
    )


def _shared_keys(delta: Delta, base_state: dict[str, torch.Tensor]) -> list[str]:
    """The task's keys that come from the base, checked against the delta's fingerprint."""
    task_shapes = expected_shapes(delta.config)
    task_keys = list(task_shapes)
    shared = [key for key in task_keys if key not in delta.tensors]
    missing = [key for key in shared if key not in base_state]
    if missing:
        raise CheckpointError(f"{delta.path}: the base has no tensor for {', '.join(missing)}")
    if fingerprint(base_state, shared) != delta.base_fingerprint:
        raise CheckpointError(
            f"{delta.path}: the base's shared tensors do not match the ones this delta was saved against "
            f"(fingerprint differs): wrong base checkpoint?"
        )
    from_base = compare_shapes(
        {key: task_shapes[key] for key in shared},
        shapes_of({key: base_state[key] for key in shared}),
        names=("base", "task config"),
    )
    from_delta = compare_shapes(task_shapes, shapes_of(delta.tensors), names=("delta", "task config"))
    if from_delta.unexpected:
        raise CheckpointError(
            f"{delta.path}: tensors not in the task model: {', '.join(from_delta.unexpected)}"
        )
    # Checked before the task model is built: a delta's config could claim a model too large to build.
    mismatched = from_base.mismatched + from_delta.mismatched
    if mismatched:
        raise CheckpointError(f"{delta.path}: shapes do not match the task config: " + "; ".join(mismatched))
    return shared


def load_delta(base: Source, delta: str | os.PathLike | Delta) -> VisionTransformer:
    """The task model: the base's tensors, with the delta's tensors and config on top (own copies)."""
    delta = delta if isinstance(delta, Delta) else read_delta(delta)
    base_model = _model(base)
    base_state = _state(base_model)
    shared = _shared_keys(delta, base_state)
    model = VisionTransformer(delta.config)
    model.load_state_dict({**{key: base_state[key] for key in shared}, **delta.tensors}, strict=True)
    return attach_preprocessing(
        model, delta.preprocessing, "vitkit", delta.path, fallback=preprocessing_of(base_model)
    )


# Serving ---------------------------------------------------------------------------------------------------
def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` itself (no copy) at `key`: parameters stay the same Parameter object."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        setattr(module, leaf, param)
    else:
        module.register_buffer(leaf, tensor)


class MultiTaskModel(nn.Module):
    """One frozen trunk, many tasks: `model(images, task="pets")`.

    Each task is a VisionTransformer of its own config (classes, resolution) whose shared parameters
    are the trunk's Parameter objects and whose delta tensors are its own, so a task costs only its
    delta in memory. `parameters()` counts every shared tensor once.
    """

    def __init__(self, trunk: Source):
        super().__init__()
        trunk = _model(trunk)
        self.trunk = trunk.eval().requires_grad_(False)
        self.tasks = nn.ModuleDict()

    def add_task(self, name: str, delta: str | os.PathLike | Delta) -> VisionTransformer:
        delta = delta if isinstance(delta, Delta) else read_delta(delta)
        trunk_tensors = {
            **dict(self.trunk.named_parameters()),
            **dict(self.trunk.named_buffers()),
        }
        shared = _shared_keys(delta, trunk_tensors)
        with torch.device("meta"):
            model = VisionTransformer(delta.config)
        for key in shared:
            _set_tensor(model, key, trunk_tensors[key])
        device = next(self.trunk.parameters()).device
        for key, tensor in delta.tensors.items():
            _set_tensor(model, key, tensor.to(device))
        attach_preprocessing(
            model, delta.preprocessing, "vitkit", delta.path, fallback=preprocessing_of(self.trunk)
        )
        self.tasks[name] = model.eval()
        return model

    def forward(self, images: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; loaded tasks: {', '.join(self.tasks) or 'none'}")
        return self.tasks[task](images)

    @torch.no_grad()
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Several tasks' batches (each at its task's resolution) -> each task's logits."""
        return {task: self(images, task) for task, images in inputs.items()}

    def memory_report(self) -> dict[str, int]:
        """Parameters held: the trunk's, each task's own (its delta), and the total in memory."""
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        report = {"trunk": sum(p.numel() for p in self.trunk.parameters())}
        for name, model in self.tasks.items():
            report[name] = sum(p.numel() for p in model.parameters() if id(p) not in trunk_ids)
        report["total"] = sum(p.numel() for p in self.parameters())
        return report


# What a freezing rule costs ------------------------------------------------------------------------------------
@dataclass
class FreezeCost:
    """One freezing rule's training step: parameters, memory (bytes) and time (seconds)."""

    rule: str
    num_trainable: int
    num_params: int
    memory_bytes: int
    step_seconds: float
    memory_kind: str


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.device.type)


def training_memory(
    model: nn.Module, step: Callable[[], None], optimizer_states_per_param: int = 1
) -> tuple[int, str]:
    """Bytes one training step holds: on CUDA the allocator's peak; elsewhere an exact account of
    parameters, gradients, optimizer state (`optimizer_states_per_param` tensors of each trainable
    parameter: 1 for SGD momentum, 2 for Adam) and the activations autograd saves for backward."""
    params = list(model.parameters())
    device = params[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "peak allocated (CUDA)"
    param_storages = {_storage_key(p) for p in params}
    saved: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in param_storages:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in params)
    total = weights + trainable * (1 + optimizer_states_per_param) + sum(saved.values())
    return total, "weights + grads + optimizer state + saved activations"


def measure_freezing(
    config: ViTConfig,
    rule: str,
    batch_size: int = 8,
    num_steps: int = 3,
    device: str | torch.device = "cpu",
    lora_rank: int = 8,
) -> FreezeCost:
    """One rule's trainable parameters, training memory and median step time, for the ViT paper's
    fine-tuning step (SGD with momentum, gradient clipping at 1) on random images (`lora_rank`: the
    `lora` rule's rank)."""
    from .fast import apply_fast_paths
    from .train.optim import apply_freeze_rule

    torch.manual_seed(0)
    model = apply_fast_paths(VisionTransformer(config), device, "fp32").to(device).train()
    num_trainable = apply_freeze_rule(model, rule, lora_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    images = torch.randn(batch_size, config.in_chans, *config.img_size, device=device)
    labels = torch.randint(0, max(config.num_classes, 1), (batch_size,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state, selects kernels
    memory, kind = training_memory(model, step)
    timings = []
    for _ in range(num_steps):
        started = time.perf_counter()
        step()
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        timings.append(time.perf_counter() - started)
    # The median: a step slowed by another process on a shared machine does not move it.
    seconds = sorted(timings)[len(timings) // 2]
    return FreezeCost(rule, num_trainable, model.num_params(), memory, seconds, kind)


def freezing_report(
    config: ViTConfig,
    rules: Iterable[str] = ("none", "attention-only"),
    batch_size: int = 8,
    num_steps: int = 3,
    device: str | torch.device = "cpu",
    measure: bool = True,
    lora_rank: int = 8,
) -> list[FreezeCost]:
    """`measure_freezing` for each rule; without `measure`, only the counts, on the meta device."""
    from .train.optim import apply_freeze_rule

    if measure:
        return [measure_freezing(config, rule, batch_size, num_steps, device, lora_rank) for rule in rules]
    results = []
    for rule in rules:
        with torch.device("meta"):
            model = VisionTransformer(config)
        num_trainable = apply_freeze_rule(model, rule, lora_rank)
        results.append(FreezeCost(rule, num_trainable, model.num_params(), 0, 0.0, "not measured"))
    return results


def format_freezing_report(results: list[FreezeCost]) -> str:
    """A markdown table, each rule's cost also as a ratio to the first rule (usually full)."""
    first = results[0]
    rows = [
        "| rule | trainable params | of total | memory (MiB) | step (ms) | memory ratio | time ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory_ratio = r.memory_bytes / first.memory_bytes if first.memory_bytes else float("nan")
        time_ratio = r.step_seconds / first.step_seconds if first.step_seconds else float("nan")
        rows.append(
            f"| {r.rule} | {r.num_trainable:,} | {r.num_trainable / r.num_params:.1%} | "
            f"{r.memory_bytes / 2**20:.1f} | {1000 * r.step_seconds:.1f} | {memory_ratio:.2f} | {time_ratio:.2f} |"
        )
    return "\n".join(rows) + f"\n\nmemory: {first.memory_kind}"
