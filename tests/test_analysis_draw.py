"""`vitkit draw`: the stages of a variant with shapes and parameters, and the drawing as PNG and SVG."""

import pytest

from helpers import tiny_config
from vitkit import get_config
from vitkit.analysis.draw import architecture_figure, draw_architecture, stages, summary
from vitkit.analysis.flops import count
from vitkit.cli import main

pytest.importorskip("matplotlib", reason="drawings need the viz extra (matplotlib)")

CONFIGS = {
    "sequential": tiny_config(),
    "parallel": tiny_config(parallel=3),
    "hmlp": tiny_config(stem="hmlp", patch_size=16),
    "hybrid": tiny_config(stem="hybrid", hybrid_layers=(1, 1), patch_size=1),
    "gap_fc_norm": tiny_config(pool="gap_fc_norm", class_token=False, pos_embed="sincos2d"),
    "map_pre_logits": tiny_config(pool="map", representation_size=16),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_stage_parameters_add_up_to_the_model(kind):
    config = CONFIGS[kind]
    table = stages(config)
    assert sum(stage.num_params for stage in table) == count(config).params
    assert table[0].shape == (3, 32, 32) and table[-1].shape == (config.num_classes,)
    blocks = next(stage for stage in table if stage.name == "encoder blocks")
    assert blocks.shape == (config.num_tokens, config.embed_dim)


def test_vit_b16_stages_match_the_paper():
    table = {stage.name: stage for stage in stages(get_config("vit_base_patch16_224"))}
    assert table["patches"].shape == (196, 768)  # 14 x 14 patches of 16 x 16 x 3
    assert table["patch embedding"].num_params == 768 * 768 + 768
    assert table["tokens"].shape == (197, 768) and table["tokens"].num_params == 768 + 197 * 768
    assert table["head"].num_params == 768 * 1000 + 1000


def test_summary_lists_every_stage_and_the_totals():
    config = get_config("vit_small_patch16_18x2_224")
    text = summary(config, "vit_small_patch16_18x2_224")
    for stage in stages(config):
        assert stage.name in text
    assert f"{count(config).params:,}" in text
    assert "18 x [2 x (LN, MSA), 2 x (LN, MLP)]" in text


@pytest.mark.parametrize("num_parallel", [1, 3])
def test_the_drawing_shows_each_parallel_branch(num_parallel):
    figure = architecture_figure(tiny_config(parallel=num_parallel), "tiny")
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts.count("LN") == 2 * num_parallel
    assert sum(text.startswith("MSA, 4 heads") for text in texts) == num_parallel
    assert any(f"{num_parallel} parallel attention branches" in text for text in texts) == (num_parallel > 1)


def test_draw_writes_png_and_svg(tmp_path):
    paths = draw_architecture(tiny_config(), tmp_path / "tiny", "tiny")
    assert [path.suffix for path in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in paths[1].read_text()


def test_draw_command(tmp_path, capsys):
    assert main(["draw", "B/16", "--out", str(tmp_path / "b16")]) == 0
    out = capsys.readouterr().out
    assert "86,567,656" in out and "encoder blocks" in out
    assert (tmp_path / "b16.png").exists() and (tmp_path / "b16.svg").exists()
    assert main(["draw", "vit_nonexistent"]) == 2
