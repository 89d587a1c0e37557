"""`apply_fast_paths(model, device, precision)`: the code that runs a model (training, evaluation,
prediction, serving, export, benchmarks) chooses its device and precision, then makes the built model
compute the same function faster there.

Every block, attention and MLP of the model takes its fast class (`blocks.py`); where bf16 GEMMs run
on fp32 units (`kernels.py`), so do the dense layers of attention and MLPs and the stems' convolutions.
The swap is of each module's class, in place: parameters, buffers, names, hooks and the state dict
stay, so an optimizer, EMA copy or checkpoint of the model is unaffected. Apply before wrapping the
model in DDP / FSDP or torch.compile.

`prepare_inference(model, device, precision="auto")` is the same for code that only predicts: the
precision the machine measured fastest (`machine.choose_precision`), the weights stored in it (no cast
per call, as the peers do in bf16 inference) and the images cast to it where they enter the stem; the
outputs come in that dtype, so callers take `.float()` before a softmax.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..models.stems import CnnStem, ConvStem, HMLPStem, HybridStem, PatchEmbed
from ..models.vit import Attention, Block, Mlp, ParallelBlock
from .blocks import FastAttention, FastBlock, FastMlp, FusedParallelBlock
from .kernels import FastConv2d, FastLinear, Kernels, choose_kernels
from .machine import choose_precision

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STEMS = (PatchEmbed, HMLPStem, ConvStem, HybridStem, CnnStem)

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
    """The dense layers of attention and MLPs and the convolutions of the patch stems and the CNN
    trunk (the ResNet trunk of a hybrid stem has its own standardised convolutions and is left as it
    is)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, (Attention, Mlp)):
            found += [m for m in module.children() if type(m) in (nn.Linear, FastLinear)]
        elif isinstance(module, (*STEMS[:3], CnnStem)):
            found += [m for m in module.modules() if type(m) in (nn.Conv2d, FastConv2d)]
        elif isinstance(module, HybridStem):
            found.append(module.proj)
    return found


def _swap(module: nn.Module, fast_class: type[nn.Module], kernels: Kernels) -> None:
    module.__class__ = fast_class
    module.kernels = kernels
    if isinstance(module, FusedParallelBlock):
        module.adopt()


def prepare_inference(
    model: nn.Module, device: torch.device | str = "cpu", precision: str = "auto"
) -> tuple[nn.Module, str]:
    """(model, precision): `model` in eval mode on `device` with the fast paths of the precision chosen
    for it ("auto": measured, see `machine.choose_precision`), its weights stored in that precision and
    its stems casting the images to it. Returns the same model object and the precision taken."""
    device = torch.device(device)
    chosen, reason = choose_precision(precision, device)
    if chosen == "fp16" and device.type == "cpu":
        raise ValueError("precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on a CPU")
    log.info("inference precision %s -> %s: %s", precision, chosen, reason)
    apply_fast_paths(model.eval(), device, chosen).to(device=device, dtype=DTYPES[chosen])
    for module in model.modules():
        if isinstance(module, STEMS) and not getattr(module, "casts_input", False):
            module.register_forward_pre_hook(_cast_images)
            module.casts_input = True
    return model, chosen


def _cast_images(stem: nn.Module, args: tuple) -> tuple:
    """The stem's input (the images) in the dtype of its weights."""
    dtype = next(stem.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
