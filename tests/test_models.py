"""The VisionTransformer: shapes for every option, gradients, determinism, blocks and stems."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.resnet import pad_same
from vitkit.models.stems import HMLPStem
from vitkit.models.vit import Block, ParallelBlock, VisionTransformer
from vitkit.registry import get_config

HEAD_OPTIONS = list(itertools.product(["token", "gap", "gap_fc_norm", "map"], [True, False], [None, 16]))
TOKEN_OPTIONS = list(itertools.product(["learn", "sincos2d", "none"], [True, False], ["patch", "hmlp"]))


@pytest.mark.parametrize("pool,class_token,representation_size", HEAD_OPTIONS)
@pytest.mark.parametrize("pos_embed,class_slot,stem", TOKEN_OPTIONS)
def test_output_shapes_for_every_option(pool, class_token, representation_size, pos_embed, class_slot, stem):
    if pool == "token" and not class_token:
        with pytest.raises(ValueError, match="class_token"):
            tiny_config(pool=pool, class_token=class_token)
        return
    config = tiny_config(
        pool=pool,
        class_token=class_token,
        representation_size=representation_size,
        pos_embed=pos_embed,
        pos_embed_class_slot=class_slot,
        stem=stem,
        patch_size=16 if stem == "hmlp" else 8,
    )
    model = VisionTransformer(config).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(images)
    assert tokens.shape == (2, config.num_tokens, 32)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, representation_size or 32)
    assert model(images).shape == (2, 5)


@pytest.mark.parametrize(
    "parallel,layer_scale_init,gelu,drop_path,dropout",
    [
        (1, None, "exact", 0.0, 0.0),
        (2, 1e-5, "tanh", 0.1, 0.1),
        (3, None, "exact", 0.2, 0.0),
        (1, 0.1, "tanh", 0.0, 0.2),
    ],
)
def test_block_options_shapes(parallel, layer_scale_init, gelu, drop_path, dropout):
    config = tiny_config(
        parallel=parallel,
        layer_scale_init=layer_scale_init,
        gelu=gelu,
        drop_path=drop_path,
        dropout=dropout,
        attn_dropout=dropout,
    )
    model = VisionTransformer(config)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_no_head_gives_features():
    model = VisionTransformer(tiny_config(num_classes=0)).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"parallel": 2, "layer_scale_init": 0.1},
        {"pool": "map"},
        {"stem": "hmlp", "patch_size": 16, "pool": "gap_fc_norm"},
        {"representation_size": 8},
        {"stem": "hybrid", "hybrid_layers": (1, 1), "patch_size": 1},
    ],
)
def test_every_parameter_receives_a_gradient(overrides):
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(**overrides))
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):  # BiT zero-inits each unit's last norm: no grad at init
            torch.nn.init.ones_(module.weight)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_zero_head_is_zero_initialised():
    model = VisionTransformer(tiny_config(zero_head=True))
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model(torch.randn(1, 3, 32, 32))) == 0


def test_eval_is_deterministic_and_train_mode_uses_dropout():
    model = VisionTransformer(tiny_config(dropout=0.5, drop_path=0.5))
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    assert not torch.equal(model(images), model(images))


def test_attention_matches_explicit_softmax_and_intermediates_match_forward():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    images = torch.randn(2, 3, 32, 32)
    out = model.forward_intermediates(images, attention=True)
    assert len(out["blocks"]) == 2 and len(out["attention"]) == 2
    torch.testing.assert_close(out["logits"], model(images))
    torch.testing.assert_close(model.norm(out["blocks"][-1]), model.forward_features(images))
    weights = out["attention"][0]
    assert weights.shape == (2, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))
    # The SDPA path equals softmax(q k^T / sqrt(d)) v computed by hand.
    block = model.blocks[0]
    x = model.add_tokens(*model.embed_patches(images))
    _, _, v = block.attn.split_heads(block.norm1(x))
    manual = block.attn.proj((weights @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(block.attn(block.norm1(x)), manual, rtol=1e-5, atol=1e-6)


def test_parallel_block_with_one_branch_equals_block():
    config = tiny_config(layer_scale_init=0.5)
    block, parallel = Block(config).eval(), ParallelBlock(config.replace(parallel=1)).eval()
    mapping = {
        "norm1": "attns.0.norm",
        "attn": "attns.0.attn",
        "ls1": "attns.0.ls",
        "norm2": "ffns.0.norm",
        "mlp": "ffns.0.mlp",
        "ls2": "ffns.0.ls",
    }
    state = {}
    for key, value in block.state_dict().items():
        head, rest = key.split(".", 1)
        state[f"{mapping[head]}.{rest}"] = value
    parallel.load_state_dict(state)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(parallel(x), block(x))


def test_parallel_block_sums_branches():
    config = tiny_config(parallel=2)
    block = ParallelBlock(config).eval()
    x = torch.randn(2, 17, 32)
    after_attention = x + block.attns[0](x) + block.attns[1](x)
    expected = after_attention + block.ffns[0](after_attention) + block.ffns[1](after_attention)
    torch.testing.assert_close(block(x), expected)


def test_timm_key_names():
    """A timm state dict of a standard ViT (names from timm's VisionTransformer) loads unchanged."""
    model = VisionTransformer(tiny_config(depth=1, layer_scale_init=1e-5))
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }
    for part in (
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    ):
        expected.add(f"blocks.0.{part}")
    assert set(model.state_dict()) == expected
    timm_like = {key: torch.randn_like(value) for key, value in model.state_dict().items()}
    model.load_state_dict(timm_like, strict=True)


