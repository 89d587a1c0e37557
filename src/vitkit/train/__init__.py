"""Training: the experiment config, the loop, its metrics and EMA, objectives, optimiser groups and the
resumable state."""

from .experiment import EvalConfig, Experiment, ModelConfig, TrainConfig, load_experiment
from .loop import NonFiniteLossError, train
from .objectives import OBJECTIVES
from .optim import FREEZE_RULES, OptimConfig, apply_freeze_rule, param_groups
from .run_folder import RunFinishedError, RunFolderError
from .task import build_model

__all__ = [
    "FREEZE_RULES",
    "OBJECTIVES",
    "EvalConfig",
    "Experiment",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunFinishedError",
    "RunFolderError",
    "TrainConfig",
    "apply_freeze_rule",
    "build_model",
    "load_experiment",
    "param_groups",
    "train",
]
