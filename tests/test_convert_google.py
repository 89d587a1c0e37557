"""vit_jax and big_vision .npz: random Flax-named parameters, a Flax-semantics reference forward written
here from the two papers' code, and vitkit's converted model must agree; converting back is bitwise."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from helpers import tiny_config
from vitkit.convert import read_checkpoint, write_layout
from vitkit.models.vit import VisionTransformer

WIDTH, HEADS, MLP, PATCH, CLASSES, DEPTH, IMG = 32, 4, 64, 8, 5, 2, 32
GRID = IMG // PATCH


def flax_params(style: str, pool: str = "token", representation: int | None = None, seed: int = 0) -> dict:
    """Random parameters named and shaped as vit_jax ("vit_jax") or big_vision ("big_vision") stores them."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    prefix = "params/" if style == "big_vision" else ""
    attn, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    if style == "vit_jax":
        attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    p = {
        f"{prefix}embedding/kernel": normal(PATCH, PATCH, 3, WIDTH, scale=0.05),
        f"{prefix}embedding/bias": normal(WIDTH),
    }
    class_token = pool in ("token", "tok")
    if class_token:
        p[f"{prefix}cls"] = normal(1, 1, WIDTH)
    if style == "vit_jax":
        p["Transformer/posembed_input/pos_embedding"] = normal(1, GRID * GRID + class_token, WIDTH)
    else:
        p["params/pos_embedding"] = normal(1, GRID * GRID, WIDTH)

    def attention(at: str) -> None:
        for name in ("query", "key", "value"):
            p[f"{at}/{name}/kernel"] = normal(WIDTH, HEADS, WIDTH // HEADS)
            p[f"{at}/{name}/bias"] = normal(HEADS, WIDTH // HEADS)
        p[f"{at}/out/kernel"] = normal(HEADS, WIDTH // HEADS, WIDTH)
        p[f"{at}/out/bias"] = normal(WIDTH)

    def layer_norm(at: str) -> None:
        p[f"{at}/scale"] = 1 + normal(WIDTH)
        p[f"{at}/bias"] = normal(WIDTH)

    def mlp_block(at: str) -> None:
        p[f"{at}/Dense_0/kernel"], p[f"{at}/Dense_0/bias"] = normal(WIDTH, MLP), normal(MLP)
        p[f"{at}/Dense_1/kernel"], p[f"{at}/Dense_1/bias"] = normal(MLP, WIDTH), normal(WIDTH)

    for i in range(DEPTH):
        block = f"{prefix}Transformer/encoderblock_{i}"
        layer_norm(f"{block}/LayerNorm_0")
        attention(f"{block}/{attn}")
        layer_norm(f"{block}/{ln2}")
        mlp_block(f"{block}/{mlp}")
    layer_norm(f"{prefix}Transformer/encoder_norm")
    if pool == "map":
        p["params/MAPHead_0/probe"] = normal(1, 1, WIDTH)
        attention("params/MAPHead_0/MultiHeadDotProductAttention_0")
        layer_norm("params/MAPHead_0/LayerNorm_0")
        mlp_block("params/MAPHead_0/MlpBlock_0")
    width = WIDTH
    if representation:
        p[f"{prefix}pre_logits/kernel"], p[f"{prefix}pre_logits/bias"] = (
            normal(WIDTH, representation),
            normal(representation),
        )
        width = representation
    p[f"{prefix}head/kernel"], p[f"{prefix}head/bias"] = normal(width, CLASSES), normal(CLASSES)
    return p


def flax_forward(p: dict, images: torch.Tensor, style: str, pool: str) -> torch.Tensor:
    """The Flax models' forward pass, straight from the parameter names (float64, tanh GELU)."""
    t = {key: torch.from_numpy(value).double() for key, value in p.items()}
    prefix = "params/" if style == "big_vision" else ""
    attn, ln2, mlp = ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    if style == "vit_jax":
        attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")

    def layer_norm(x, at):
        return F.layer_norm(x, x.shape[-1:], t[f"{at}/scale"], t[f"{at}/bias"], eps=1e-6)

    def attention(queries, x, at):
        q = torch.einsum("bld,dhk->blhk", queries, t[f"{at}/query/kernel"]) + t[f"{at}/query/bias"]
        k = torch.einsum("bld,dhk->blhk", x, t[f"{at}/key/kernel"]) + t[f"{at}/key/bias"]
        v = torch.einsum("bld,dhk->blhk", x, t[f"{at}/value/kernel"]) + t[f"{at}/value/bias"]
        weights = torch.softmax(torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        out = torch.einsum("bhqs,bshk->bqhk", weights, v)
        return torch.einsum("bqhk,hkd->bqd", out, t[f"{at}/out/kernel"]) + t[f"{at}/out/bias"]

    def mlp_block(x, at):
        x = F.gelu(x @ t[f"{at}/Dense_0/kernel"] + t[f"{at}/Dense_0/bias"], approximate="tanh")
        return x @ t[f"{at}/Dense_1/kernel"] + t[f"{at}/Dense_1/bias"]

    x = images.double().permute(0, 2, 3, 1)  # NHWC
    batch = x.shape[0]
    # A stride-P convolution is a matmul over each patch flattened as (row, column, channel).
    x = (
        x.reshape(batch, GRID, PATCH, GRID, PATCH, 3)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, GRID * GRID, -1)
    )
    x = x @ t[f"{prefix}embedding/kernel"].reshape(-1, WIDTH) + t[f"{prefix}embedding/bias"]
    cls = t.get(f"{prefix}cls")
    if style == "vit_jax":
        if cls is not None:
            x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
        x = x + t["Transformer/posembed_input/pos_embedding"]
    else:
        x = x + t["params/pos_embedding"]
        if cls is not None:
            x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
    for i in range(DEPTH):
        block = f"{prefix}Transformer/encoderblock_{i}"
        y = layer_norm(x, f"{block}/LayerNorm_0")
        x = x + attention(y, y, f"{block}/{attn}")
        x = x + mlp_block(layer_norm(x, f"{block}/{ln2}"), f"{block}/{mlp}")
    x = layer_norm(x, f"{prefix}Transformer/encoder_norm")
    if pool in ("token", "tok"):
        x = x[:, 0]
    elif pool == "gap":
        x = x.mean(dim=1)
    else:  # big_vision MAPHead
        head = "params/MAPHead_0"
        probe = t[f"{head}/probe"].expand(batch, -1, -1)
        x = attention(probe, x, f"{head}/MultiHeadDotProductAttention_0")
        x = (x + mlp_block(layer_norm(x, f"{head}/LayerNorm_0"), f"{head}/MlpBlock_0"))[:, 0]
    if f"{prefix}pre_logits/kernel" in t:
        x = torch.tanh(x @ t[f"{prefix}pre_logits/kernel"] + t[f"{prefix}pre_logits/bias"])
    return x @ t[f"{prefix}head/kernel"] + t[f"{prefix}head/bias"]


def save_npz(path, params):
    np.savez(path, **params)
    return path


def assert_same_npz(path, params):
    with np.load(path, allow_pickle=False) as written:
        assert sorted(written.files) == sorted(params)
        for key, value in params.items():
            assert written[key].shape == value.shape, key
            assert np.array_equal(written[key], value), key


@pytest.mark.parametrize(
    "pool, representation",
    [("token", None), ("token", 16), ("gap", None)],
    ids=["token", "pre_logits", "gap"],
)
def test_vit_jax_logits_and_bitwise_round_trip(tmp_path, pool, representation):
    params = flax_params("vit_jax", pool, representation)
    source = save_npz(tmp_path / "vit.npz", params)
    assert read_checkpoint(source).layout == "vit_jax"
    model = vitkit.load(source, num_heads=HEADS, keep_source_numerics=True).eval()
    assert model.config.gelu == "tanh" and model.config.pos_embed_resample == "bilinear_align_corners"
    assert model.config.pool == pool and model.config.representation_size == representation
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(
            model(images).double(), flax_forward(params, images, "vit_jax", pool), atol=1e-5, rtol=0
        )
    out = write_layout(model, tmp_path / "back.npz", "npz")
    assert_same_npz(out, params)


def test_vit_jax_default_numerics_are_vitkits(tmp_path):
    source = save_npz(tmp_path / "vit.npz", flax_params("vit_jax"))
    model = vitkit.load(source, num_heads=HEADS)
    assert model.config.gelu == "exact" and model.config.pos_embed_resample == "bicubic"


def test_in21k_zeroed_head_is_reported_and_pre_logits_can_be_dropped(tmp_path, caplog):
    params = flax_params("vit_jax", representation=WIDTH)
    params["head/kernel"][:] = 0
    params["head/bias"][:] = 0
    source = save_npz(tmp_path / "in21k.npz", params)
    with caplog.at_level(logging.INFO, logger="vitkit"):
        kept = vitkit.load(source, num_heads=HEADS)
    assert "warn_zeroed_head" in caplog.text and "classifier is all zeros" in caplog.text
    assert kept.config.representation_size == WIDTH
    dropped = vitkit.load(source, num_heads=HEADS, pre_logits=False, keep_source_numerics=True).eval()
    assert dropped.config.representation_size is None and "pre_logits.fc.weight" not in dropped.state_dict()
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        features = dropped.forward_head(dropped.forward_features(images), pre_logits=True)
    params.pop("pre_logits/kernel"), params.pop("pre_logits/bias")
    params["head/kernel"] = np.eye(WIDTH, dtype=np.float32)  # the reference then returns the pooled token
    params["head/bias"] = np.zeros(WIDTH, dtype=np.float32)
    torch.testing.assert_close(
        features.double(), flax_forward(params, images, "vit_jax", "token"), atol=1e-5, rtol=0
    )


def test_vit_jax_optimizer_prefix_is_stripped(tmp_path, caplog):
    params = flax_params("vit_jax")
    source = save_npz(tmp_path / "opt.npz", {f"opt/target/{key}": value for key, value in params.items()})
    with caplog.at_level(logging.INFO, logger="vitkit"):
        model = vitkit.load(source, num_heads=HEADS).eval()
    assert "strip_optimizer_prefix" in caplog.text
    reference = vitkit.load(save_npz(tmp_path / "plain.npz", params), num_heads=HEADS).eval()
    images = torch.randn(1, 3, IMG, IMG)
    assert torch.equal(model(images), reference(images))


def test_vit_jax_hybrid_names_and_round_trip(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(stem="hybrid", hybrid_layers=(1, 1), patch_size=1, zero_head=True)
    model = VisionTransformer(config).eval()
    path = write_layout(model, tmp_path / "r50.npz", "npz")
    with np.load(path, allow_pickle=False) as written:
        shapes = {key: written[key].shape for key in written.files}
    # The BiT trunk at the top level, stages and units counted from one, kernels HWIO.
    assert shapes["conv_root/kernel"] == (7, 7, 3, 64)
    assert shapes["gn_root/scale"] == (64,)
    assert shapes["block1/unit1/conv2/kernel"] == (3, 3, 64, 64)
    assert shapes["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
    assert shapes["block2/unit1/gn_proj/bias"] == (512,)
    assert shapes["embedding/kernel"] == (1, 1, 512, WIDTH)
    assert shapes["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"] == (
        WIDTH,
        HEADS,
        8,
    )
    assert shapes["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"] == (HEADS, 8, WIDTH)
    loaded = vitkit.load(path, num_heads=HEADS, zero_head=True).eval()
    assert loaded.config == config
    images = torch.randn(2, 3, IMG, IMG)
    assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize("pool", ["tok", "gap", "map"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_big_vision_logits(tmp_path, pool, scan, caplog):
    params = flax_params("big_vision", pool)
    stored = dict(params)
    if scan:
        # scan=True training: one `encoderblock` whose tensors stack the blocks on a leading axis.
        blocks = [key for key in params if "/encoderblock_" in key]
        for key in blocks:
            stored.pop(key)
        for key in {k.replace("encoderblock_0", "encoderblock") for k in blocks if "encoderblock_0" in k}:
            stored[key] = np.stack(
                [params[key.replace("encoderblock/", f"encoderblock_{i}/")] for i in range(DEPTH)]
            )
    source = save_npz(tmp_path / "bv.npz", stored)
    assert read_checkpoint(source).layout == "big_vision"
    with caplog.at_level(logging.INFO, logger="vitkit"):
        model = vitkit.load(source, num_heads=HEADS, keep_source_numerics=True).eval()
    assert ("unstack_scanned_blocks" in caplog.text) == scan
    assert model.config.pos_embed_class_slot is False or pool != "tok"
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        expected = flax_forward(params, images, "big_vision", pool)
        torch.testing.assert_close(model(images).double(), expected, atol=1e-5, rtol=0)


def test_big_vision_to_vit_jax_keeps_the_function(tmp_path):
    """A big_vision class token has no position slot; vit_jax gets a zero slot, which adds nothing."""
    source = save_npz(tmp_path / "bv.npz", flax_params("big_vision", "tok"))
    model = vitkit.load(source, num_heads=HEADS).eval()
    out = vitkit.convert.convert(source, tmp_path / "vit.npz", to="npz", num_heads=HEADS).path
    with np.load(out, allow_pickle=False) as written:
        assert not written["Transformer/posembed_input/pos_embedding"][0, 0].any()
    images = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(
        vitkit.load(out, num_heads=HEADS).eval()(images), model(images), atol=1e-6, rtol=0
    )
