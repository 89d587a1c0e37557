"""resample_pos_embed and sincos_2d: identities, accuracy on smooth fields, the method switch."""

import math

import pytest
import torch

from vitkit.models.pos_embed import RESAMPLE_METHODS, resample_pos_embed, sincos_2d


def smooth_field(grid, positions_y, positions_x):
    """A smooth 3-channel field sampled at the given grid coordinates: (1, H*W, 3)."""
    y, x = torch.meshgrid(positions_y, positions_x, indexing="ij")
    channels = [torch.sin(0.15 * x + 0.1 * y), torch.cos(0.12 * y) * 0.5, 0.05 * x - 0.02 * y]
    return torch.stack(channels, -1).reshape(1, grid[0] * grid[1], 3)


@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_same_grid_is_identity(method):
    pos = torch.randn(1, 1 + 7 * 5, 16)
    assert torch.equal(resample_pos_embed(pos, (7, 5), (7, 5), 1, method), pos)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_smooth_field_is_resampled_accurately_pixel_centres(method):
    """align_corners=False: cell i of an n-grid sits at (i + 0.5) / n of the image."""
    old, new = (12, 16), (18, 24)

    def coords(n, scale):
        return (torch.arange(n) + 0.5) * scale - 0.5

    source = smooth_field(old, coords(old[0], 1.0), coords(old[1], 1.0))
    expected = smooth_field(new, coords(new[0], old[0] / new[0]), coords(new[1], old[1] / new[1]))
    pos = torch.cat([torch.full((1, 1, 3), 7.0), source], dim=1)
    out = resample_pos_embed(pos, new, old, 1, method)
    assert torch.equal(out[:, :1], pos[:, :1])  # the class slot is untouched
    inner = expected.reshape(1, *new, 3)[:, 2:-2, 2:-2]  # borders extrapolate; compare the interior
    result = out[:, 1:].reshape(1, *new, 3)[:, 2:-2, 2:-2]
    # torch's bicubic uses a=-0.75, which reproduces constants but not linear ramps exactly.
    assert (result - inner).abs().max() < (1.5e-2 if method == "bicubic" else 5e-3)


def test_align_corners_matches_zoom_order_1():
    """bilinear_align_corners maps corner to corner, as scipy.ndimage.zoom(order=1) in vit_jax."""
    old, new = (4, 4), (7, 10)
    positions = [torch.linspace(0, old[i] - 1, new[i]) for i in range(2)]
    linear = lambda y, x: 2 * x - 3 * y + 1  # noqa: E731 - bilinear reproduces linear fields exactly
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    source = linear(ys, xs).reshape(1, 16, 1)
    ys, xs = torch.meshgrid(*positions, indexing="ij")
    out = resample_pos_embed(source, new, old, 0, "bilinear_align_corners")
    torch.testing.assert_close(out, linear(ys, xs).reshape(1, 70, 1))


def test_every_method_gives_its_own_result():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    results = {m: resample_pos_embed(pos, (24, 24), method=m) for m in RESAMPLE_METHODS}
    # torch's antialiased bicubic is a separate kernel (PIL's a=-0.5), so it differs even upsampling.
    assert not torch.allclose(results["bicubic"], results["bicubic_antialias"])
    assert not torch.allclose(results["bicubic"], results["bilinear"])
    assert not torch.allclose(results["bilinear"], results["bilinear_align_corners"])
    down = {m: resample_pos_embed(pos, (7, 7), method=m) for m in ("bicubic", "bicubic_antialias")}
    assert not torch.allclose(down["bicubic"], down["bicubic_antialias"])


def test_resample_keeps_dtype_and_rejects_bad_input():
    pos = torch.randn(1, 1 + 16, 8, dtype=torch.bfloat16)
    assert resample_pos_embed(pos, (6, 6)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
    with pytest.raises(ValueError, match="unknown"):
        resample_pos_embed(pos, (6, 6), method="nearest")
    with pytest.raises(ValueError, match="does not hold"):
        resample_pos_embed(pos, (6, 6), old_grid=(3, 4))


def test_sincos_values_and_similarity_peaks_at_itself():
    emb = sincos_2d((5, 7), 32)
    assert emb.shape == (35, 32)
    # Row 0 is position (0, 0): sin 0 = 0, cos 0 = 1 in each quarter.
    assert torch.equal(emb[0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    # Position (y=2, x=3), first frequency 1: sin(3), cos(3), sin(2), cos(2).
    row = emb[2 * 7 + 3]
    assert math.isclose(row[0].item(), math.sin(3), abs_tol=1e-6) and math.isclose(
        row[8].item(), math.cos(3), abs_tol=1e-6
    )
    assert math.isclose(row[16].item(), math.sin(2), abs_tol=1e-6)
    similarity = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    assert torch.equal(similarity.argmax(dim=1), torch.arange(35))
