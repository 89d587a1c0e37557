"""Attention analysis: mean attention distance, attention rollout and per-head maps on known attention."""

import math

import pytest
import torch

from helpers import tiny_config
from vitkit.analysis.attention import (
    attention_rollout,
    attention_weights,
    mean_attention_distance,
    model_attention_distance,
    patch_attention,
    pooled_patch_map,
)
from vitkit.models.vit import VisionTransformer


def uniform_attention(batch, heads, length):
    return torch.full((batch, heads, length, length), 1.0 / length)


def test_uniform_attention_gives_the_analytic_mean_pairwise_distance():
    grid, patch, prefix = (3, 4), 8, 1
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    by_hand = (
        sum(patch * math.hypot(r1 - r2, c1 - c2) for r1, c1 in cells for r2, c2 in cells) / len(cells) ** 2
    )
    weights = [uniform_attention(2, 3, prefix + len(cells)) for _ in range(2)]
    distances = mean_attention_distance(weights, grid, patch, prefix)
    assert distances.shape == (2, 3)
    torch.testing.assert_close(distances, torch.full((2, 3), by_hand))


def test_neighbour_attention_is_one_patch_away_and_self_attention_is_zero():
    grid, patch = (4, 4), 16
    num_patches = 16
    to_right = torch.zeros(1, 2, num_patches, num_patches)
    for row in range(grid[0]):
        for col in range(grid[1]):
            # Every patch looks at the next one along its row (the last column at the previous one).
            target = col + 1 if col + 1 < grid[1] else col - 1
            to_right[0, 0, row * grid[1] + col, row * grid[1] + target] = 1.0
    to_right[0, 1] = torch.eye(num_patches)
    distances = mean_attention_distance([to_right], grid, patch, num_prefix_tokens=0)
    torch.testing.assert_close(distances, torch.tensor([[16.0, 0.0]]))


def test_class_token_is_dropped_and_patch_keys_renormalised():
    length = 1 + 4
    weights = torch.zeros(1, 1, length, length)
    weights[..., 0] = 0.5  # half of every row goes to the class token
    weights[..., 1:] = 0.5 / 4
    patches = patch_attention(weights, num_prefix_tokens=1)
    torch.testing.assert_close(patches, torch.full((1, 1, 4, 4), 0.25))


def test_attention_that_does_not_fit_the_grid_is_an_error():
    with pytest.raises(ValueError, match="grid"):
        mean_attention_distance([uniform_attention(1, 1, 10)], (2, 2), 16, 1)


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    length = 1 + 9
    rollout = attention_rollout([uniform_attention(2, 4, length) for _ in range(3)])
    heat = pooled_patch_map(rollout, (3, 3), num_prefix_tokens=1, pool="token")
    torch.testing.assert_close(heat, torch.full((2, 3, 3), 1 / 9))


def test_rollout_of_identity_attention_is_the_identity_and_uniform_under_average_pooling():
    identity = torch.eye(9).expand(1, 2, 9, 9)
    rollout = attention_rollout([identity, identity])
    torch.testing.assert_close(rollout, torch.eye(9)[None])
    heat = pooled_patch_map(rollout, (3, 3), num_prefix_tokens=0, pool="gap")
    torch.testing.assert_close(heat, torch.full((1, 3, 3), 1 / 9))


def test_rollout_adds_the_residual_and_multiplies_later_layers_on_the_left():
    torch.manual_seed(0)
    first, second = (torch.rand(1, 2, 5, 5).softmax(-1) for _ in range(2))
    half = lambda a: (a.double().mean(1) + torch.eye(5, dtype=torch.float64)) / 2  # noqa: E731
    by_hand = (half(second) @ half(first)).float()
    torch.testing.assert_close(attention_rollout([first, second]), by_hand)
    torch.testing.assert_close(attention_rollout([first, second]).sum(-1), torch.ones(1, 5))


def test_model_attention_weights_are_row_stochastic_and_batching_does_not_change_the_distance():
    torch.manual_seed(0)
    model = VisionTransformer(tiny_config(parallel=2)).train()
    images = torch.randn(3, 3, 32, 32)
    weights = attention_weights(model, images)
    assert model.training, "attention_weights must restore the training mode"
    assert len(weights) == 2 and weights[0].shape == (3, 2 * 4, 17, 17)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(3, 8, 17))
    one_by_one = model_attention_distance(model, images, batch_size=1, progress=False)
    all_at_once = model_attention_distance(model, images, batch_size=8, progress=False)
    torch.testing.assert_close(one_by_one, all_at_once)
    assert one_by_one.shape == (2, 8)
    # Any mixture of patch keys lies between zero and the largest distance on a 4 x 4 grid of 8 px.
    assert (one_by_one > 0).all() and (one_by_one < 8 * math.hypot(3, 3)).all()
