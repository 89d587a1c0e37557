"""Counting conventions: each published table's figures to the printed digit, the analytic inventory
against the module-hook count, and the `torch` convention against an actual FlopCounterMode run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitkit import get_config, list_models
from vitkit.analysis.conventions import (
    CONVENTIONS,
    count_in,
    get_convention,
    hub_card_macs,
    num_params,
    operations,
)
from vitkit.analysis.flops import count
from vitkit.analysis.zoo import KNOWN_CHECKPOINTS, MMCLS_0X_VIT_ROWS, markdown_table, page_accuracy
from vitkit.cli import main
from vitkit.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "counts.json").read_text())

# MMClassification 0.x configs/vision_transformer/README.md: Params(M), Flops(G) as printed.
MMCLS_0X_PAGE = {
    "vit_base_patch16_384": ("86.86", "33.03"),
    "vit_base_patch32_384": ("88.30", "8.56"),
    "vit_large_patch16_384": ("304.72", "116.68"),
}
# mmpretrain 1.x configs/vision_transformer/metafile.yml: FLOPs (fvcore MACs of extract_feat).
MMPRETRAIN_METAFILE = {
    "vit_base_patch16_384": 55_538_974_464,
    "vit_base_patch32_384": 13_056_716_544,
    "vit_large_patch16_384": 191_210_034_176,
    "vit_base_patch16_224": 17_581_972_224,  # vit-base-p16_32xb128-mae_in1k
}
# timm's Hugging Face model cards, "GMACs" (one decimal).
HUB_CARDS = {"vit_base_patch32_384": 12.7, "vit_large_patch16_384": 174.8, "vit_base_r50_s16_384": 61.3}

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, img_size=32, patch_size=8)
ODD_CONFIGS = {
    "token": {},
    "map": dict(pool="map", class_token=False),
    "gap": dict(pool="gap", class_token=False, pos_embed="sincos2d"),
    "gap_fc_norm": dict(pool="gap_fc_norm", representation_size=24, qkv_bias=False),
    "parallel": dict(parallel=2, layer_scale_init=1e-5),
    "hmlp": dict(stem="hmlp", patch_size=16),
    "hmlp_patch4": dict(stem="hmlp", patch_size=4, img_size=(32, 40)),
    "hmlp_patch8": dict(stem="hmlp", patch_size=8, img_size=(32, 48)),
    "hybrid": dict(stem="hybrid", hybrid_layers=(1, 1), patch_size=1, img_size=64),
    "conv": dict(stem="conv", patch_size=8, img_size=(32, 40)),
    "cnn": dict(stem="cnn", patch_size=4, stem_channels=(8, 16, 24), img_size=(32, 40)),
    "cnn_at_width": dict(stem="cnn", patch_size=2, stem_channels=(8, 32), pool="gap", class_token=False),
    "headless": dict(num_classes=0),
    "wide": dict(img_size=(32, 64)),
}


def tiny(name: str):
    return get_config("vit_tiny_patch4_32", **{**TINY, **ODD_CONFIGS[name]})


@pytest.mark.parametrize("name", sorted(MMCLS_0X_PAGE))
def test_mmcls_0x_page_figures(name):
    params, gflops = MMCLS_0X_PAGE[name]
    config = get_config(name)
    assert f"{num_params(config) / 1e6:.2f}" == params
    assert f"{count_in('mmcls-0.x', config).total / 1e9:.2f}" == gflops


def test_mmcls_0x_by_hand():
    """ViT-B/16 at 384: per block only the MLP, 8 N D^2; the patch conv with bias; 2 per LN element."""
    n, d, depth = 577, 768, 12
    mlp = depth * 8 * n * d * d
    stem = 576 * d * (3 * 16 * 16) + 576 * d
    norms = 2 * (2 * depth + 1) * n * d
    assert (
        count_in("mmcls-0.x", get_config("vit_base_patch16_384")).total
        == mlp + stem + norms
        == 33_033_868_800
    )


@pytest.mark.parametrize("name", sorted(MMPRETRAIN_METAFILE))
def test_fvcore_matches_mmpretrain_metafile(name):
    assert count_in("fvcore", get_config(name)).total == MMPRETRAIN_METAFILE[name]


def test_fvcore_rounded_figures_of_the_tables():
    figures = {
        name: f"{count_in('fvcore', get_config(name)).total / 1e9:.2f}" for name in MMPRETRAIN_METAFILE
    }
    assert figures == {
        "vit_base_patch16_384": "55.54",
        "vit_base_patch32_384": "13.06",
        "vit_large_patch16_384": "191.21",
        "vit_base_patch16_224": "17.58",
    }


@pytest.mark.parametrize("name", sorted(HUB_CARDS))
def test_timm_hub_cards_leave_out_fused_attention(name):
    assert round(hub_card_macs(get_config(name)) / 1e9, 1) == HUB_CARDS[name]


def test_weight_standardisation_is_what_fvcore_adds_for_hybrids():
    config = get_config("vit_base_r50_s16_384")
    with torch.device("meta"):
        model = VisionTransformer(config)
    kernels = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("patch_embed.backbone") and p.ndim == 4
    )
    head = config.embed_dim * config.num_classes
    assert count_in("fvcore", config).total == count_in("vitkit", config).total - head + 4 * kernels


def test_analytic_counts_equal_golden_counts_for_every_name():
    """The golden counts are the module-hook counts of the built models."""
    analytic = {
        name: (num_params(get_config(name)), count_in("vitkit", get_config(name)).total)
        for name in list_models()
    }
    golden = {name: (GOLDEN[name]["params"], GOLDEN[name]["macs"]) for name in list_models()}
    assert analytic == golden


@pytest.mark.parametrize("variant", sorted(ODD_CONFIGS))
def test_vitkit_convention_equals_module_hooks(variant):
    config = tiny(variant)
    hooks, analytic = count(config), count_in("vitkit", config)
    assert (num_params(config), analytic.total) == (hooks.params, hooks.macs)
    assert {k: v for k, v in analytic.by_component.items() if v} == {
        k: v for k, v in hooks.macs_by_component.items() if v
    }


def torch_counter(config, device: str = "meta") -> dict[str, int]:
    with torch.device(device):
        model = VisionTransformer(config).eval()
        images = torch.zeros(1, config.in_chans, *config.img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("variant", sorted(ODD_CONFIGS))
def test_torch_convention_equals_flop_counter_mode(variant):
    """On the meta device SDPA runs as two bmm, so every product is seen, op by op."""
    config = tiny(variant)
    counted = torch_counter(config)
    ops = operations(config)
    by_kind = {kind: 2 * sum(op.size for op in ops if op.kind == kind) for kind in ("conv", "matmul")}
    assert counted.get("aten.convolution", 0) == by_kind["conv"]
    assert counted.get("aten.addmm", 0) + counted.get("aten.mm", 0) == by_kind["matmul"]
    assert sum(counted.values()) == count_in("torch", config).total


def test_torch_convention_at_full_size():
    config = get_config("vit_base_patch16_384")
    assert sum(torch_counter(config).values()) == count_in("torch", config).total == 110_968_700_928


def test_torch_counter_on_cpu_misses_the_flash_attention_kernel():
    """torch 2.13 has no formula for the CPU SDPA kernel: a CPU run reports no attention products."""
    for variant in ("token", "parallel"):  # parallel: the fused inference path, as served
        config = tiny(variant)
        products = 2 * sum(op.size for op in operations(config) if op.kind == "attention_product")
        assert sum(torch_counter(config, "cpu").values()) == count_in("torch", config).total - products, (
            "FlopCounterMode now counts CPU attention: update the torch convention's docstring"
        )


def test_refusals_and_unknown_names_are_one_line():
    with pytest.raises(ValueError, match="'mmcls-0.x' is undefined for hybrid stems"):
        count_in("mmcls-0.x", get_config("vit_base_r50_s16_224"))
    with pytest.raises(ValueError, match="undefined for attention pooling"):
        count_in("mmcls-0.x", tiny("map"))
    with pytest.raises(ValueError, match="expected one of vitkit, fvcore, mmcls-0.x, torch") as error:
        get_convention("flops")
    assert "\n" not in str(error.value)
    assert all(rule.description and rule.summary for rule in CONVENTIONS.values())
    assert count_in("fvcore", get_config("vit_base_r50_s16_224")).total > 0  # fvcore counts hybrids


def test_page_rows_and_their_accuracies():
    known = {c.name: (c.top1, c.top5) for c in KNOWN_CHECKPOINTS}
    fine_tuned = [row for row in MMCLS_0X_VIT_ROWS if row.checkpoint]
    assert [page_accuracy(row) for row in fine_tuned] == [known[row.checkpoint] for row in fine_tuned]
    assert [page_accuracy(row) for row in MMCLS_0X_VIT_ROWS if row.table == "ImageNet-21k"] == [None] * 3
    assert all(row.model in list_models() and row.counted in list_models() for row in MMCLS_0X_VIT_ROWS)


def test_zoo_markdown_reprints_the_mmcls_0x_page(capsys):
    assert main(["zoo", "--markdown", "--convention", "mmcls-0.x"]) == 0
    out = capsys.readouterr().out
    for row in (
        "| ViT-B16* | 224x224 | 86.86 | 33.03 | vit_base_patch16_384 at 384x384 | "
        "vit_base_patch16_224_in21k at 224x224 | 103.19 | 11.28 | 17.60 |",
        "| ViT-B32* | 224x224 | 88.30 | 8.56 | vit_base_patch32_384 at 384x384 |",
        "| ViT-L16* | 224x224 | 304.72 | 116.68 | vit_large_patch16_384 at 384x384 |",
        "| ViT-B16* | ImageNet-21k | 384x384 | 86.86 | 33.03 | 85.43 | 97.77 | vit_base_patch16_384 at "
        "384x384 | vit_base_patch16_384 at 384x384 | 86.86 | 33.03 | 55.54 |",
        "| ViT-B32* | ImageNet-21k | 384x384 | 88.30 | 8.56 | 84.01 | 97.08 |",
        "| ViT-L16* | ImageNet-21k | 384x384 | 304.72 | 116.68 | 85.63 | 97.63 |",
        "| ViT-B16 (IPU) | ImageNet-21k | 224x224 | 86.86 | 33.03 | 81.22 | 95.56 | vit_base_patch16_384 at "
        "384x384 | vit_base_patch16_224 at 224x224 | 86.57 | 11.28 | 17.58 |",
    ):
        assert row in out, row


def test_zoo_markdown_in_other_conventions():
    fvcore = markdown_table("vit_base_patch16_384", progress=False, convention="fvcore").splitlines()
    assert (
        fvcore[2]
        == "| vit_base_patch16_384 | ImageNet-21k | 384x384 | 86.86 | 55.54 | 85.43 | 97.77 | 55.54 |"
    )
    torch_table = markdown_table("vit_large_patch16_384", progress=False, convention="torch").splitlines()
    assert "| 304.72 | 382.13 | 85.63 | 97.63 | 191.21 |" in torch_table[2]


def test_zoo_plain_table_marks_undefined_figures(capsys):
    assert main(["zoo", "vit_base_r50_s16_38*", "--convention", "mmcls-0.x"]) == 0
    assert "| vit_base_r50_s16_384 | 384 | 98.95 | n/a |" in capsys.readouterr().out


def vitkit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitkit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )


def test_info_command_in_a_convention():
    result = vitkit_cli("info", "B/16", "--convention", "mmcls-0.x", "--img-size", "384")
    assert result.returncode == 0, result.stderr
    assert "parameters  86,859,496" in result.stdout
    assert re.search(r"^mmcls-0\.x\s+33,033,868,800  \(33\.03 GMACs", result.stdout, re.M)
    assert "vitkit MACs 55,539,742,464" in result.stdout
    assert "| attention | 28,348,416 | 0 | 22,472,312,832 |" in result.stdout


def test_info_command_rejects_a_bad_convention_in_one_line():
    result = vitkit_cli("info", "B/16", "--convention", "flops")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert (
        "unknown counting convention 'flops': expected one of vitkit, fvcore, mmcls-0.x, torch"
        in result.stderr
    )


def test_info_refuses_an_undefined_convention(capsys):
    assert main(["info", "R50+B/16", "--convention", "mmcls-0.x"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "undefined for hybrid stems" in error
    assert main(["zoo", "--convention", "fvcor"]) == 2
    assert "expected one of vitkit, fvcore, mmcls-0.x, torch" in capsys.readouterr().err


def test_readme_conventions_table_is_computed():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(
        r"^\| (ViT-\S+|R50\+ViT-\S+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+|n/a) \| ([\d.]+) \|$",
        readme,
        re.M,
    )
    names = {
        "ViT-B/16": "vit_base_patch16",
        "ViT-B/32": "vit_base_patch32",
        "ViT-L/16": "vit_large_patch16",
        "R50+ViT-B/16": "vit_base_r50_s16",
    }
    assert len(rows) >= 4
    for model, res, *figures in rows:
        config = get_config(f"{names[model]}_{res}")
        expected = [
            "n/a"
            if convention == "mmcls-0.x" and config.stem == "hybrid"
            else f"{count_in(convention, config).total / 1e9:.2f}"
            for convention in ("vitkit", "fvcore", "mmcls-0.x", "torch")
        ]
        assert figures == expected, model
