"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), Figure 1.

    image -> patches -> linear embedding -> [class] token + position embeddings -> L encoder blocks
    (pre-norm multi-head self-attention, pre-norm MLP, residuals) -> norm -> pool -> (pre-logits) -> head

plus the parallel block of "Three things everyone should know about ViTs" (Touvron et al., 2022),
register tokens (Darcet et al., 2024) and DINOv3's rotary position embeddings (`rope.py`).
Module names match timm's VisionTransformer so that a timm state dict of a standard ViT loads as is.

The model computes with nn.Linear, SDPA and GELU and knows no device, precision or autograd mode:
faster implementations of the same function (fused parallel blocks, in-place inference, CPU bf16
GEMMs) are in `vitkit.fast`, applied to a built model by the code that runs it (`apply_fast_paths`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .pos_embed import resample_pos_embed, sincos_2d
from .rope import apply_rope, rope_2d
from .stems import build_stem

# The rotary embedding's (cos, sin) for the patch tokens, each (h*w, head_dim): see rope.py.
Rope = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention (MSA of equation 2) with one fused qkv projection, timm's layout."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, D) -> q, k, v, each (B, heads, L, head_dim)."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        dropout = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, heads, L, head_dim)
        x = x.transpose(1, 2).flatten(2)  # (B, L, D)
        return self.proj_drop(self.proj(x))

    def attention_weights(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) as (B, heads, L, L); recomputed on request, outside the forward pass."""
        q, k, _ = self.split_heads(x)
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        return torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)


class Mlp(nn.Module):
    """Two dense layers with a GELU between (equation 3); dropout after each, as the paper."""

    def __init__(self, dim: int, hidden_dim: int, gelu: str = "exact", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.drop1(self.act(self.fc1(x)))  # (B, L, mlp_dim)
        return self.drop2(self.fc2(hidden))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (CaiT); `gamma` is timm's name."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p, rescale the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def _branch(config: ViTConfig, name: str, inner: nn.Module, drop_path: float) -> nn.Sequential:
    """One residual branch of a parallel block: norm -> attn or mlp -> LayerScale -> stochastic depth."""
    d = config.embed_dim
    return nn.Sequential(
        OrderedDict(
            [
                ("norm", nn.LayerNorm(d, eps=config.norm_eps)),
                (name, inner),
                ("ls", LayerScale(d, config.layer_scale_init) if config.layer_scale_init else nn.Identity()),
                ("drop_path", DropPath(drop_path) if drop_path > 0 else nn.Identity()),
            ]
        )
    )


def _attention(config: ViTConfig) -> Attention:
    return Attention(config.embed_dim, config.num_heads, config.qkv_bias, config.attn_dropout, config.dropout)


def _mlp(config: ViTConfig) -> Mlp:
    return Mlp(config.embed_dim, config.mlp_dim, config.gelu, config.dropout)


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (equations 2 and 3)."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        d = config.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.attn = _attention(config)
        self.ls1 = LayerScale(d, config.layer_scale_init) if config.layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = _mlp(config)
        self.ls2 = LayerScale(d, config.layer_scale_init) if config.layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attention_weights(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        return self.attn.attention_weights(self.norm1(x), rope)


class ParallelBlock(nn.Module):
    """ "Three things" #1: x + sum_i MSA_i(LN_i(x)), then x + sum_i MLP_i(LN_i(x)).

    Keys follow timm's ParallelThingsBlock: attns.{i}.norm|attn|ls, ffns.{i}.norm|mlp|ls.
    """

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attns = nn.ModuleList(
            [_branch(config, "attn", _attention(config), drop_path) for _ in range(config.parallel)]
        )
        self.ffns = nn.ModuleList(
            [_branch(config, "mlp", _mlp(config), drop_path) for _ in range(config.parallel)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sum(attn(x) for attn in self.attns)
        return x + sum(ffn(x) for ffn in self.ffns)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each branch's heads, concatenated: (B, parallel * heads, L, L)."""
        return torch.cat([b.attn.attention_weights(b.norm(x)) for b in self.attns], dim=1)


class AttentionPool(nn.Module):
    """Multihead attention pooling (big_vision's MAP head; timm's AttentionPoolLatent names)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        d = config.embed_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.latent = nn.Parameter(torch.randn(1, 1, d) * d**-0.5)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = _mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q = self.q(self.latent).reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v)
        x = self.proj(x.transpose(1, 2).reshape(batch, 1, dim))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.grad_checkpointing = False

        self.patch_embed = build_stem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.class_token else None
        # Registers start as tiny noise (DINOv2, timm): zeros would keep them identical forever.
        num_reg = config.num_reg_tokens
        self.reg_token = nn.Parameter(torch.randn(1, num_reg, d) * 1e-6) if num_reg else None
        num_pos = config.num_patches + (config.num_prefix_tokens if config.pos_embed_class_slot else 0)
        if config.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, num_pos, d) * 0.02)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(config.dropout)

        # Stochastic depth rises linearly with depth (Huang et al.; DeiT).
        drop_paths = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        block_cls = Block if config.parallel == 1 else ParallelBlock
        self.blocks = nn.Sequential(*[block_cls(config, p) for p in drop_paths])

        # "gap" is the official order (norm every token, then mean); "gap_fc_norm" timm/MAE's (mean,
        # then norm).
        fc_norm = config.pool == "gap_fc_norm"
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(d, eps=config.norm_eps)
        self.attn_pool = AttentionPool(config) if config.pool == "map" else None
        self.fc_norm = nn.LayerNorm(d, eps=config.norm_eps) if fc_norm else nn.Identity()
        if config.representation_size:
            self.pre_logits = nn.Sequential(
                OrderedDict(fc=nn.Linear(d, config.representation_size), act=nn.Tanh())
            )
            head_in = config.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = d
        self.head_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(head_in, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official code's init: xavier-uniform dense layers with zero bias (tiny normal bias in
        the MLPs), LeCun-normal patch projection, N(0, 0.02) position embeddings, zero class token."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                if name.endswith("attn.qkv") or name.endswith(".kv"):
                    fan_out //= 3 if name.endswith("qkv") else 2  # xavier of each of q, k, v
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    if ".mlp." in f".{name}.":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
        stem = self.patch_embed
        if hasattr(stem, "proj") and isinstance(stem.proj, nn.Conv2d):
            fan_in = stem.proj.weight[0].numel()
            nn.init.trunc_normal_(stem.proj.weight, std=math.sqrt(1.0 / fan_in) / 0.8796)
            nn.init.zeros_(stem.proj.bias)
        if isinstance(self.pre_logits, nn.Sequential):
            nn.init.trunc_normal_(
                self.pre_logits.fc.weight, std=math.sqrt(1.0 / self.pre_logits.fc.in_features)
            )
        if self.config.zero_head and isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
        self.grad_checkpointing = enable

    # The forward pass, step by step -------------------------------------------------------------------
    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The stem: (B, C, H, W) -> patch tokens (B, h*w, D) (x_p E of equation 1) and the grid (h, w)."""
        stride = self.config.stride
        if images.shape[-2] % stride or images.shape[-1] % stride:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the stride {stride}")
        grid = (images.shape[-2] // stride, images.shape[-1] // stride)
        return self.patch_embed(images), grid

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Position embeddings for this grid, resampled in 2D from the config's grid when they differ."""
        config = self.config
        if config.pos_embed in ("none", "rope"):
            return None
        num_prefix = config.num_prefix_tokens if config.pos_embed_class_slot else 0
        if config.pos_embed == "sincos2d":
            patches = sincos_2d(grid, config.embed_dim).unsqueeze(0)
            prefix = patches.new_zeros(1, num_prefix, config.embed_dim)
            return torch.cat([prefix, patches], dim=1)
        return resample_pos_embed(
            self.pos_embed, grid, config.grid_size, num_prefix, config.pos_embed_resample
        )

    def rotary_embeddings(self, grid: tuple[int, int], device: torch.device) -> Rope | None:
        """RoPE's float32 (cos, sin) for this grid, (h*w, head_dim) each; None without RoPE."""
        config = self.config
        if config.pos_embed != "rope":
            return None
        cos, sin = rope_2d(grid, config.head_dim, config.rope_theta)
        return cos.to(device), sin.to(device)

    def add_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Prepend the class and register tokens and add position embeddings: z_0 of equation (1)."""
        pos_embed = self.position_embeddings(grid)
        if pos_embed is not None:
            pos_embed = pos_embed.to(dtype=x.dtype, device=x.device)
        class_slot = self.config.pos_embed_class_slot
        if pos_embed is not None and not class_slot:
            x = x + pos_embed
        prefix = [token for token in (self.cls_token, self.reg_token) if token is not None]
        if prefix:
            x = torch.cat([token.expand(x.shape[0], -1, -1).to(x.dtype) for token in prefix] + [x], dim=1)
        if pos_embed is not None and class_slot:
            x = x + pos_embed
        return self.pos_drop(x)

    def forward_blocks(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The L encoder blocks on tokens (B, prefix + h*w, D) of a patch grid."""
        rope = self.rotary_embeddings(grid, x.device)
        args = () if rope is None else (rope,)  # only `Block` takes RoPE (the config refuses parallel)
        recompute = self.grad_checkpointing and self.training
        for block in self.blocks:
            x = checkpoint(block, x, *args, use_reentrant=False) if recompute else block(x, *args)
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + h*w, D): class, registers, patches."""
        x, grid = self.embed_patches(images)
        x = self.add_tokens(x, grid)
        return self.norm(self.forward_blocks(x, grid))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D): the class token, the mean of patch tokens (registers left out), or
        attention pooling."""
        if self.config.pool == "token":
            return x[:, 0]
        if self.config.pool == "map":
            return self.attn_pool(x)
        return x[:, self.config.num_prefix_tokens :].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits; with pre_logits=True, the representation the head would see."""
        x = self.pre_logits(self.fc_norm(self.pool(x)))
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    @torch.no_grad()
    def forward_intermediates(
        self, images: torch.Tensor, attention: bool = False
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Every block's output tokens and, on request, its attention weights (B, heads, L, L).

        The weights are recomputed from each block's input by `attention_weights`, so the forward pass
        itself stays SDPA's.
        """
        x, grid = self.embed_patches(images)
        x = self.add_tokens(x, grid)
        rope = self.rotary_embeddings(grid, x.device)
        args = () if rope is None else (rope,)
        blocks, weights = [], []
        for block in self.blocks:
            if attention:
                weights.append(block.attention_weights(x, *args))
            x = block(x, *args)
            blocks.append(x)
        tokens = self.norm(x)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "blocks": blocks,
            "tokens": tokens,
            "logits": self.forward_head(tokens),
            "grid": torch.tensor(grid),
        }
        if attention:
            out["attention"] = weights
        return out

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
