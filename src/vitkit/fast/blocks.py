"""Faster implementations of the model's blocks: each is a subclass of the plain module with the same
parameters and names (`apply_fast_paths` swaps a module's class in place), computing the same function.

- `FastAttention`: in training, q, k and v as three products with slices of the one qkv weight
  (`linear_chunks`), so the backward pass adds the input gradients rather than stacking the output
  gradients; attention and dense layers by the chosen `Kernels`.
- `FastMlp`, `FastBlock`: in inference (no gradient wanted), the GELU and the MLP residual are applied
  in place on the block's own fresh tensors: one buffer less each.
- `FusedParallelBlock`: all branches of a parallel block as one wider layer (below).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.rope import apply_rope
from ..models.vit import Attention, Block, DropPath, LayerScale, Mlp, ParallelBlock, Rope
from .kernels import Kernels, attention, linear, linear_chunks


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gelu(act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """GELU, in place on a fresh activation when no gradient needs the input: one buffer less."""
    if _wants_grad(x):
        return act(x)
    return torch.ops.aten.gelu_(x, approximate=act.approximate)


class FastAttention(Attention):
    """`Attention` with q, k, v as three products in training and the chosen attention kernel."""

    kernels: Kernels = Kernels()

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not _wants_grad(self.qkv.weight):
            return super().split_heads(x)
        batch, length, _ = x.shape
        parts = linear_chunks(x, self.qkv.weight, self.qkv.bias, 3, self.kernels)
        return tuple(p.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for p in parts)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        dropout = self.attn_dropout if self.training else 0.0
        x = attention(q, k, v, dropout, self.kernels)  # (B, heads, L, head_dim)
        return self.proj_drop(self.proj(x.transpose(1, 2).flatten(2)))


class FastMlp(Mlp):
    """`Mlp` with the GELU in place in inference."""

    kernels: Kernels = Kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(gelu(self.act, self.fc1(x)))))


class FastBlock(Block):
    """`Block` with the MLP residual summed in place in inference."""

    kernels: Kernels = Kernels()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope)))
        mlp = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if _wants_grad(x, mlp):
            return x + mlp
        return x.add_(mlp)  # x is this block's own tensor (the attention residual's sum)


class FusedParallelBlock(ParallelBlock):
    """`ParallelBlock` computed as one wider layer, with the parameters and FLOPs of the sequential sum
    but half the kernel calls of the sequential model: one LayerNorm statistics pass, each branch's
    norm affine folded into its qkv (fc1) weights so that all branches' qkv (fc1) are one matmul, all
    branches' heads in one attention call, and the output projections (fc2) one matmul over the
    concatenated branch activations with LayerScale folded in. In inference the folded weights are
    built once and kept (`fused_weights`). `forward_branches` (the plain block's forward) also runs in
    training when dropout or stochastic depth must draw noise per branch.
    """

    kernels: Kernels = Kernels()
    _fused_cache: tuple[tuple, dict] | None = None

    def adopt(self) -> None:
        """Set what the fused path needs from the plain block's modules (after the class swap)."""
        self._fused_cache = None
        self.norm_eps = self.attns[0].norm.eps
        self.noise_per_branch = any(
            isinstance(m, DropPath) or (isinstance(m, nn.Dropout) and m.p > 0) for m in self.modules()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_per_branch:
            return self.forward_branches(x)
        weights = self.fused_weights()
        x = x + self.fused_attention(x, weights)
        return x + self.fused_mlp(x, weights)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def fused_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """All branches' qkv, proj, fc1 and fc2 as one (weight, bias) each, norms and LayerScale folded in.

        With gradients on they are rebuilt on every call (so gradients reach the branch parameters);
        in inference they are kept until a parameter changes (its storage or in-place version counter),
        the module moves (`to`, `half`, ...) or its mode is switched, so a served model does no weight
        work per call. The cache costs one extra copy of the block's weights while it lives.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self._is_sharded():
            return self._fuse()
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        if self._fused_cache is None or self._fused_cache[0] != key:
            self._fused_cache = (key, self._fuse())
        return self._fused_cache[1]

    def _fuse(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # Folded in the parameters' dtype whatever autocast says: `linear` casts at use.
        with torch.autocast(self.attns[0].norm.weight.device.type, enabled=False):
            qkv = [_fold_norm(branch.norm, branch.attn.qkv) for branch in self.attns]
            fc1 = [_fold_norm(branch.norm, branch.mlp.fc1) for branch in self.ffns]
        return {
            # Rows ordered (q|k|v, branch, head, head_dim), so the branches' heads sit side by side.
            "qkv": (
                torch.stack([w.unflatten(0, (3, -1)) for w, _ in qkv], dim=1).flatten(0, 2),
                torch.stack([b.unflatten(0, (3, -1)) for _, b in qkv], dim=1).flatten(),
            ),
            "proj": _fold_output([(b.attn.proj, b.ls) for b in self.attns]),
            "fc1": (torch.cat([w for w, _ in fc1]), torch.cat([b for _, b in fc1])),
            "fc2": _fold_output([(b.mlp.fc2, b.ls) for b in self.ffns]),
        }

    def _is_sharded(self) -> bool:
        # FSDP2 gathers and frees parameters around each call (its class is FSDP<name>): nothing may
        # outlive a call.
        return type(self) is not FusedParallelBlock and type(self).__name__.startswith("FSDP")

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(), ...: the cache is of the old tensors
        self._fused_cache = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self._fused_cache = None
        return super().train(mode)

    def fused_attention(self, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """sum_i ls_i(MSA_i(LN_i(x))) in one qkv matmul, one attention call and one projection."""
        weights = weights or self.fused_weights()
        batch, length, _ = x.shape
        first, shape = self.attns[0].attn, self.attns[0].norm.normalized_shape
        x = F.layer_norm(x, shape, eps=self.norm_eps)
        qkv = linear(x, *weights["qkv"], self.kernels)  # (B, L, 3 * p * D)
        qkv = qkv.reshape(batch, length, 3, -1, first.head_dim)  # (B, L, 3, p * heads, head_dim)
        dropout = first.attn_dropout if self.training else 0.0
        x = attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), dropout, self.kernels)
        return linear(x.transpose(1, 2).flatten(2), *weights["proj"], self.kernels)

    def fused_mlp(self, x: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
        """sum_i ls_i(MLP_i(LN_i(x))) as one fc1 matmul and one fc2 matmul."""
        weights = weights or self.fused_weights()
        x = F.layer_norm(x, self.ffns[0].norm.normalized_shape, eps=self.norm_eps)
        hidden = linear(x, *weights["fc1"], self.kernels)  # (B, L, parallel * mlp_dim)
        hidden = gelu(self.ffns[0].mlp.act, hidden)
        return linear(hidden, *weights["fc2"], self.kernels)


def _fold_norm(norm: nn.LayerNorm, dense: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """dense(norm(x)) = x_hat W'^T + b' for x_hat normalised without affine: W' = W diag(g), b' = W beta + b."""
    bias = dense.weight @ norm.bias
    return dense.weight * norm.weight, bias if dense.bias is None else bias + dense.bias


def _fold_output(layers: list[tuple[nn.Linear, nn.Module]]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i ls_i(linear_i(x_i)) for x = [x_1 | ... | x_p] concatenated on features is one linear layer
    with K = the sum of the branches' widths: LayerScale gamma folded into each weight's rows and bias."""
    weights, bias = [], 0
    for dense, scale in layers:
        if isinstance(scale, LayerScale):
            weights.append(dense.weight * scale.gamma[:, None])
            bias = bias + dense.bias * scale.gamma
        else:
            weights.append(dense.weight)
            bias = bias + dense.bias
    return torch.cat(weights, dim=1), bias
