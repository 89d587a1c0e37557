"""Parameter and MAC counts: published figures, golden numbers for every name, an independent counter."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitkit import get_config, list_models
from vitkit.analysis.flops import count
from vitkit.cli import main
from vitkit.models.vit import VisionTransformer

GOLDEN = json.loads((Path(__file__).parent / "golden" / "counts.json").read_text())

# mmpretrain 1.x's ViT metafile (1000 classes): parameters, GMACs (theirs leave out the head's D x 1000).
PUBLISHED = {
    "vit_base_patch16_224": (86_567_656, 17.58),
    "vit_base_patch16_384": (86_859_496, 55.54),
    "vit_base_patch32_384": (88_297_192, 13.06),
    "vit_large_patch16_384": (304_715_752, 191.21),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_figures(name):
    params, gmacs = PUBLISHED[name]
    counts = count(get_config(name))
    assert counts.params == params
    assert round(counts.macs / 1e9, 2) == gmacs


def test_every_registered_name_has_golden_counts():
    missing = [name for name in list_models() if name not in GOLDEN]
    assert not missing, f"no golden counts for {missing}: add them to tests/golden/counts.json"
    stale = [name for name in GOLDEN if name not in list_models()]
    assert not stale, f"golden counts for names that are no longer registered: {stale}"


@pytest.mark.parametrize("name", list_models())
def test_golden_counts(name):
    counts = count(get_config(name))
    assert (counts.params, counts.macs) == (GOLDEN[name]["params"], GOLDEN[name]["macs"])


def test_hand_computed_vit_b16():
    """Equation by equation for ViT-B/16 at 224: N=196 patches, L=197 tokens, D=768, MLP 3072."""
    n, length, d, mlp, depth = 196, 197, 768, 3072, 12
    stem = n * d * 3 * 16 * 16
    block = length * d * 3 * d + 2 * length * length * d + length * d * d + 2 * length * d * mlp
    norms = 5 * (2 * depth + 1) * length * d
    head = d * 1000
    assert count(get_config("vit_base_patch16_224")).macs == stem + depth * block + norms + head
    params = (
        (3 * 256 * d + d)
        + d
        + length * d
        + depth * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * mlp + mlp + d)
        + 2 * d
        + d * 1000
        + 1000
    )
    assert count(get_config("vit_base_patch16_224")).params == params


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch16_224",
        "vit_small_patch16_18x2_224",
        "vit_base_r50_s16_224",
        "vit_small_patch16_224_hmlp",
    ],
)
def test_matmul_flops_agree_with_torch_flop_counter(name):
    """The module-hook count (without norms) equals torch's op-level counter on the meta device."""
    config = get_config(name)
    with torch.device("meta"):
        model = VisionTransformer(config)
        images = torch.zeros(1, 3, *config.img_size)
    counts = count(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert counter.get_total_flops() == 2 * (counts.flops - counts.macs)  # flops - macs = matmul MACs


def test_resolution_changes_counts():
    at_224, at_384 = count(get_config("vit_base_patch16_224")), count(get_config("vit_base_patch16_224"), 384)
    assert at_384.macs == count(get_config("vit_base_patch16_384")).macs
    assert at_224.params == 86_567_656  # counting at another size does not resample the stored parameters


def test_info_command_prints_published_figures(capsys):
    assert main(["info", "vit_base_patch16_384"]) == 0
    out = capsys.readouterr().out
    assert "86,859,496" in out and "55.54 GMACs" in out
    assert main(["info", "B/16", "--img-size", "384"]) == 0
    assert "55.54 GMACs" in capsys.readouterr().out


def test_unknown_name_lists_close_matches(capsys):
    assert main(["info", "vit_bas_patch16_224"]) == 2
    assert "vit_base_patch16_224" in capsys.readouterr().err


def test_zoo_lists_every_name(capsys):
    assert main(["zoo", "vit_base_*"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_models("vit_base_*"))
    assert "| vit_base_patch16_384 | 384 | 86.86 | 55.54 |" in out


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_224",
        "vit_small_patch16_18x2_224",
        "vit_base_r50_s16_384",
        "vit_small_patch14_reg4_dinov2",
    ],
)
def test_counting_one_block_for_alike_blocks_equals_running_every_block(name):
    config = get_config(name)
    with torch.device("meta"):
        model = VisionTransformer(config)
    assert count(config) == count(model)  # a model passed in runs every block


def test_a_model_passed_in_counts_each_of_its_blocks():
    """A model whose second block was changed by hand is counted as it is, block by block: its MLP's
    MACs and parameters are the config's less the replaced layers' and plus the new ones'."""
    config = get_config("vit_tiny_patch16_224", depth=2)
    with torch.device("meta"):
        model = VisionTransformer(config)
        model.blocks[1].mlp.fc1 = torch.nn.Linear(config.embed_dim, 8)
        model.blocks[1].mlp.fc2 = torch.nn.Linear(8, config.embed_dim)
    tokens, d, hidden = config.num_patches + 1, config.embed_dim, config.mlp_dim
    shrunk = 2 * d * (hidden - 8)
    assert count(config).macs - count(model).macs == tokens * shrunk
    assert count(config).params - count(model).params == shrunk + (hidden - 8)  # weights, fc1's bias
