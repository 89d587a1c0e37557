"""vitkit: Vision Transformers on PyTorch. The public API, re-exported from the modules that own it."""

from .io import CheckpointFile, load, read_checkpoint, save
from .models import VisionTransformer, ViTConfig
from .registry import create_model, get_config, list_models

__all__ = [
    "CheckpointFile",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "get_config",
    "list_models",
    "load",
    "read_checkpoint",
    "save",
]
__version__ = "0.1.0"
