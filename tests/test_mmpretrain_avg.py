"""mmpretrain's VisionTransformer with out_type='avg_featmap' and final_norm=False (the MAE / BEiT-style
fine-tuned ViTs): read, written back bitwise, and computing mmpretrain's logits.

mmpretrain needs mmcv, so its forward is written out here from its source on the state dict alone:
TransformerEncoderLayer is x + attn(ln1(x)), then x + ffn(ln2(x)) (fused qkv split into heads,
exact GELU, LayerNorm eps 1e-6); with final_norm=False there is no backbone.ln1; `_format_output`
averages the patch tokens (`x[:, num_extra_tokens:]`, the class token excluded) and applies
backbone.ln2; LinearClsHead is one Linear `head.fc` on that feature."""

import pytest
import torch
import torch.nn.functional as F

import vitkit
from helpers import tiny_config
from vitkit.cli import main
from vitkit.convert import read_checkpoint, write_layout
from vitkit.files import CheckpointError
from vitkit.models.vit import VisionTransformer

NUM_HEADS = 4


def mmpretrain_logits(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """mmpretrain's ImageClassifier(VisionTransformer(out_type='avg_featmap', final_norm=False),
    LinearClsHead) on a state dict, without mmpretrain."""

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def dense(x, name):
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    weight = state["backbone.patch_embed.projection.weight"]
    x = F.conv2d(images, weight, state["backbone.patch_embed.projection.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)  # (B, L, D)
    batch, _, dim = x.shape
    with_cls_token = "backbone.cls_token" in state
    if with_cls_token:
        x = torch.cat([state["backbone.cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + state["backbone.pos_embed"]
    depth = len({key.split(".")[2] for key in state if key.startswith("backbone.layers.")})
    for i in range(depth):
        layer = f"backbone.layers.{i}."
        h = norm(x, f"{layer}ln1")
        qkv = dense(h, f"{layer}attn.qkv").reshape(batch, -1, 3, NUM_HEADS, dim // NUM_HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (dim // NUM_HEADS) ** -0.5).softmax(dim=-1)
        x = x + dense((attn @ v).transpose(1, 2).reshape(batch, -1, dim), f"{layer}attn.proj")
        h = F.gelu(dense(norm(x, f"{layer}ln2"), f"{layer}ffn.layers.0.0"))
        x = x + dense(h, f"{layer}ffn.layers.1")
    feature = norm(x[:, int(with_cls_token) :].mean(dim=1), "backbone.ln2")
    return dense(feature, "head.fc")


def build(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(pool="gap_fc_norm", **overrides)).eval()
    with torch.no_grad():  # non-trivial norms, so that a misplaced one shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return model


@pytest.mark.parametrize("class_token", [True, False], ids=["cls", "no_cls"])
def test_avg_featmap_round_trip_and_logits(tmp_path, class_token):
    model = build(class_token=class_token)
    path = write_layout(model, tmp_path / "mae.pth", "mmpretrain")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"backbone.ln2.weight", "backbone.ln2.bias", "head.fc.weight", "head.fc.bias"} <= set(state)
    assert not any(key.startswith(("backbone.ln1.", "head.layers.")) for key in state)
    assert ("backbone.cls_token" in state) == class_token
    assert state["backbone.pos_embed"].shape == (1, 16 + int(class_token), 32)

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = mmpretrain_logits(state, images)
        loaded = vitkit.load(path, num_heads=NUM_HEADS).eval()
        torch.testing.assert_close(loaded(images), reference, rtol=0, atol=1e-5)
        assert torch.equal(loaded(images), model(images))
    assert loaded.config.pool == "gap_fc_norm" and loaded.config.class_token == class_token
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    again = write_layout(loaded, tmp_path / "again.pth", "mmpretrain")
    back = torch.load(again, weights_only=True)["state_dict"]
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_avg_featmap_with_vision_transformer_cls_head(tmp_path):
    """A pre-logits layer needs VisionTransformerClsHead (head.layers), which also reads the averaged
    feature; LinearClsHead has none."""
    model = build(representation_size=16)
    path = write_layout(model, tmp_path / "mm.pth", "mmpretrain")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {"backbone.ln2.weight", "head.layers.pre_logits.weight", "head.layers.head.weight"} <= set(state)
    loaded = vitkit.load(path, num_heads=NUM_HEADS).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_cli_convert_writes_the_avg_featmap_layout(tmp_path, capsys):
    model = build()
    source = vitkit.save(model, tmp_path / "model.safetensors")
    target = tmp_path / "mae.pth"
    assert main(["convert", str(source), str(target), "--to", "mmpretrain"]) == 0
    assert read_checkpoint(target).layout == "mmpretrain"
    state = torch.load(target, weights_only=True)["state_dict"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mmpretrain_logits(state, images), model(images), rtol=0, atol=1e-5)


def test_refusals(tmp_path, capsys):
    # vitkit's "gap" (norm every token, then average) has no mmpretrain out_type.
    with pytest.raises(CheckpointError, match="cannot hold this model: pool 'gap'"):
        write_layout(VisionTransformer(tiny_config(pool="gap")), tmp_path / "gap.pth", "mmpretrain")
    # final_norm=True with avg_featmap: backbone.ln1 and backbone.ln2 both present.
    state = torch.load(write_layout(build(), tmp_path / "a.pth", "mmpretrain"), weights_only=True)
    state["state_dict"]["backbone.ln1.weight"] = torch.ones(32)
    state["state_dict"]["backbone.ln1.bias"] = torch.zeros(32)
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(CheckpointError, match="final_norm=True .* is not supported"):
        vitkit.load(tmp_path / "both.pth", num_heads=NUM_HEADS)
    assert (
        main(["convert", str(tmp_path / "both.pth"), str(tmp_path / "o.safetensors"), "--to", "vitkit"]) == 2
    )
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
