"""`apply_fast_paths(model, device, precision)`: the code that runs a model (training, evaluation,
prediction, serving, export, benchmarks) chooses its device and precision, then makes the built model
compute the same function faster there.

Every block, attention and MLP of the model takes its fast class (`blocks.py`); where bf16 GEMMs run
on fp32 units (`kernels.py`), so do the dense layers of attention and MLPs and the stems' convolutions.
The swap is of each module's class, in place: parameters, buffers, names, hooks and the state dict
stay, so an optimizer, EMA copy or checkpoint of the model is unaffected. Apply before wrapping the
model in DDP / FSDP or torch.compile.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..models.stems import ConvStem, HMLPStem, HybridStem, PatchEmbed
from ..models.vit import Attention, Block, Mlp, ParallelBlock
from .blocks import FastAttention, FastBlock, FastMlp, FusedParallelBlock
from .kernels import FastConv2d, FastLinear, Kernels, choose_kernels

log = logging.getLogger(__name__)

# The plain module classes and their fast classes (a fast class maps to itself: applying again
# updates the kernels).
FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    Attention: FastAttention,
    Mlp: FastMlp,
    Block: FastBlock,
    ParallelBlock: FusedParallelBlock,
    **{fast: fast for fast in (FastAttention, FastMlp, FastBlock, FusedParallelBlock)},
}


def apply_fast_paths(model: nn.Module, device: torch.device | str, precision: str = "fp32") -> nn.Module:
    """Make `model` (any module holding vitkit blocks) compute its function by the fast paths of
    `device` and `precision` ("fp32", "bf16", "fp16"); returns the same model object."""
    kernels = choose_kernels(device, precision)
    for module in model.modules():
        fast_class = FAST_CLASSES.get(type(module))
        if fast_class is not None:
            _swap(module, fast_class, kernels)
    for module in gemm_modules(model):
        dense = isinstance(module, nn.Linear)
        if kernels.bf16_gemm_in_fp32:
            _swap(module, FastLinear if dense else FastConv2d, kernels)
        else:  # back to torch's own kernels (a model applied before for bf16)
            module.__class__ = nn.Linear if dense else nn.Conv2d
    log.info("fast paths for %s %s: %s", torch.device(device), precision, kernels)
    return model


def gemm_modules(model: nn.Module) -> list[nn.Module]:
    """The dense layers of attention and MLPs and the convolutions of the patch stems (the ResNet
    trunk of a hybrid stem has its own standardised convolutions and is left as it is)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (Attention, Mlp)):
            found += [m for m in module.children() if type(m) in (nn.Linear, FastLinear)]
        elif isinstance(module, (PatchEmbed, HMLPStem, ConvStem)):
            found += [m for m in module.modules() if type(m) in (nn.Conv2d, FastConv2d)]
        elif isinstance(module, HybridStem):
            found.append(module.proj)
    return found


def _swap(module: nn.Module, fast_class: type[nn.Module], kernels: Kernels) -> None:
    module.__class__ = fast_class
    module.kernels = kernels
    if isinstance(module, FusedParallelBlock):
        module.adopt()
