"""Masked-patch pre-training: which patches to corrupt, how, and what to predict for them.

Two objectives, one model (`MaskedPatchModel`) around any VisionTransformer with a local stem:

(a) The ViT paper, section 4.6 ("Self-supervision"), after BERT: corrupt 50% of the patch embeddings,
    80% of those replaced by a learnable [mask] embedding, 10% by another, random patch embedding, 10%
    kept as they are, and predict the 3-bit mean colour of every corrupted patch (8 levels per channel,
    512 classes) from its output token with a linear head.
(b) BeiT (Bao et al., 2022), blockwise masking: about 40% of the patches, in rectangular blocks, are
    replaced by the [mask] embedding; the target is pluggable: the patch's normalised pixels (MAE's
    `norm_pix_loss`, He et al., 2022) or the discrete token that a tokenizer module the user provides
    assigns to it (BeiT's dVAE codes; none is downloaded).

Corruption acts on patch tokens, after the stem and before the class token and position embeddings.
The linear and hMLP stems map each patch on its own, so replacing a token equals masking the patch's
pixels before the stem (`mask_pixels`); the hybrid's ResNet mixes neighbouring patches and is refused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_fields
from .vit import VisionTransformer

Target = Literal["mean_colour", "pixels", "tokens"]
Masking = Literal["vit", "blockwise"]


@dataclass(frozen=True)
class MaskedConfig:
    """The masked-patch objective. Defaults are the ViT paper's (section 4.6 and appendix B.1.2)."""

    target: Target = "mean_colour"
    masking: Masking = "vit"
    # Fraction of patches whose output is predicted: 0.5 in the ViT paper, 0.4 in BeiT.
    mask_ratio: float = 0.5
    # ViT masking only: of the corrupted patches, the fraction replaced by the mask token and the
    # fraction replaced by another patch embedding; the rest keep their own embedding.
    mask_token_fraction: float = 0.8
    random_patch_fraction: float = 0.1
    # Bits per channel of the mean-colour target: 3 gives 8^3 = 512 classes.
    colour_bits: int = 3
    # The normalisation the data pipeline applied, undone to read colours in [0, 1].
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # BeiT blockwise masking: the smallest block (in patches) and the aspect-ratio range [a, 1/a].
    min_block_patches: int = 16
    min_block_aspect: float = 0.3
    # Target "tokens": the tokenizer's vocabulary size (8192 for BeiT's dVAE).
    vocab_size: int = 0

    def __post_init__(self) -> None:
        for name in ("pixel_mean", "pixel_std"):
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))
        for name, allowed in (("target", Target), ("masking", Masking)):
            if getattr(self, name) not in get_args(allowed):
                raise ValueError(
                    f"MaskedConfig.{name}={getattr(self, name)!r}: expected one of {get_args(allowed)}"
                )
        checks = {
            "mask_ratio must be in (0, 1]": 0 < self.mask_ratio <= 1,
            "mask_token_fraction and random_patch_fraction must be >= 0 and sum to <= 1": min(
                self.mask_token_fraction, self.random_patch_fraction
            )
            >= 0
            and self.mask_token_fraction + self.random_patch_fraction <= 1,
            "colour_bits must be in 1..8": 1 <= self.colour_bits <= 8,
            "min_block_patches must be >= 1": self.min_block_patches >= 1,
            "min_block_aspect must be in (0, 1]": 0 < self.min_block_aspect <= 1,
            "target 'tokens' needs vocab_size >= 2": self.target != "tokens" or self.vocab_size >= 2,
            "pixel_mean and pixel_std need 3 values, std > 0": len(self.pixel_mean) == 3
            and len(self.pixel_std) == 3
            and min(self.pixel_std) > 0,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid MaskedConfig ({'; '.join(failed)}): {self}")

    @classmethod
    def from_dict(cls, data: dict) -> MaskedConfig:
        check_fields(cls, data, what="MaskedConfig")
        return cls(**data)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @property
    def num_classes(self) -> int:
        """Outputs per patch of a classification target; 0 for pixels."""
        if self.target == "mean_colour":
            return 2 ** (3 * self.colour_bits)
        return self.vocab_size if self.target == "tokens" else 0


# Which patches ---------------------------------------------------------------------------------------
@dataclass
class Corruption:
    """Which patch tokens are corrupted and how; every field is (B, L).

    `corrupted` marks the tokens the loss predicts. Of these, `masked` ones become the mask token and
    `replaced` ones take the embedding of patch `source` (a flat index into the batch's B * L patch
    tokens); the rest keep their own embedding.
    """

    corrupted: torch.Tensor
    masked: torch.Tensor
    replaced: torch.Tensor
    source: torch.Tensor

    def to(self, device: torch.device) -> Corruption:
        return Corruption(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def _round(value: float) -> int:
    """Round half up: Python's round() sends 0.5 to the even neighbour, which surprises at 2.5."""
    return math.floor(value + 0.5)


def vit_corruption(
    batch: int,
    num_patches: int,
    mask_ratio: float = 0.5,
    mask_token_fraction: float = 0.8,
    random_patch_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> Corruption:
    """The ViT paper's BERT-style corruption, with exact counts in every image.

    round(mask_ratio * L) patches per image are corrupted, chosen uniformly; of these
    round(0.8 * n) take the mask token, round(0.1 * n) another patch's embedding (any other patch of
    the batch, as BERT draws a random word from its vocabulary) and the rest stay unchanged. Exact
    counts (rather than a coin per patch) keep the loss's weight the same in every step.
    """
    num_corrupted = _round(mask_ratio * num_patches)
    num_masked = _round(mask_token_fraction * num_corrupted)
    num_replaced = min(_round(random_patch_fraction * num_corrupted), num_corrupted - num_masked)
    if num_corrupted < 1:
        raise ValueError(f"mask_ratio {mask_ratio} of {num_patches} patches corrupts no patch")
    if num_replaced and batch * num_patches < 2:
        raise ValueError("replacing a patch by another needs at least two patches in the batch")
    # Rank of each patch in a random order: ranks [0, masked) take the mask token, the next
    # `num_replaced` another patch, the next ones up to `num_corrupted` are kept but predicted.
    rank = torch.rand(batch, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    masked = rank < num_masked
    replaced = (rank >= num_masked) & (rank < num_masked + num_replaced)
    own = torch.arange(batch * num_patches).reshape(batch, num_patches)
    # An offset in [1, B*L) never points back at the patch itself.
    offset = torch.randint(1, max(batch * num_patches, 2), (batch, num_patches), generator=generator)
    source = torch.where(replaced, (own + offset) % (batch * num_patches), own)
    return Corruption(corrupted=rank < num_corrupted, masked=masked, replaced=replaced, source=source)


def blockwise_mask(
    batch: int,
    grid: tuple[int, int],
    num_masked: int,
    min_block_patches: int = 16,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BeiT's blockwise masking (Algorithm 1, and its MaskingGenerator): (B, h*w) bool.

    Rectangles of s patches (s uniform in [min_block_patches, patches still to mask]) with an aspect
    ratio log-uniform in [min_aspect, 1/min_aspect] are added at random positions until `num_masked`
    patches are masked. A rectangle is accepted only when it adds at least one and at most the
    remaining number of patches, so no image has more than `num_masked`; as in BeiT, an image whose
    10 draws in a row all fail stops a little short.
    """
    height, width = grid
    if not 1 <= num_masked <= height * width:
        raise ValueError(f"blockwise_mask: num_masked={num_masked} outside 1..{height * width} patches")
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def randint(low: int, high: int) -> int:  # inclusive, like random.randint
        return int(torch.randint(low, high + 1, (), generator=generator))

    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    for mask in masks:
        count = 0
        while count < num_masked:
            remaining = num_masked - count
            added = 0
            for _ in range(10):
                area = uniform(min_block_patches, remaining)
                aspect = math.exp(uniform(*log_aspect))
                block_h = round(math.sqrt(area * aspect))
                block_w = round(math.sqrt(area / aspect))
                if not (block_w < width and block_h < height):
                    continue
                top, left = randint(0, height - block_h), randint(0, width - block_w)
                block = mask[top : top + block_h, left : left + block_w]
                new = block_h * block_w - int(block.sum())
                if 0 < new <= remaining:
                    block.fill_(True)
                    added = new
                    break
            if added == 0:
                break
            count += added
    return masks.flatten(1)


def blockwise_corruption(
    batch: int, grid: tuple[int, int], mask_ratio: float = 0.4, generator: torch.Generator | None = None, **kw
) -> Corruption:
    """BeiT's corruption: every patch of a blockwise mask takes the mask token."""
    mask = blockwise_mask(batch, grid, _round(mask_ratio * grid[0] * grid[1]), generator=generator, **kw)
    own = torch.arange(mask.numel()).reshape(mask.shape)
    return Corruption(corrupted=mask, masked=mask, replaced=torch.zeros_like(mask), source=own)


# How: corrupt tokens, or pixels before the stem ----------------------------------------------------------
def apply_corruption(tokens: torch.Tensor, corruption: Corruption, mask_token: torch.Tensor) -> torch.Tensor:
    """Patch tokens (B, L, D) -> corrupted tokens (B, L, D); mask_token is (1, 1, D)."""
    batch, length, dim = tokens.shape
    if corruption.corrupted.shape != (batch, length):
        raise ValueError(
            f"corruption of shape {tuple(corruption.corrupted.shape)} does not fit tokens {tuple(tokens.shape)}"
        )
    others = tokens.reshape(batch * length, dim)[corruption.source]  # (B, L, D)
    tokens = torch.where(corruption.replaced[..., None], others, tokens)
    return torch.where(corruption.masked[..., None], mask_token.to(tokens.dtype), tokens)


def mask_pixels(images: torch.Tensor, mask: torch.Tensor, patch_size: int, fill: float = 0.0) -> torch.Tensor:
    """Set the pixels of masked patches to `fill`: (B, C, H, W) and (B, h*w) bool -> (B, C, H, W)."""
    batch, _, height, width = images.shape
    grid = (height // patch_size, width // patch_size)
    pixel_mask = (
        mask.reshape(batch, 1, *grid).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    )
    return images.masked_fill(pixel_mask, fill)


# What to predict ------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, P*P*C), each patch's pixels row by row, channels last (as MAE)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {(height, width)} is not divisible by the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: (B, h*w, P*P*C) -> (B, C, h*P, w*P)."""
    batch, _, features = patches.shape
    channels = features // (patch_size * patch_size)
    x = patches.reshape(batch, grid[0], grid[1], patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid[0] * patch_size, grid[1] * patch_size)


def mean_colour_targets(
    images: torch.Tensor,
    patch_size: int,
    bits: int = 3,
    pixel_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    pixel_std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Each patch's mean colour, quantised to `bits` per channel: (B, C, H, W) -> (B, h*w) long.

    Pixels are first mapped back to [0, 1]; channel mean m becomes level min(floor(m * 2^bits),
    2^bits - 1), and the class is r * 2^(2 bits) + g * 2^bits + b: 512 classes for 3 bits.
    """
    mean = images.new_tensor(pixel_mean).view(1, -1, 1, 1)
    std = images.new_tensor(pixel_std).view(1, -1, 1, 1)
    colours = F.avg_pool2d((images.float() * std + mean).clamp(0, 1), patch_size)  # (B, C, h, w)
    levels = (colours * 2**bits).floor().clamp(max=2**bits - 1).long()
    weights = torch.tensor([2 ** (bits * (2 - c)) for c in range(3)], device=images.device)
    return (levels * weights.view(1, 3, 1, 1)).sum(1).flatten(1)


def normalized_pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels normalised by their own mean and variance: (B, h*w, P*P*C), as MAE."""
    patches = patchify(images.float(), patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def tokenizer_targets(
    tokenizer: nn.Module, images: torch.Tensor, num_patches: int, vocab_size: int
) -> torch.Tensor:
    """Run the user's tokenizer: images (B, C, H, W) -> token ids (B, h*w), checked.

    The tokenizer may return ids shaped (B, h*w) or (B, h, w), or logits (B, h*w, V) / (B, V, h, w),
    whose argmax is taken; it must give one id per patch, on the model's grid.
    """
    with torch.no_grad():
        out = tokenizer(images)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the tokenizer returned {type(out).__name__}; expected a tensor of token ids")
    batch = images.shape[0]
    if out.is_floating_point():
        if out.ndim == 4:  # (B, V, h, w)
            out = out.flatten(2).transpose(1, 2)
        out = out.argmax(dim=-1)
    ids = out.reshape(batch, -1).long()
    if ids.shape[1] != num_patches:
        raise ValueError(
            f"the tokenizer gave {ids.shape[1]} tokens per image (output {tuple(out.shape)}), but the model "
            f"has {num_patches} patches: it must tokenize on the model's patch grid"
        )
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(
            f"the tokenizer gave ids in [{int(ids.min())}, {int(ids.max())}], outside vocab_size={vocab_size}"
        )
    return ids


# The model ----------------------------------------------------------------------------------------------
class MaskedPatchModel(nn.Module):
    """An encoder, a learnable [mask] embedding and a linear head per patch token.

    `forward(images)` returns (loss, metrics): the loss over corrupted patches only. The encoder is a
    plain VisionTransformer (its classifier head unused), saved on its own for fine-tuning.
    """

    def __init__(self, encoder: VisionTransformer, config: MaskedConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        if encoder.config.stem in ("hybrid", "conv", "cnn"):
            raise ValueError(
                "masked-patch pre-training needs a stem without mixing between patches ('patch' or 'hmlp'): "
                f"the {encoder.config.stem} stem's convolutions let a masked patch's neighbours see its pixels"
            )
        if (config.target == "tokens") != (tokenizer is not None):
            raise ValueError(
                f"target {config.target!r} "
                + ("needs a tokenizer module" if tokenizer is None else "does not take a tokenizer")
            )
        self.encoder = encoder
        self.config = config
        dim = encoder.config.embed_dim
        # BeiT's init for the mask embedding and the prediction head: truncated normal, std 0.02.
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
        stride = encoder.config.stride
        outputs = config.num_classes or stride * stride * encoder.config.in_chans
        self.head = nn.Linear(dim, outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> MaskedPatchModel:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # a fixed target: its dropout or batch norm must not change
        return self

    def corrupt(
        self, batch: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> Corruption:
        cfg = self.config
        if cfg.masking == "vit":
            return vit_corruption(
                batch,
                grid[0] * grid[1],
                cfg.mask_ratio,
                cfg.mask_token_fraction,
                cfg.random_patch_fraction,
                generator,
            )
        return blockwise_corruption(
            batch,
            grid,
            cfg.mask_ratio,
            generator,
            min_block_patches=cfg.min_block_patches,
            min_aspect=cfg.min_block_aspect,
        )

    def targets(self, images: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, L) class ids or (B, L, P*P*C) pixels for every patch."""
        cfg, stride = self.config, self.encoder.config.stride
        if cfg.target == "mean_colour":
            return mean_colour_targets(images, stride, cfg.colour_bits, cfg.pixel_mean, cfg.pixel_std)
        if cfg.target == "pixels":
            return normalized_pixel_targets(images, stride)
        return tokenizer_targets(self.tokenizer, images, num_patches, cfg.vocab_size)

    def forward_encoder(self, images: torch.Tensor, corruption: Corruption) -> torch.Tensor:
        """Images (B, C, H, W) -> output patch tokens (B, L, D), corrupted after the stem."""
        encoder = self.encoder
        tokens, grid = encoder.embed_patches(images)  # (B, L, D)
        tokens = apply_corruption(tokens, corruption.to(tokens.device), self.mask_token)
        x = encoder.forward_blocks(encoder.add_tokens(tokens, grid), grid)
        return encoder.norm(x)[:, encoder.config.num_prefix_tokens :]

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on corrupted patches and metrics: loss, accuracy (class targets), corrupted fraction."""
        stride = self.encoder.config.stride
        grid = (images.shape[-2] // stride, images.shape[-1] // stride)
        corruption = self.corrupt(images.shape[0], grid, generator)
        tokens = self.forward_encoder(images, corruption)
        corrupted = corruption.corrupted.to(images.device)
        predictions = self.head(tokens[corrupted])  # (N, outputs)
        targets = self.targets(images, grid[0] * grid[1])[corrupted]
        metrics = {"corrupted_fraction": corrupted.float().mean().item()}
        if self.config.target == "pixels":
            loss = F.mse_loss(predictions.float(), targets)
        else:
            loss = F.cross_entropy(predictions.float(), targets)
            metrics["accuracy"] = (predictions.argmax(-1) == targets).float().mean().item()
        metrics["loss"] = loss.item()
        return loss, metrics
