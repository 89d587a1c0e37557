"""Kernels for one device and precision: how dense layers, stem convolutions and attention are
computed. Each function computes its torch counterpart's function (F.linear, nn.Conv2d,
F.scaled_dot_product_attention; tests/test_fastpaths.py holds them equal) and differs only in speed
and memory. `choose_kernels(device, precision)` makes the choice once; the modules of `blocks.py`
and `FastLinear` / `FastConv2d` hold it. The measurements behind the choices are in docs/results.md
("Kernels").

bf16 GEMMs on fp32 units (`Kernels.bf16_gemm_in_fp32`, CPUs without AMX): a bf16 product is computed
as an fp32 GEMM of the bf16 operands: the operands are rounded to bf16 and widened exactly, the
products accumulate in fp32 (as oneDNN's bf16 GEMM accumulates), and each result is rounded to bf16.
The tensors between operations are the native path's bf16 tensors, and dense layers save their bf16
inputs for the backward pass as the native path does. Attention in training stays in bf16 (see
`attention`); in inference it runs SDPA on the widened q, k, v. Gradients reaching fp32 tensors (the
LayerNorm outputs under autocast) are not rounded to bf16 on the way. `VITKIT_BF16_GEMM=native|fp32|auto`
overrides the choice.

Explicit training attention (`Kernels.explicit_training_attention`, CPU in bf16 or fp16): sequences up
to `Kernels.explicit_attention_max_len` tokens take softmax(q k^T) v with autograd in training rather
than SDPA; it keeps the (B, heads, L, L) probabilities for the backward pass, hence a bound.

Both choices follow the machine's calibration (`machine.py`): bf16 products go to fp32 units where
they measured faster there than on torch's native bf16 kernels, and the explicit attention takes the
sequences up to the longest measured length at which it beat SDPA. Without a calibration the flag
rules decide: fp32 units on CPUs without AMX, explicit attention up to 640 tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .machine import EXPLICIT_ATTENTION_MAX_LEN, calibration

BF16_GEMM_CHOICES = ("auto", "native", "fp32")
PRECISIONS = ("fp32", "bf16", "fp16")

_AMX_PROBE = getattr(torch.cpu, "_is_amx_tile_supported", None)
_CPU_HAS_AMX = bool(_AMX_PROBE()) if _AMX_PROBE is not None else False


def _cpu_has_amx() -> bool:
    return _CPU_HAS_AMX


@dataclass(frozen=True)
class Kernels:
    """The kernel choices of one device and precision; all off is the plain model's arithmetic."""

    bf16_gemm_in_fp32: bool = False  # bf16 products as fp32 GEMMs of the bf16 operands
    explicit_training_attention: bool = False  # softmax(q k^T) v with autograd for short sequences
    explicit_attention_max_len: int = EXPLICIT_ATTENTION_MAX_LEN  # the longest such sequence


def bf16_gemm_in_fp32(device: torch.device) -> bool:
    """Whether bf16 products on `device` run as fp32 GEMMs of the bf16 operands (see the module text)."""
    if device.type != "cpu":
        return False
    choice = os.environ.get("VITKIT_BF16_GEMM", "auto")
    if choice not in BF16_GEMM_CHOICES:
        raise ValueError(f"VITKIT_BF16_GEMM={choice!r}: expected one of {', '.join(BF16_GEMM_CHOICES)}")
    if choice != "auto":
        return choice == "fp32"
    measured = calibration()
    if measured is not None:
        return measured.bf16_path == "bf16_fp32_units"
    return not _cpu_has_amx()


def choose_kernels(device: torch.device | str, precision: str) -> Kernels:
    """The kernels for a model run on `device` in `precision` ("fp32", "bf16" or "fp16")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    low_precision_cpu = device.type == "cpu" and precision != "fp32"
    measured = calibration() if low_precision_cpu else None
    max_len = EXPLICIT_ATTENTION_MAX_LEN if measured is None else measured.explicit_attention_max_len()
    return Kernels(
        bf16_gemm_in_fp32=precision == "bf16" and bf16_gemm_in_fp32(device),
        explicit_training_attention=low_precision_cpu and max_len > 0,
        explicit_attention_max_len=max_len,
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product with `x` runs in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _widen(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16, as fp32 (exact)."""
    return x.to(torch.bfloat16).float()


