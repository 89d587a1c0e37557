"""How published tables count a ViT's compute: four conventions, each computed analytically from the config.

One model, one resolution, four numbers, because the tables disagree on what an "operation" is:

| convention  | ViT-B/16 at 384     | where it is published                                        |
|-------------|---------------------|--------------------------------------------------------------|
| `vitkit`    | 55.54 GMACs         | `vitkit info` (MACs; its FLOPs are 2 per MAC plus norm ops)  |
| `fvcore`    | 55.54 G "FLOPs"     | mmpretrain 1.x metafiles, timm's results tables              |
| `mmcls-0.x` | 33.03 G "FLOPs"     | the MMClassification 0.x ViT page                            |
| `torch`     | 110.97 GFLOPs       | `torch.utils.flop_counter.FlopCounterMode`                   |

`operations(config)` lists every counted operation of one image's forward pass (dense layers,
convolutions, the two attention products, norms, weight standardisation), each with its size and
where it sits; a convention is a function that says what one operation is worth to it. The
`vitkit` convention equals the module-hook count of `analysis.flops.count` for every registered
name, which tests hold, so the inventory is the model's own. Parameters are the same in every
convention (all of the model's parameters: position embeddings at the model's resolution and the
classifier included); `num_params` gives them from the config alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from ..models.config import ViTConfig
from ..models.stems import conv_stem_channels

OpKind = Literal["matmul", "conv", "attention_product", "norm", "weight_standardisation"]
Stage = Literal["features", "pre_logits", "classifier"]


@dataclass(frozen=True)
class Op:
    """One operation of the forward pass of one image.

    `size` is multiply-accumulates for matmuls, convolutions and attention products, and elements for
    norms and weight standardisation. `bias` is the number of outputs a bias is added to.
    """

    component: str  # as `analysis.flops.component_of`: stem, attention, mlp, norms, head
    kind: OpKind
    size: int
    bias: int = 0
    in_self_attention: bool = False  # qkv, the two products and the output projection of a block
    stage: Stage = "features"  # features: up to the pooled representation


def _conv(component: str, positions: int, in_chans: int, out_chans: int, kernel: int, bias: bool) -> Op:
    return Op(
        component,
        "conv",
        positions * out_chans * in_chans * kernel * kernel,
        positions * out_chans if bias else 0,
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _resnet_ops(config: ViTConfig, height: int, width: int) -> tuple[list[Op], int, int, int]:
    """The BiT ResNetV2 trunk (`models/resnet.py`): weight-standardised convolutions without bias,
    GroupNorm after each, SAME padding. Returns its operations and its output (channels, h, w)."""
    ops: list[Op] = []

    def std_conv(h: int, w: int, in_chans: int, out_chans: int, kernel: int) -> None:
        ops.append(_conv("stem", h * w, in_chans, out_chans, kernel, bias=False))
        ops.append(Op("stem", "weight_standardisation", out_chans * in_chans * kernel * kernel))

    def group_norm(h: int, w: int, chans: int) -> None:
        ops.append(Op("stem", "norm", h * w * chans))

    h, w = _ceil_div(height, 2), _ceil_div(width, 2)  # 7x7 / 2 root convolution
    std_conv(h, w, config.in_chans, 64, 7)
    group_norm(h, w, 64)
    h, w, chans = _ceil_div(h, 2), _ceil_div(w, 2), 64  # 3x3 / 2 max-pool
    for index, units in enumerate(config.hybrid_layers):
        out_chans, mid = 256 * 2**index, 64 * 2**index
        for unit in range(units):
            stride = 2 if index > 0 and unit == 0 else 1
            out_h, out_w = _ceil_div(h, stride), _ceil_div(w, stride)
            if stride != 1 or chans != out_chans:  # projection shortcut
                std_conv(out_h, out_w, chans, out_chans, 1)
                group_norm(out_h, out_w, out_chans)
            std_conv(h, w, chans, mid, 1)
            group_norm(h, w, mid)
            std_conv(out_h, out_w, mid, mid, 3)
            group_norm(out_h, out_w, mid)
            std_conv(out_h, out_w, mid, out_chans, 1)
            group_norm(out_h, out_w, out_chans)
            h, w, chans = out_h, out_w, out_chans
    return ops, chans, h, w


def _stem_ops(config: ViTConfig) -> list[Op]:
    """Image -> tokens: the patch projection, the hierarchical MLP stem or the hybrid's trunk."""
    height, width = config.img_size
    grid_h, grid_w = config.grid_size
    d, patch = config.embed_dim, config.patch_size
    if config.stem == "patch":
        return [_conv("stem", grid_h * grid_w, config.in_chans, d, patch, bias=True)]
    if config.stem == "hmlp":  # (P/4)^2, 2x2, 2x2 projections, each followed by a per-pixel LayerNorm
        hidden, ops, first = d // 4, [], patch // 4
        for h, w, in_chans, out_chans, kernel in (
            (height // first, width // first, config.in_chans, hidden, first),
            (height // first // 2, width // first // 2, hidden, hidden, 2),
            (grid_h, grid_w, hidden, d, 2),
        ):
            ops.append(_conv("stem", h * w, in_chans, out_chans, kernel, bias=True))
            ops.append(Op("stem", "norm", h * w * out_chans))
        return ops
    if config.stem == "conv":  # stride-2 3x3 conv-BN-ReLU layers (no conv bias), then a 1x1 projection
        ops, h, w, in_chans = [], height, width, config.in_chans
        for out_chans in conv_stem_channels(patch, d):
            h, w = (h + 1) // 2, (w + 1) // 2
            ops.append(_conv("stem", h * w, in_chans, out_chans, 3, bias=False))
            ops.append(Op("stem", "norm", h * w * out_chans))
            in_chans = out_chans
        return ops + [_conv("stem", grid_h * grid_w, in_chans, d, 1, bias=True)]
    if config.stem == "cnn":
        return _cnn_ops(config)
    ops, chans, h, w = _resnet_ops(config, height, width)
    return ops + [_conv("stem", grid_h * grid_w, chans, d, patch, bias=True)]


def _cnn_ops(config: ViTConfig) -> list[Op]:
    """The "cnn" stem: a full-resolution 3x3 conv-BN, then per group a 3x3 conv, a 2x2 max-pool (not
    counted, as no convention counts pooling), BN, a 3x3 conv-BN at the halved size; a 1x1 projection."""
    (h, w), channels = config.img_size, config.stem_channels
    ops = [
        _conv("stem", h * w, config.in_chans, channels[0], 3, bias=False),
        Op("stem", "norm", h * w * channels[0]),
    ]
    for in_chans, out_chans in pairwise(channels):
        conv_at_full = _conv("stem", h * w, in_chans, out_chans, 3, bias=False)
        h, w = h // 2, w // 2
        ops += [conv_at_full, Op("stem", "norm", h * w * out_chans)]
        ops += [
            _conv("stem", h * w, out_chans, out_chans, 3, bias=False),
            Op("stem", "norm", h * w * out_chans),
        ]
    if channels[-1] != config.embed_dim:
        ops.append(_conv("stem", h * w, channels[-1], config.embed_dim, 1, bias=True))
    return ops


def _attention_ops(length: int, d: int, qkv_bias: bool) -> list[Op]:
    """A block's multi-head self-attention over `length` tokens: all heads together."""
    return [
        Op("attention", "matmul", length * d * 3 * d, length * 3 * d if qkv_bias else 0, True),
        Op("attention", "attention_product", length * length * d, 0, True),  # q k^T
        Op("attention", "attention_product", length * length * d, 0, True),  # softmax(.) v
        Op("attention", "matmul", length * d * d, length * d, True),  # output projection
    ]


def _mlp_ops(rows: int, d: int, mlp: int, component: str = "mlp") -> list[Op]:
    return [
        Op(component, "matmul", rows * d * mlp, rows * mlp),
        Op(component, "matmul", rows * mlp * d, rows * d),
    ]


def operations(config: ViTConfig, img_size: int | tuple[int, int] | None = None) -> list[Op]:
    """Every counted operation of one image's forward pass at `img_size` (default: the config's).

    Follows `models/vit.py` module by module; elementwise work (biases of norms, activations,
    softmax, residual sums, LayerScale, position embeddings) is not listed, as no convention counts it.
    """
    if img_size is not None:
        config = config.replace(img_size=img_size)  # validates the size against the stem's stride
    d, mlp, length = config.embed_dim, config.mlp_dim, config.num_tokens
    ops = _stem_ops(config)
    for _ in range(config.depth):
        for _ in range(config.parallel):  # a parallel block sums `parallel` attention branches
            ops.append(Op("norms", "norm", length * d))
            ops += _attention_ops(length, d, config.qkv_bias)
        for _ in range(config.parallel):  # ... then `parallel` MLP branches
            ops.append(Op("norms", "norm", length * d))
            ops += _mlp_ops(length, d, mlp)
    if config.pool != "gap_fc_norm":
        ops.append(Op("norms", "norm", length * d))  # the final norm, over every token
    if config.pool == "map":  # one learned query attends to every token, then an MLP on the result
        ops += [
            Op("head", "matmul", d * d, d),  # the latent query
            Op("head", "matmul", length * d * 2 * d, length * 2 * d),  # keys and values
            Op("head", "attention_product", length * d),
            Op("head", "attention_product", length * d),
            Op("head", "matmul", d * d, d),
            Op("norms", "norm", d),
            *_mlp_ops(1, d, mlp, component="head"),
        ]
    elif config.pool == "gap_fc_norm":
        ops.append(Op("norms", "norm", d))  # the norm after the mean
    head_in = d
    if config.representation_size:
        ops.append(
            Op(
                "head",
                "matmul",
                d * config.representation_size,
                config.representation_size,
                stage="pre_logits",
            )
        )
        head_in = config.representation_size
    if config.num_classes > 0:
        ops.append(Op("head", "matmul", head_in * config.num_classes, config.num_classes, stage="classifier"))
    return ops


def num_params(config: ViTConfig) -> int:
    """All of the model's parameters, from the config alone (`VisionTransformer(config).num_params()`):
    the figure every convention prints, position embeddings at the config's resolution included."""
    d, mlp = config.embed_dim, config.mlp_dim
    if config.stem == "patch":
        total = config.in_chans * config.patch_size**2 * d + d
    elif config.stem == "conv":
        total, in_chans = 0, config.in_chans
        for out_chans in conv_stem_channels(config.patch_size, d):
            total += in_chans * 9 * out_chans + 2 * out_chans  # conv, BatchNorm scale and shift
            in_chans = out_chans
        total += in_chans * d + d
    elif config.stem == "cnn":
        channels = config.stem_channels
        total = config.in_chans * 9 * channels[0] + 2 * channels[0]
        for in_chans, out_chans in pairwise(channels):
            total += in_chans * 9 * out_chans + out_chans * 9 * out_chans + 4 * out_chans
        total += channels[-1] * d + d if channels[-1] != d else 0
    elif config.stem == "hmlp":
        hidden = d // 4
        total = (
            (config.in_chans * (config.patch_size // 4) ** 2 + 1 + 2) * hidden
            + (hidden * 4 + 1 + 2) * hidden
            + (hidden * 4 + 1 + 2) * d
        )
    else:
        total = config.in_chans * 49 * 64 + 2 * 64  # root convolution and its GroupNorm
        chans = 64
        for index, units in enumerate(config.hybrid_layers):
            out_chans, mid = 256 * 2**index, 64 * 2**index
            for unit in range(units):
                if index > 0 and unit == 0 or chans != out_chans:
                    total += chans * out_chans + 2 * out_chans
                total += chans * mid + 9 * mid * mid + mid * out_chans + 2 * (2 * mid + out_chans)
                chans = out_chans
        total += chans * config.patch_size**2 * d + d
    if config.class_token:
        total += d
    total += config.num_reg_tokens * d  # register tokens (DINOv2 with registers, DINOv3)
    if config.pos_embed == "learn":
        total += (config.num_patches + (config.num_prefix_tokens if config.pos_embed_class_slot else 0)) * d
    scale = d if config.layer_scale_init else 0
    attention = 2 * d + 3 * d * d + (3 * d if config.qkv_bias else 0) + d * d + d + scale
    mlp_branch = 2 * d + 2 * d * mlp + mlp + d + scale
    total += config.depth * config.parallel * (attention + mlp_branch)
    total += 2 * d  # the final norm, or the norm after the mean
    if config.pool == "map":
        total += d + 4 * d * d + 4 * d + 2 * d + 2 * d * mlp + mlp + d
    head_in = d
    if config.representation_size:
        total += d * config.representation_size + config.representation_size
        head_in = config.representation_size
    if config.num_classes > 0:
        total += head_in * config.num_classes + config.num_classes
    return total


# The conventions: what one operation is worth ---------------------------------------------------
NORM_OPS_PER_ELEMENT = 5  # mean, subtract, variance, divide, affine: fvcore's estimate for an affine norm
STANDARDISATION_OPS_PER_ELEMENT = 4  # fvcore's estimate for a norm without affine (a batch_norm call)
MMCV_NORM_OPS_PER_ELEMENT = 2  # mmcv 1.x: one per element, doubled for an affine norm


def vitkit_macs(op: Op) -> int:
    """vitkit's MACs: multiply-accumulates of every dense layer, convolution and attention product,
    the classifier head included, plus 5 per element of each affine norm (fvcore's estimate).

    Biases, activations, softmax, residual sums and the BiT trunk's weight standardisation are not
    counted. `vitkit info` also gives FLOPs: 2 per multiply-accumulate plus the same norm ops.
    Differs from `fvcore` only by the pre-logits and classifier layers (B/16: 0.77 M of 55.54 G at 384)
    and, for hybrids, by the weight standardisation.
    """
    if op.kind == "norm":
        return NORM_OPS_PER_ELEMENT * op.size
    return 0 if op.kind == "weight_standardisation" else op.size


def fvcore(op: Op) -> int:
    """fvcore's FlopCountAnalysis (and mmengine's port of it, which mmpretrain 1.x uses), as printed
    in mmpretrain 1.x metafiles and, head aside, timm's results tables. Their "FLOPs" are MACs.

    Counts multiply-accumulates of every aten linear / matmul / convolution without biases, so
    every dense layer and both attention products (the figures were measured on attention written
    as two matmuls; fvcore has no formula for a fused scaled_dot_product_attention call), plus 5
    per element of each affine norm and 4 per element of a norm without affine: the BiT trunk's
    weight standardisation, which timm computes with F.batch_norm on each kernel. Activations,
    softmax, pooling and elementwise sums are skipped. mmpretrain's get_flops counts
    `extract_feat`, so the pre-logits layer and the classifier are left out
    (ViT-B/16 at 384: 55,538,974,464); timm's tables run the whole model and add them (D x classes:
    768,000 for B/16, below the second decimal of their G figures). timm's model cards on the
    Hugging Face hub were counted the same way but with fused attention, which fvcore skips: they
    are the whole model's figure less both attention products (`hub_card_macs`; ViT-L/16 at 384:
    174.8 G, R50+ViT-B/16 at 384: 61.3 G, which also holds the weight standardisation to 4 per
    kernel element: without it 61.2).
    """
    if op.stage != "features":
        return 0
    if op.kind == "norm":
        return NORM_OPS_PER_ELEMENT * op.size
    if op.kind == "weight_standardisation":
        return STANDARDISATION_OPS_PER_ELEMENT * op.size
    return op.size


def mmcls_0x(op: Op) -> int:
    """MMClassification 0.x's ViT page: mmcv 1.3's get_model_complexity_info on the 2021 ViT, whose
    "FLOPs" are MACs.

    mmcv hooks modules by exact type (nn.Conv2d, nn.Linear, nn.LayerNorm, ...). That ViT ran
    self-attention in nn.MultiheadAttention: q, k, v are a bare parameter, the output projection
    is a subclass of nn.Linear (so not hooked) and both products are functional, so nothing of
    self-attention is counted. What is: each block's MLP (no bias), the patch embedding
    convolution with its bias, and 2 per element of each LayerNorm. get_flops replaces forward by
    `extract_feat`, so the head is not counted. Hence ViT-B/16 at 384 is 33.03 G there against
    55.54 G by fvcore; from v0.20 the page also labels the 384-px figures of the ImageNet-21k
    models "224x224". For the hierarchical MLP stem its convolutions (with bias) and per-pixel
    norms are counted the same way; hybrids and attention pooling had no 0.x model and are refused.
    """
    if op.stage != "features" or op.in_self_attention:
        return 0
    if op.kind == "norm":
        return MMCV_NORM_OPS_PER_ELEMENT * op.size
    if op.kind == "conv":
        return op.size + op.bias
    return op.size if op.kind == "matmul" else 0


def torch_flops(op: Op) -> int:
    """torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-accumulate of every matrix
    product (addmm, mm, bmm, convolution) and of scaled_dot_product_attention's two products,
    the head included; biases, norms, activations and softmax are not counted.

    These are true FLOPs, twice the tables' MACs less their norm estimate (ViT-B/16 at 384:
    110.97 G). On CUDA and on the meta device (where SDPA runs as two bmm) attention is counted;
    torch 2.13 has no formula for the CPU kernel `_scaled_dot_product_flash_attention_for_cpu`,
    so a run on CPU tensors reports the attention products as 0.
    """
    if op.kind in ("norm", "weight_standardisation"):
        return 0
    return 2 * op.size


def hub_card_macs(config: ViTConfig, img_size: int | tuple[int, int] | None = None) -> int:
    """The "GMACs" of timm's Hugging Face model cards: fvcore's count of the whole model (pre-logits
    and classifier included) with attention run by a fused kernel that fvcore has no formula for."""
    return sum(
        op.size if op.stage != "features" else fvcore(op)
        for op in operations(config, img_size)
        if op.kind != "attention_product"
    )


@dataclass(frozen=True)
class Convention:
    name: str
    count_op: Callable[[Op], int]
    unit: str  # what one counted operation is: "MACs" or "FLOPs"
    published_as: str
    summary: str  # one line: what is counted

    @property
    def description(self) -> str:
        return (self.count_op.__doc__ or "").strip()


CONVENTIONS: dict[str, Convention] = {
    "vitkit": Convention(
        "vitkit",
        vitkit_macs,
        "MACs",
        "vitkit info",
        "every dense layer, convolution and attention product, the head included, + 5 per norm element",
    ),
    "fvcore": Convention(
        "fvcore",
        fvcore,
        "MACs",
        "'FLOPs' of mmpretrain 1.x metafiles and timm's tables",
        "every dense layer, convolution and attention product, no head, + 5 per norm element",
    ),
    "mmcls-0.x": Convention(
        "mmcls-0.x",
        mmcls_0x,
        "MACs",
        "'FLOPs' of the MMClassification 0.x ViT page",
        "MLP layers and patch embedding (with bias) + 2 per LayerNorm element; no attention, no head",
    ),
    "torch": Convention(
        "torch",
        torch_flops,
        "FLOPs",
        "torch.utils.flop_counter.FlopCounterMode",
        "2 per multiply-accumulate of every matrix product incl. attention, the head included; no norms",
    ),
}


def get_convention(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown counting convention {name!r}: expected one of {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def undefined_for(convention: str, config: ViTConfig) -> str | None:
    """Why `convention` has no figure for `config`, or None when it has one."""
    if convention != "mmcls-0.x":
        return None
    if config.stem in ("hybrid", "conv", "cnn"):
        return f"{config.stem} stems (MMClassification 0.x had no such ViT stem to take the counted module types from)"
    if config.pool == "map":
        return (
            "attention pooling (MMClassification 0.x had no MAP head to take the counted module types from)"
        )
    return None


@dataclass(frozen=True)
class ConventionCount:
    convention: str
    unit: str
    total: int
    img_size: tuple[int, int]
    by_component: dict[str, int]


def count_in(
    convention: str, config: ViTConfig, img_size: int | tuple[int, int] | None = None
) -> ConventionCount:
    """The compute of one image at `img_size` as `convention` counts it; ValueError where undefined."""
    rule = get_convention(convention)
    why = undefined_for(convention, config)
    if why is not None:
        raise ValueError(f"counting convention {convention!r} is undefined for {why}")
    if img_size is not None:
        config = config.replace(img_size=img_size)
    by_component: dict[str, int] = defaultdict(int)
    for op in operations(config):
        by_component[op.component] += rule.count_op(op)
    return ConventionCount(
        convention, rule.unit, sum(by_component.values()), config.img_size, dict(by_component)
    )
