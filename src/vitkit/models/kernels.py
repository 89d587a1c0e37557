"""How the model's two heavy operations, dense layers and attention, are computed on each device and
precision. The model calls `linear` and `attention`; everything here computes the same function as
`F.linear` and `F.scaled_dot_product_attention` (tests/test_fastpaths.py holds them equal) and differs
only in speed and memory.

bf16 on CPUs without AMX. Such a CPU (this project's CI machines: AVX-512 with avx512_bf16, no AMX)
runs oneDNN's bf16 GEMM on its bf16 dot-product instruction, which does no more multiply-adds per cycle
than the fp32 FMA units and then pays for conversions: ViT-sized bf16 GEMMs run at 200 GFLOP/s there
against 330-385 for fp32 (2 threads). So bf16 products are computed as fp32 GEMMs of the bf16 operands:
operands are rounded to bf16 and widened exactly, the products accumulate in fp32 (as oneDNN's bf16
GEMM accumulates), and the result is rounded to bf16. The inputs, outputs and saved activations are the
bf16 tensors of the native path; only the arithmetic units differ. Where AMX exists (its tiles multiply
bf16 several times faster than fp32), on GPUs, and for fp16 (avx512_fp16 has native fp16 FMAs), the
native kernels run. `VITKIT_BF16_GEMM=native|fp32|auto` overrides the choice.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Sequence lengths up to which CPU training in bf16/fp16 computes attention as softmax(q k^T) v with
# autograd rather than SDPA's flash kernel, whose CPU backward is slow in low precision. Forward +
# backward, one thread, (batch, heads, length), bf16: (128, 3, 65) 95 -> 24 ms, (32, 3, 197) 76 -> 44 ms,
# (16, 12, 197) 148 -> 86 ms, (4, 12, 577) 247 -> 174 ms. In fp32 the kernels tie at 197 tokens and,
# inside a model (strided q, k, v), SDPA wins at 65 too, so fp32 stays on SDPA. The explicit path keeps
# the (B, heads, L, L) probabilities for the backward pass, hence the bound. Inference always uses SDPA
# (its flash forward is as fast as the explicit product or faster).
EXPLICIT_TRAINING_ATTENTION_MAX_LEN = {torch.bfloat16: 640, torch.float16: 640}

BF16_GEMM_CHOICES = ("auto", "native", "fp32")


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def bf16_gemm_in_fp32(device: torch.device) -> bool:
    """Whether bf16 products on `device` run as fp32 GEMMs of the bf16 operands (see the module text)."""
    if device.type != "cpu":
        return False
    choice = os.environ.get("VITKIT_BF16_GEMM", "auto")
    if choice not in BF16_GEMM_CHOICES:
        raise ValueError(f"VITKIT_BF16_GEMM={choice!r}: expected one of {', '.join(BF16_GEMM_CHOICES)}")
    return choice == "fp32" or (choice == "auto" and not _cpu_has_amx())


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
    """F.linear with bf16 operands and a bf16 result, multiplied on fp32 units. It saves the bf16
    operands (the native path's memory) and widens them again in the backward pass, whose products
    also run in fp32; each gradient is returned in its input's dtype, as autocast's casts return it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        b32 = None if bias is None else _widen(bias)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x16.float(), w16.float(), b32).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g32 = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g32 @ w16.float()).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g32.flatten(0, -2).t() @ x16.flatten(0, -2).float()).to(torch.bfloat16).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g32.flatten(0, -2).sum(0).to(torch.bfloat16).to(b_dtype)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, by the fastest kernel for the device and precision."""
    if compute_dtype(x) == torch.bfloat16 and bf16_gemm_in_fp32(x.device):
        with torch.autocast(x.device.type, enabled=False):
            return _Bf16LinearInFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and hooks) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, L, head_dim), by the fastest kernel for the case."""
    kernel = _explicit_attention if _explicit_in_training(q, k, v) else _sdpa
    if q.dtype == torch.bfloat16 and bf16_gemm_in_fp32(q.device):
        return kernel(q.float(), k.float(), v.float(), dropout_p).to(torch.bfloat16)
    return kernel(q, k, v, dropout_p)


def _explicit_in_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[-2] <= EXPLICIT_TRAINING_ATTENTION_MAX_LEN.get(q.dtype, 0)
    )


def _sdpa(q, k, v, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _explicit_attention(q, k, v, dropout_p):
    weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v
