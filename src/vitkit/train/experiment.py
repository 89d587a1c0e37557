"""The experiment config, and where it comes from.

An experiment is a dataclass tree, `Experiment(model, data, optim, train, eval)`, produced by a Python
function in `configs/` and changed from the CLI with type-checked `--set a.b=value` overrides (and
from $VITKIT_SET, before the command line's, which win). `load_experiment` finds a config by name or path, parses
it and applies the overrides; the checks here name bad values before training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..data import DataConfig
from ..data.loader import resolve_root
from ..files import read_json
from ..models.config import ViTConfig, check_fields
from ..registry import get_config
from . import distributed
from .lora import DEFAULT_LORA_RANK
from .optim import FreezeRule, OptimConfig
from .precision import Precision

log = logging.getLogger(__name__)

Resume = Literal["auto", "never"]


# The experiment config ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Which model: a registered name with ViTConfig overrides, or a checkpoint to start from.

    img_size and num_classes default to the data's; `init_from` loads any vitkit checkpoint with the
    overrides applied (a new head for other classes, position embeddings resampled to img_size).
    """

    name: str = "vit_tiny_patch16_224"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""
    # Where init_from's weights came from, as the run records it: a Hub checkpoint's repo, revision
    # (commit) and weight digests (`vitkit finetune hf-hub:...`); {} for a local one.
    init_source: dict[str, Any] = field(default_factory=dict)
    freeze: FreezeRule = "none"
    # The rank r of freeze="lora"'s adapters (scale alpha / r with alpha 8: see lora.py); at most the width.
    lora_rank: int = DEFAULT_LORA_RANK
    # Initialise the cnn stem's first conv as the whitening of this many training images' patches
    # (0: off; see whiten.py). A fresh start only: resumed and init_from weights are kept.
    whiten_images: int = 0


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/experiment"
    epochs: int = 10
    # Stop after this many optimiser steps (0: the full schedule); the schedule still spans `epochs`.
    max_steps: int = 0
    # A wall-clock budget for the training steps, in minutes (0: none), for time-to-accuracy runs: the
    # lr schedule advances by the larger of the fraction of steps and the fraction of the budget spent,
    # and training stops when the budget is spent, so the schedule anneals fully whatever the machine's
    # speed (`epochs` is then an upper bound). Timing makes such a run not bitwise reproducible.
    time_budget_minutes: float = 0.0
    seed: int = 0
    objective: str = "supervised"
    device: distributed.DeviceName = "auto"
    strategy: distributed.Strategy = "ddp"
    # "auto": bf16 autocast where bf16 products run fast (CUDA with bf16, a CPU with AMX), else fp32;
    # the run logs what it chose and why (see precision.py).
    precision: Precision = "auto"
    # Micro-batches per optimiser step: the effective batch is accumulation x data.batch_size x ranks.
    accumulation: int = 1
    # EMA of the weights (Polyak averaging); 0 turns it off.
    ema_decay: float = 0.0
    # The decay grows as min(ema_decay, (1 + n) / (10 + n)) over the first updates (see ModelEma).
    ema_warmup: bool = False
    # Progressive resizing (0: off): the training batches are resized (bilinear, antialiased, after
    # augmentation) to a side that grows linearly from this many pixels to data.img_size over the first
    # `progressive_end` of the schedule (the fraction of steps, or of the time budget), in multiples of
    # the model's stride; the rest trains at data.img_size. Early steps on smaller images cost less
    # (fewer tokens and smaller maps); evaluation always runs at data.img_size. Supervised runs only.
    progressive_min_size: int = 0
    progressive_end: float = 0.5
    grad_checkpointing: bool = False
    compile: bool = False
    deterministic: bool = False
    # CPU threads of this process (0: measured; the cores free to it, os.sched_getaffinity, shared
    # among the node's processes, unless throwaway passes before the first step run faster on half
    # of them or one, as on a busy machine; the run logs the figures). Small models run faster on one
    # thread: the per-op overhead of splitting work across cores outweighs the arithmetic they share.
    num_threads: int = 0
    log_every: int = 10
    # A resumable checkpoint every N steps (0: only at epoch ends); keep the newest `keep_last`.
    checkpoint_every: int = 0
    keep_last: int = 2
    # "auto": go on from the run folder's newest valid checkpoint (refused when the model, data or
    # objective differ from its config.json; schedule changes are recorded in history.jsonl); "never":
    # move the folder's earlier run to <out_dir>/previous/<time>/ and start over (see run_folder.py).
    resume: Resume = "auto"