def test_any_resolution_resamples_position_embeddings():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config()).eval()
    images = torch.randn(1, 3, 48, 64)  # a non-square 6 x 8 grid from the 4 x 4 of the config
    logits = model(images)
    resized = VisionTransformer(tiny_config(img_size=(48, 64))).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (6, 8), (4, 4), 1, "bicubic")
    resized.load_state_dict(state)
    torch.testing.assert_close(resized(images), logits)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 30, 32))


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config())
    images = torch.randn(2, 3, 32, 32)
    model(images).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(images).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_hmlp_stem_has_no_mixing_between_patches():
    torch.manual_seed(0)
    stem = HMLPStem(3, 32).eval()
    images = torch.randn(1, 3, 48, 48)
    changed = images.clone()
    changed[:, :, 16:32, 32:48] += torch.randn(3, 16, 16)  # patch (row 1, column 2)
    before, after = stem(images), stem(changed)
    differs = (before - after).abs().sum(-1)[0] > 0
    assert differs.tolist() == [i == 1 * 3 + 2 for i in range(9)]


@pytest.mark.parametrize("patch", [4, 8])
def test_hmlp_stem_at_small_patches_keeps_each_patch_apart(patch):
    """(P/4)x(P/4), 2x2, 2x2: a 4-px patch starts with a per-pixel projection, and still no patch sees another."""
    torch.manual_seed(0)
    stem = HMLPStem(3, 32, patch_size=patch).eval()
    assert [m.kernel_size for m in stem.proj if isinstance(m, torch.nn.Conv2d)] == [
        (patch // 4,) * 2,
        (2, 2),
        (2, 2),
    ]
    images = torch.randn(1, 3, 3 * patch, 3 * patch)
    changed = images.clone()
    changed[:, :, patch : 2 * patch, 0:patch] += torch.randn(3, patch, patch)  # patch (row 1, column 0)
    differs = (stem(images) - stem(changed)).abs().sum(-1)[0] > 0
    assert differs.tolist() == [i == 3 for i in range(9)]


@pytest.mark.parametrize("patch", [2, 6])
def test_hmlp_stem_refuses_a_patch_not_a_multiple_of_4(patch):
    with pytest.raises(ValueError, match="multiple of 4"):
        get_config("vit_tiny_patch16_224", stem="hmlp", patch_size=patch, img_size=48)


def test_pad_same_matches_tensorflow_rule():
    # 224 px, 7x7 stride 2: TF pads 2 before and 3 after; 3x3 stride 1: 1 on each side.
    x = torch.ones(1, 1, 224, 224)
    assert pad_same(x, 7, 2).shape[-2:] == (229, 229)
    assert pad_same(x, 7, 2)[0, 0, :, 100].tolist()[:3] == [0, 0, 1]
    assert pad_same(x, 7, 2)[0, 0, 100, -4:].tolist() == [1, 0, 0, 0]
    assert pad_same(x, 3, 1).shape[-2:] == (226, 226)
    y = torch.randn(1, 2, 9, 9)
    assert F.max_pool2d(pad_same(y, 3, 2, float("-inf")), 3, 2).shape[-2:] == (5, 5)


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2), (7, 2), (4, 3)])
def test_pad_same_totals_follow_tensorflow_for_every_size(kernel, stride):
    """TensorFlow's total, (ceil(in / stride) - 1) * stride + kernel - in (at least 0), the extra pixel
    after, for every size from 1 to 40, each side on its own."""
    for size in range(1, 41):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        x = torch.ones(1, 1, size, size + 1)
        padded = pad_same(x, kernel, stride)
        total_w = max((-(-(size + 1) // stride) - 1) * stride + kernel - size - 1, 0)
        assert padded.shape[-2:] == (size + total, size + 1 + total_w), (size, kernel, stride)
        rows = padded[0, 0, :, (total_w // 2)].tolist()
        assert rows.index(1.0) == total // 2, (size, kernel, stride)  # the smaller half before


def test_hybrid_stem_uses_official_stage_depths():
    from vitkit.registry import get_config

    assert get_config("vit_base_r50_s16_384").hybrid_layers == (3, 4, 9)
    assert get_config("vit_large_r50_s32_384").hybrid_layers == (3, 4, 6, 3)
    with torch.device("meta"):
        model = VisionTransformer(get_config("vit_base_r50_s16_224"))
    stages = model.patch_embed.backbone.stages
    assert [len(stage.blocks) for stage in stages] == [3, 4, 9]
    assert model.patch_embed.proj.in_channels == 1024
    hybrid = VisionTransformer(
        tiny_config(stem="hybrid", hybrid_layers=(1, 1), patch_size=1, img_size=64)
    ).eval()
    assert hybrid.config.grid_size == (8, 8)
    assert hybrid.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 32)
