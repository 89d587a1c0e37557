"""vitkit: Vision Transformers on PyTorch. The public API, re-exported from the modules that own it."""

from .io import load, save
from .models import VisionTransformer, ViTConfig
from .registry import create_model, get_config, list_models

__all__ = ["ViTConfig", "VisionTransformer", "create_model", "get_config", "list_models", "load", "save"]
__version__ = "0.1.0"