@dataclass(frozen=True)
class EvalConfig:
    # Split evaluated after every `every` epochs and at the end ("": no evaluation).
    split: str = "test"
    every: int = 1
    evaluator: Literal["classification"] = "classification"
    top_k: tuple[int, ...] = (1, 5)
    # With EMA on, evaluate (and keep as best) the EMA weights.
    use_ema: bool = True
    # Test-time augmentation: average the class probabilities of each image and its mirror image
    # (twice the evaluation's compute).
    hflip_tta: bool = False
    # Test-time augmentation: also average two copies shifted by this many pixels along the diagonal
    # (reflect-padded), weighing together as much as the image (3x the evaluation's compute; 0: off).
    shift_tta: int = 0
    # Evaluate at most this many samples of the split (None: all of them), e.g. for a smoke run.
    max_samples: int | None = None


@dataclass(frozen=True)
class Experiment:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_fields(ViTConfig, self.model.overrides, what="model.overrides (ViTConfig)")
        failed = check_train_config(self.train)
        if type(self.model.lora_rank) is not int or self.model.lora_rank < 1:
            failed.append(f"model.lora_rank must be a whole number >= 1, not {self.model.lora_rank!r}")
        if self.eval.every < 1:
            failed.append("eval.every must be >= 1")
        max_samples = self.eval.max_samples
        if max_samples is not None and (type(max_samples) is not int or max_samples < 1):
            failed.append(f"eval.max_samples must be an integer >= 1 (or null: all), not {max_samples!r}")
        shift = self.eval.shift_tta
        if type(shift) is not int or not 0 <= shift < self.data.img_size:
            failed.append(
                f"eval.shift_tta must be a whole number of pixels in [0, data.img_size), not {shift!r}"
            )
        if failed:
            raise ValueError(f"invalid experiment: {'; '.join(failed)}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def check_model_config(model: ModelConfig, data: DataConfig) -> ViTConfig | None:
    """Build the model's config now, so that a bad name or override fails before any data is read,
    naming the override, and return it (None for model.init_from: a checkpoint's config is checked
    when it is read)."""
    if model.whiten_images < 0:
        raise ValueError(f"model.whiten_images must be >= 0 (0: off), not {model.whiten_images}")
    if model.init_from:
        if model.whiten_images:
            raise ValueError(
                "model.whiten_images initialises a fresh model; model.init_from brings its own weights"
            )
        return None
    try:
        return get_config(model.name, img_size=data.img_size, **model.overrides)
    except (KeyError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        overrides = ", ".join(f"{key}={value!r}" for key, value in model.overrides.items())
        raise ValueError(
            f"model.name={model.name!r} with model.overrides ({overrides}) and data.img_size={data.img_size}: {message}"
        ) from error


def check_train_config(train: TrainConfig) -> list[str]:
    """The train section's errors (a value outside its choices raises at once; bounds come back as
    messages, so that one error names them all)."""
    for name, allowed in (
        ("precision", Precision),
        ("resume", Resume),
        ("device", distributed.DeviceName),
        ("strategy", distributed.Strategy),
    ):
        if getattr(train, name) not in get_args(allowed):
            raise ValueError(f"train.{name}={getattr(train, name)!r}: expected one of {get_args(allowed)}")
    checks = {
        f"train.epochs must be >= 1, not {train.epochs}": train.epochs >= 1,
        f"train.max_steps must be >= 0 (0: the full schedule), not {train.max_steps}": train.max_steps >= 0,
        f"train.checkpoint_every must be >= 0 (0: at epoch ends), not {train.checkpoint_every}": (
            train.checkpoint_every >= 0
        ),
        "train.accumulation must be >= 1": train.accumulation >= 1,
        "train.keep_last must be >= 1": train.keep_last >= 1,
        "train.log_every must be >= 1": train.log_every >= 1,
        "train.num_threads must be >= 0": train.num_threads >= 0,
        "train.time_budget_minutes must be >= 0": train.time_budget_minutes >= 0,
        "train.ema_decay must be in [0, 1)": 0 <= train.ema_decay < 1,
        f"train.progressive_min_size must be >= 0 (0: off), not {train.progressive_min_size}": (
            train.progressive_min_size >= 0
        ),
        f"train.progressive_end must be in (0, 1], not {train.progressive_end}": (
            0 < train.progressive_end <= 1
        ),
    }
    return [message for message, ok in checks.items() if not ok]


# Configs from files and the CLI ---------------------------------------------------------------------
def config_dirs() -> list[Path]:
    """Where config names are looked up: ./configs, then the source checkout's configs/."""
    return [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]


def list_configs() -> list[str]:
    names = {p.stem for folder in config_dirs() if folder.is_dir() for p in folder.glob("*.py")}
    return sorted(name for name in names if not name.startswith("_"))


def _config_path(config: str) -> Path:
    path = Path(config)
    if path.suffix in (".py", ".json"):
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    for folder in config_dirs():
        if (folder / f"{config}.py").exists():
            return folder / f"{config}.py"
    raise FileNotFoundError(
        f"no config named {config!r} in {', '.join(str(d) for d in config_dirs())}; known: {', '.join(list_configs())}"
    )


class UnknownKeyError(ValueError, TypeError):
    """An override names a key the experiment does not have (a ValueError of the command line, a
    TypeError of the dataclass it would be passed to)."""


class ConfigFileError(ValueError):
    """A config file that does not run: `file:line: error` in one line, as a compiler reports."""


def _config_failure(path: Path, error: Exception, doing: str) -> ConfigFileError:
    """`error`, raised while Python compiled or ran the config at `path`, as one line naming the
    config's line: the syntax error's, or the deepest frame of the config's own code."""
    if isinstance(error, SyntaxError):
        return ConfigFileError(f"{path}:{error.lineno}: {type(error).__name__}: {error.msg}")
    line = None
    for frame, number in traceback.walk_tb(error.__traceback__):
        if Path(frame.f_code.co_filename).resolve() == path.resolve():
            line = number
    where = f"{path}:{line}" if line is not None else str(path)
    message = str(error).strip() or type(error).__name__
    return ConfigFileError(f"{where}: {type(error).__name__}: {message} while {doing} the config")


def _experiment_from_file(path: Path, kind: type) -> Any:
    if path.suffix == ".json":
        return _parse({"experiment": read_json(path, error=ValueError)}, path, kind)
    spec = importlib.util.spec_from_file_location(f"vitkit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the config's own code: whatever it raises is the user's to fix
        raise _config_failure(path, error, "running") from error
    if not callable(getattr(module, "experiment", None)):
        raise ValueError(f"{path}: a config file must define `experiment() -> {kind.__name__}`")
    try:
        result = module.experiment()
    except Exception as error:
        raise _config_failure(path, error, "running experiment() of") from error
    if not isinstance(result, kind):
        raise TypeError(f"{path}: experiment() returned {type(result).__name__}, expected {kind.__name__}")
    return result


def _parser(kind: type):
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False, prog="vitkit")
    parser.add_class_arguments(kind, "experiment")
    return parser


def _parse(data: dict[str, Any], origin: Any, kind: type) -> Any:
    import jsonargparse

    parser = _parser(kind)
    try:
        return parser.instantiate(parser.parse_object(data)).experiment
    except jsonargparse.ArgumentError as error:
        raise ValueError(f"{origin}: {error}".replace("experiment.", "")) from error


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for item in dataclasses.fields(cls):
        factory = item.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            keys += _known_keys(factory, f"{prefix}{item.name}.")
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


def _with_root(experiment: Any, base: Path) -> Any:
    """The experiment with its data root absolute, a relative one taken from `base`."""
    return dataclasses.replace(
        experiment, data=experiment.data.replace(root=resolve_root(experiment.data.root, base))
    )


def load_experiment(config: str | Any, overrides: list[str] = (), kind: type = Experiment) -> Any:
    """An experiment of `kind` (an `Experiment`, or a `PretrainExperiment` for `vitkit pretrain`)
    from a config name in configs/, a .py or .json file (e.g. a run's config.json), or an instance,
    with `key=value` overrides (`optim.lr=1e-3`, `model.overrides.depth=6`) and $VITKIT_SET's.

    Overrides are type-checked by jsonargparse; unknown keys are errors with close matches named.
    """
    import yaml

    if isinstance(config, str):
        path = _config_path(config)
        # A config's relative data root is taken from the config file's folder, never the working one.
        base = _with_root(_experiment_from_file(path, kind), path.parent)
    else:
        base, kind = config, type(config)
    # The environment's overrides are defaults of this shell; the command line's --set, explicit, win.
    from_environment = environment_overrides()
    if from_environment:
        log.warning("%s sets %s (a --set of the same key wins)", OVERRIDES_ENV, " ".join(from_environment))
    overrides = [*from_environment, *overrides]
    data = base.to_dict()
    known = _known_keys(kind)
    flags = []
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip().removeprefix("--")
        if not sep:
            raise ValueError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-3")
        if key.startswith("model.overrides."):
            # One ViTConfig field at a time; its type is checked when the ViTConfig is built.
            data["model"]["overrides"][key.removeprefix("model.overrides.")] = yaml.safe_load(value)
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownKeyError(f"override {override!r}: unknown config key {key!r}{hint}")
        flags.append(f"--experiment.{key}={value}")
    base = _parse({"experiment": data}, config if isinstance(config, str) else "config", kind)
    parser = _parser(kind)
    parser.set_defaults({"experiment": base.to_dict()})
    import jsonargparse

    try:
        experiment = parser.instantiate(parser.parse_args(flags)).experiment
    except jsonargparse.ArgumentError as error:
        raise ValueError(f"override: {error}".replace("experiment.", "")) from error
    # What is still relative was typed on the command line: it is taken from the working folder.
    return scale_lr(_with_root(experiment, Path.cwd()))


def scale_lr(experiment: Any) -> Any:
    """Linear lr scaling: a recipe whose lr is stated for `optim.lr_base_batch` gets lr x (effective
    batch / base batch), the effective batch being data.batch_size x train.accumulation x ranks
    ($WORLD_SIZE, set by torchrun). The result says what was done (`optim.lr_note`) and sets
    lr_base_batch to 0, so a resolved config loaded again (a run's config.json) is not scaled twice."""
    optim = experiment.optim
    if not optim.lr_base_batch:
        return experiment
    world = os.environ.get("WORLD_SIZE", "1")
    ranks = int(world) if world.isdigit() and int(world) >= 1 else 1
    batch = experiment.data.batch_size * experiment.train.accumulation * ranks
    factor = batch / optim.lr_base_batch
    note = f"{optim.lr:g} at batch {optim.lr_base_batch}, scaled linearly to batch {batch}: {optim.lr * factor:g}"
    log.info("optim.lr: %s", note)
    scaled = dataclasses.replace(
        optim, lr=optim.lr * factor, min_lr=optim.min_lr * factor, lr_base_batch=0, lr_note=note
    )
    return dataclasses.replace(experiment, optim=scaled)


OVERRIDES_ENV = "VITKIT_SET"


def environment_overrides() -> list[str]:
    """`key=value` overrides from $VITKIT_SET (space-separated, shell quoting), applied before the
    command line's, which win: e.g. VITKIT_SET="train.epochs=1 train.max_steps=2" for a smoke run of
    any command that trains. `load_experiment` applies and announces them; this only reads them."""
    import shlex

    return shlex.split(os.environ.get(OVERRIDES_ENV, ""))


def check_top_k(top_k: tuple[int, ...], num_classes: int) -> None:
    """eval.top_k holds positive ks and 1 (top-1 picks the best checkpoint and is logged), checked
    before training instead of failing after an epoch. A k above the data's classes counts every
    label (see evaluate_classification), as top-5 does on sets of fewer classes."""
    if not top_k or 1 not in top_k or min(top_k) < 1:
        raise ValueError(
            f"eval.top_k={list(top_k)}: expected positive ks that include 1 (the data has {num_classes} "
            f"classes; top-1 picks the best checkpoint)"
        )
