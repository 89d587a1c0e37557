"""Position-embedding similarity and patch-embedding filter components on models with known answers."""

import numpy as np
import pytest
import torch

from helpers import tiny_config
from vitkit.analysis.attention import patch_distances
from vitkit.analysis.embeddings import (
    filter_components,
    patch_filters,
    patch_position_embeddings,
    position_similarity,
)
from vitkit.models.vit import VisionTransformer


@pytest.mark.parametrize("img_size", [32, 48])
def test_sincos_similarity_peaks_at_the_patch_itself_and_falls_with_distance(img_size):
    model = VisionTransformer(tiny_config(pos_embed="sincos2d", img_size=img_size))
    similarity = position_similarity(patch_position_embeddings(model))
    rows, cols = model.config.grid_size
    assert similarity.shape == (rows, cols, rows, cols)
    flat = similarity.reshape(rows * cols, rows * cols)
    torch.testing.assert_close(flat.diagonal(), torch.ones(rows * cols))
    assert (flat.argmax(dim=1) == torch.arange(rows * cols)).all()
    distances = patch_distances((rows, cols))
    correlations = [np.corrcoef(flat[i].numpy(), distances[i].numpy())[0, 1] for i in range(rows * cols)]
    assert max(correlations) < -0.5


def test_sincos_similarity_falls_monotonically_along_rows_and_columns_on_a_small_grid():
    model = VisionTransformer(tiny_config(pos_embed="sincos2d"))
    similarity = position_similarity(patch_position_embeddings(model))
    rows, cols = model.config.grid_size
    for r in range(rows):
        for c in range(cols):
            assert (similarity[r, c, r, c:].diff() < 0).all()
            assert (similarity[r, c, r:, c].diff() < 0).all()
            assert (similarity[r, c, r, : c + 1].diff() > 0).all()


@pytest.mark.parametrize("class_slot", [True, False])
def test_learned_position_embeddings_exclude_the_class_slot(class_slot):
    model = VisionTransformer(tiny_config(pos_embed_class_slot=class_slot))
    pos_embed = patch_position_embeddings(model)
    patches = model.pos_embed[0, 1:] if class_slot else model.pos_embed[0]
    torch.testing.assert_close(pos_embed, patches.detach().reshape(4, 4, 32))
    assert not pos_embed.requires_grad  # a plain tensor, ready for numpy and plotting


def test_a_model_without_position_embeddings_is_a_clear_error():
    with pytest.raises(ValueError, match="no position embeddings"):
        patch_position_embeddings(VisionTransformer(tiny_config(pos_embed="none")))


def test_filter_components_recover_hand_set_directions_and_variances():
    model = VisionTransformer(tiny_config())
    num_filters, pixels = 32, 3 * 8 * 8
    directions, _ = torch.linalg.qr(torch.randn(pixels, 2, generator=torch.Generator().manual_seed(0)))
    first, second = directions.T  # orthonormal, (pixels,)
    alternate = torch.tensor([1.0, -1.0]).repeat(num_filters // 2)  # zero mean, orthogonal to `pairs`
    pairs = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(num_filters // 4)
    mean_filter = torch.rand(pixels)
    filters = mean_filter + 3.0 * alternate[:, None] * first + 1.0 * pairs[:, None] * second
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(filters.reshape(num_filters, 3, 8, 8))

    result = filter_components(patch_filters(model), num_components=4)
    assert result.components.shape == (4, 3, 8, 8)
    components = result.components.reshape(4, pixels)
    assert abs(components[0] @ first) == pytest.approx(1.0, abs=1e-5)
    assert abs(components[1] @ second) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(result.explained[:2], torch.tensor([0.9, 0.1]))
    assert result.explained[2:].abs().max() < 1e-6
    torch.testing.assert_close(result.mean.reshape(pixels), mean_filter)
    for component in components[:2]:  # sign fixed: the largest-magnitude pixel is positive
        assert component[component.abs().argmax()] > 0


def test_filters_of_a_stem_without_a_linear_patch_projection_are_refused():
    model = VisionTransformer(tiny_config(stem="hmlp", img_size=32, patch_size=16))
    with pytest.raises(ValueError, match="stem is 'hmlp'"):
        patch_filters(model)