class _Bf16LinearInFp32(torch.autograd.Function):
    """F.linear with bf16 operands and bf16 results, multiplied on fp32 units, for `chunks` equal
    slices of the output features (q, k and v of one qkv weight): one widened input, one product per
    slice. It saves the bf16 operands (the native path's memory) and widens them again in the
    backward pass, which puts the slices' gradients side by side in one fp32 buffer as it widens
    them and then needs one product per gradient; each gradient is returned in its input's dtype, as
    autocast's casts return it."""

    @staticmethod
    def forward(ctx, x, weight, bias, chunks):
        x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        x32, w32 = x16.float(), w16.float()
        biases = (None,) * chunks if bias is None else _widen(bias).chunk(chunks)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return tuple(
            F.linear(x32, w, b).to(torch.bfloat16) for w, b in zip(w32.chunk(chunks), biases, strict=True)
        )

    @staticmethod
    def backward(ctx, *grads):
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if len(grads) == 1:
            g32 = grads[0].float()
        else:
            g32 = x16.new_empty((*x16.shape[:-1], w16.shape[0]), dtype=torch.float32)
            for part, grad in zip(g32.chunk(len(grads), dim=-1), grads, strict=True):
                part.copy_(grad)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g32 @ w16.float()).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g32.flatten(0, -2).t() @ x16.flatten(0, -2).float()).to(torch.bfloat16).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g32.flatten(0, -2).sum(0).to(torch.bfloat16).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def _bf16_in_fp32(x: torch.Tensor, kernels: Kernels) -> bool:
    return kernels.bf16_gemm_in_fp32 and compute_dtype(x) == torch.bfloat16


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: Kernels = Kernels()
) -> torch.Tensor:
    """F.linear, by the kernel `kernels` chose."""
    if _bf16_in_fp32(x, kernels):
        with torch.autocast(x.device.type, enabled=False):
            return _Bf16LinearInFp32.apply(x, weight, bias, 1)[0]
    return F.linear(x, weight, bias)


def linear_chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunks: int,
    kernels: Kernels = Kernels(),
) -> tuple[torch.Tensor, ...]:
    """F.linear(x, weight, bias).chunk(chunks, -1) as `chunks` separate products, so that each output
    is its own tensor and the backward pass adds the input gradients rather than stacking the output
    gradients into one tensor and copying it back to the fused layout."""
    if _bf16_in_fp32(x, kernels):
        with torch.autocast(x.device.type, enabled=False):
            return _Bf16LinearInFp32.apply(x, weight, bias, chunks)
    biases = (None,) * chunks if bias is None else bias.chunk(chunks)
    return tuple(F.linear(x, w, b) for w, b in zip(weight.chunk(chunks), biases, strict=True))


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, names and hooks) computed by `linear` with `kernels`."""

    kernels: Kernels = Kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernels)


class FastConv2d(nn.Conv2d):
    """nn.Conv2d with `linear`'s choice for bf16: a patchifying convolution is a dense layer on patches,
    as slow in bf16 on a CPU without AMX. Differentiable through the casts (its input is the image)."""

    kernels: Kernels = Kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _bf16_in_fp32(x, self.kernels):
            bias = None if self.bias is None else _widen(self.bias)
            with torch.autocast(x.device.type, enabled=False):
                return self._conv_forward(_widen(x), _widen(self.weight), bias).to(torch.bfloat16)
        return super().forward(x)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, kernels: Kernels = Kernels()
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, L, head_dim), by the kernel `kernels` chose."""
    if kernels.explicit_training_attention and _explicit_in_training(
        q, k, v, kernels.explicit_attention_max_len
    ):
        # In q's dtype even where bf16 GEMMs are slow: at these lengths the batched products run as
        # fast in bf16 as widened to fp32, and the saved probabilities keep their bf16 size.
        return _explicit_attention(q, k, v, dropout_p)
    if _bf16_in_fp32(q, kernels):
        with torch.autocast(q.device.type, enabled=False):  # autocast would cast SDPA back to bf16
            return _sdpa(q.float(), k.float(), v.float(), dropout_p).to(torch.bfloat16)
    return _sdpa(q, k, v, dropout_p)


def _explicit_in_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_len: int) -> bool:
    """In training (gradients wanted), in a low precision and short enough; inference stays on SDPA."""
    return (
        torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-2] <= max_len
    )


def _sdpa(q, k, v, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _explicit_attention(q, k, v, dropout_p):
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v
