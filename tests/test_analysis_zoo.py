"""The zoo metafile: the committed file is what the code generates; known checkpoints fit their names."""

import json
from pathlib import Path

import pytest

from vitkit import get_config, list_models
from vitkit.analysis.flops import count
from vitkit.analysis.zoo import KNOWN_CHECKPOINTS, METAFILE_PATH, markdown_table, metafile, metafile_text
from vitkit.cli import main

ROOT = Path(__file__).resolve().parents[1]

# mmpretrain configs/vision_transformer/metafile.yml: Parameters and FLOPs (their FLOPs are MACs).
PUBLISHED_COUNTS = {
    "vit-base-p16_in21k-pre_3rdparty_in1k-384px": (86_859_496, 55_538_974_464),
    "vit-base-p32_in21k-pre_3rdparty_in1k-384px": (88_297_192, 13_056_716_544),
    "vit-large-p16_in21k-pre_3rdparty_in1k-384px": (304_715_752, 191_210_034_176),
}


def test_committed_metafile_is_what_the_code_generates():
    committed = (ROOT / METAFILE_PATH).read_text()
    assert committed == metafile_text(progress=False), (
        f"{METAFILE_PATH} is stale: run `vitkit zoo --metafile {METAFILE_PATH}`"
    )


def test_metafile_lists_every_registered_name():
    committed = json.loads((ROOT / METAFILE_PATH).read_text())
    assert [entry["name"] for entry in committed["models"]] == list_models()


@pytest.mark.parametrize("checkpoint", KNOWN_CHECKPOINTS, ids=lambda c: c.name)
def test_known_checkpoints_fit_their_registered_names(checkpoint):
    counts = count(get_config(checkpoint.model))
    params, macs = PUBLISHED_COUNTS[checkpoint.name]
    # The metafile's FLOPs leave out the classifier head's D x 1000 multiply-accumulates.
    config = get_config(checkpoint.model)
    assert counts.params == params
    assert counts.macs - config.embed_dim * config.num_classes == macs
    assert 0 < checkpoint.top1 <= checkpoint.top5 <= 100
    assert checkpoint.source.startswith("https://") and checkpoint.weights.startswith("https://")


def test_metafile_entry_of_a_known_checkpoint():
    (entry,) = metafile("vit_base_patch16_384", progress=False)["models"]
    assert entry["resolution"] == [384, 384]
    assert entry["flops"] > entry["macs"] > 0
    (published,) = entry["checkpoints"]
    assert (published["top1"], published["top5"], published["pretrain"]) == (85.43, 97.77, "ImageNet-21k")


def test_markdown_has_mmclassification_columns():
    table = markdown_table("vit_base_patch16_384", progress=False).splitlines()
    assert table[0] == "| Model | Pretrain | resolution | Params(M) | Flops(G) | Top-1 (%) | Top-5 (%) |"
    assert table[2] == "| vit_base_patch16_384 | ImageNet-21k | 384x384 | 86.86 | 55.54 | 85.43 | 97.77 |"
    unknown = markdown_table("vit_tiny_patch4_32", progress=False).splitlines()[2]
    assert unknown.startswith("| vit_tiny_patch4_32 | - | 32x32 |") and unknown.endswith("| - | - |")


def test_zoo_command_markdown_and_metafile(tmp_path, capsys):
    assert main(["zoo", "--markdown", "vit_base_patch32_384"]) == 0
    assert (
        "| vit_base_patch32_384 | ImageNet-21k | 384x384 | 88.30 | 13.06 | 84.01 | 97.08 |"
        in capsys.readouterr().out
    )
    path = tmp_path / "index.json"
    assert main(["zoo", "--metafile", str(path), "vit_tiny_*"]) == 0
    names = [entry["name"] for entry in json.loads(path.read_text())["models"]]
    assert names == list_models("vit_tiny_*")
