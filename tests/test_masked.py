"""Masked-patch pre-training: corruption counts, blockwise masks, targets, locality and learning."""

import pytest
import torch
import torch.nn as nn

from helpers import tiny_config
from vitkit.models.masked import (
    MaskedConfig,
    MaskedPatchModel,
    apply_corruption,
    blockwise_mask,
    mask_pixels,
    mean_colour_targets,
    normalized_pixel_targets,
    patchify,
    tokenizer_targets,
    unpatchify,
    vit_corruption,
)
from vitkit.models.vit import VisionTransformer


def test_vit_corruption_counts_match_hand_computation():
    # 16 patches: 0.5 * 16 = 8 corrupted; 0.8 * 8 = 6.4 -> 6 mask tokens; 0.1 * 8 = 0.8 -> 1 other
    # patch; 8 - 6 - 1 = 1 kept as is.
    corruption = vit_corruption(50, 16, generator=torch.Generator().manual_seed(0))
    assert corruption.corrupted.sum(1).tolist() == [8] * 50
    assert corruption.masked.sum(1).tolist() == [6] * 50
    assert corruption.replaced.sum(1).tolist() == [1] * 50
    kept = corruption.corrupted & ~corruption.masked & ~corruption.replaced
    assert kept.sum(1).tolist() == [1] * 50
    assert not (corruption.masked & ~corruption.corrupted).any()
    # 196 patches (ViT-B/16 at 224): 98 corrupted, 78.4 -> 78 masked, 9.8 -> 10 replaced, 10 kept.
    big = vit_corruption(2, 196, generator=torch.Generator().manual_seed(0))
    assert big.corrupted.sum(1).tolist() == [98, 98]
    assert big.masked.sum(1).tolist() == [78, 78]
    assert big.replaced.sum(1).tolist() == [10, 10]


def test_vit_corruption_is_uniform_and_sources_are_other_patches():
    corruption = vit_corruption(4000, 16, generator=torch.Generator().manual_seed(1))
    per_position = corruption.corrupted.float().mean(0)
    torch.testing.assert_close(per_position, torch.full((16,), 0.5), atol=0.03, rtol=0)
    own = torch.arange(4000 * 16).reshape(4000, 16)
    assert (corruption.source[corruption.replaced] != own[corruption.replaced]).all()
    assert (corruption.source[~corruption.replaced] == own[~corruption.replaced]).all()


def test_apply_corruption_replaces_exactly_as_planned():
    tokens = torch.randn(3, 16, 8)
    mask_token = torch.randn(1, 1, 8)
    corruption = vit_corruption(3, 16, generator=torch.Generator().manual_seed(2))
    out = apply_corruption(tokens, corruption, mask_token)
    flat = tokens.reshape(48, 8)
    for b in range(3):
        for i in range(16):
            if corruption.masked[b, i]:
                expected = mask_token[0, 0]
            elif corruption.replaced[b, i]:
                expected = flat[corruption.source[b, i]]
            else:
                expected = tokens[b, i]
            assert torch.equal(out[b, i], expected)


def test_blockwise_mask_counts_and_blocks():
    generator = torch.Generator().manual_seed(0)
    # BeiT's setting: 75 of 14 x 14 patches, blocks of at least 16.
    masks = blockwise_mask(64, (14, 14), 75, generator=generator)
    counts = masks.sum(1)
    assert counts.max() <= 75 and counts.float().mean() > 70

    # Blocks, not scattered patches: a block of >= 16 patches with aspect ratio <= 1/0.3 is at least
    # 2 patches wide, so every masked patch has >= 2 masked 4-neighbours; under a uniform random mask
    # of the same size (density 0.38) that holds for only about half of them.
    def clustered_fraction(mask: torch.Tensor) -> float:
        grid = mask.reshape(-1, 14, 14).float()
        padded = nn.functional.pad(grid, (1, 1, 1, 1))
        neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        return ((neighbours >= 2) & (grid > 0)).sum().item() / grid.sum().item()

    random = torch.rand(64, 196, generator=generator).argsort(1) < 75
    assert clustered_fraction(masks) > 0.95
    assert clustered_fraction(random) < 0.6


@pytest.mark.parametrize("grid,num_masked,min_block", [((4, 4), 6, 2), ((6, 10), 24, 16), ((8, 8), 12, 12)])
def test_blockwise_mask_never_exceeds_its_budget(grid, num_masked, min_block):
    masks = blockwise_mask(200, grid, num_masked, min_block, generator=torch.Generator().manual_seed(3))
    counts = masks.sum(1)
    assert masks.shape == (200, grid[0] * grid[1])
    assert counts.max() <= num_masked
    assert (counts == num_masked).float().mean() > 0.5


def test_mean_colour_targets_match_hand_computation():
    # Pixels in [0, 1]; the model sees (x - 0.5) / 0.5. Two 4x4 patches side by side.
    pixels = torch.zeros(1, 3, 4, 8)
    pixels[0, :, :, :4] = torch.tensor([0.30, 0.60, 0.95]).view(3, 1, 1)
    pixels[0, 0, :2, 4:] = 1.0  # red mean 0.5
    pixels[0, 1, :, 4:] = 1.0  # green mean 1.0: level 8 clamps to 7
    pixels[0, 2, :, 4:] = 0.124  # blue just under 1/8
    targets = mean_colour_targets((pixels - 0.5) / 0.5, patch_size=4)
    # floor(0.30 * 8) = 2, floor(0.60 * 8) = 4, floor(0.95 * 8) = 7 -> 2 * 64 + 4 * 8 + 7 = 167;
    # floor(0.5 * 8) = 4, 7, floor(0.992) = 0 -> 4 * 64 + 7 * 8 + 0 = 312.
    assert targets.tolist() == [[167, 312]]
    assert mean_colour_targets(torch.ones(1, 3, 4, 4), 4).item() == 511
    assert mean_colour_targets(-torch.ones(1, 3, 4, 4), 4).item() == 0


def test_patchify_round_trip_and_pixel_targets():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    assert torch.equal(unpatchify(patches, 8, (2, 3)), images)
    assert torch.equal(patches[1, 4].reshape(8, 8, 3).permute(2, 0, 1), images[1, :, 8:16, 8:16])
    normalised = normalized_pixel_targets(images, 8)
    torch.testing.assert_close(normalised.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(-1), torch.ones(2, 6), atol=1e-4, rtol=0)


@pytest.mark.parametrize("stem", ["patch", "hmlp"])
@pytest.mark.parametrize("masking", ["vit", "blockwise"])
def test_masking_before_or_after_the_stem_gives_the_same_result(stem, masking):
    # Zeroing a masked patch's pixels changes only its own token, which the mask token replaces
    # anyway; so the encoder's output is the same whichever side of the stem the mask is applied.
    torch.manual_seed(0)
    config = tiny_config(stem=stem, img_size=64, patch_size=16, num_classes=0)
    model = MaskedPatchModel(
        VisionTransformer(config),
        MaskedConfig(masking=masking, mask_token_fraction=1.0, random_patch_fraction=0, min_block_patches=2),
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    corruption = model.corrupt(2, (4, 4), torch.Generator().manual_seed(0))
    assert corruption.masked.any()
    after = model.forward_encoder(images, corruption)
    before = model.forward_encoder(mask_pixels(images, corruption.masked, 16, fill=3.0), corruption)
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)
    # A stem that mixes patches (a 3x3 convolution over the token grid) would not pass this test:
    # the same check on the raw stem outputs shows the unmasked tokens did change only at masked spots.
    tokens, _ = model.encoder.embed_patches(images)
    masked_tokens, _ = model.encoder.embed_patches(mask_pixels(images, corruption.masked, 16, fill=3.0))
    changed = (tokens - masked_tokens).abs().sum(-1) > 0
    assert torch.equal(changed, corruption.masked)


class CodebookTokenizer(nn.Module):
    """A stand-in for a dVAE: the nearest of 8 random codes to each 8x8 patch's mean colour."""

    def __init__(self, patch_size: int = 8):
        super().__init__()
        self.patch_size = patch_size
        self.codes = nn.Parameter(torch.randn(8, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colours = nn.functional.avg_pool2d(images, self.patch_size).flatten(2).transpose(1, 2)  # (B, L, 3)
        return -torch.cdist(colours, self.codes[None].expand(len(images), -1, -1))  # (B, L, 8) logits


@pytest.mark.parametrize(
    "masked",
    [
        MaskedConfig(),
        MaskedConfig(masking="blockwise", target="pixels", mask_ratio=0.4, min_block_patches=2),
        MaskedConfig(masking="blockwise", target="tokens", vocab_size=8, mask_ratio=0.4, min_block_patches=2),
    ],
    ids=["vit-colour", "beit-pixels", "beit-tokens"],
)
@pytest.mark.parametrize("stem", ["patch", "hmlp"])
def test_pretraining_learns_and_every_parameter_gets_a_gradient(masked, stem):
    torch.manual_seed(0)
    patch = 16 if stem == "hmlp" else 8
    config = tiny_config(stem=stem, patch_size=patch, img_size=4 * patch, num_classes=0)
    tokenizer = CodebookTokenizer(patch) if masked.target == "tokens" else None
    model = MaskedPatchModel(VisionTransformer(config), masked, tokenizer=tokenizer)
    # Smooth images: each patch's colour is predictable from its neighbours.
    images = nn.functional.interpolate(torch.rand(8, 3, 2, 2) * 2 - 1, size=4 * patch, mode="bilinear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(25):
        loss, metrics = model(images, torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            silent = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            # Only the class token and the unused classifier see no gradient (nothing reads them).
            assert all(n.startswith(("encoder.cls_token", "encoder.head")) for n in silent), silent
        optimizer.step()
        losses.append(loss.item())
    assert metrics["corrupted_fraction"] > 0.2
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    if tokenizer is not None:
        assert not any(p.requires_grad for p in tokenizer.parameters())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="target"):
        MaskedConfig(target="depth")
    with pytest.raises(ValueError, match="vocab_size"):
        MaskedConfig(target="tokens")
    with pytest.raises(TypeError, match="mask_ration"):
        MaskedConfig.from_dict({"mask_ration": 0.5})
    hybrid = tiny_config(stem="hybrid", hybrid_layers=(1,), patch_size=1, img_size=32, num_classes=0)
    with pytest.raises(ValueError, match="hybrid"):
        MaskedPatchModel(VisionTransformer(hybrid), MaskedConfig())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        MaskedPatchModel(VisionTransformer(tiny_config()), MaskedConfig(target="tokens", vocab_size=8))
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="4 tokens per image.*16 patches"):
        tokenizer_targets(CodebookTokenizer(16), images, num_patches=16, vocab_size=8)
    with pytest.raises(ValueError, match="outside vocab_size=4"):
        tokenizer_targets(lambda x: torch.full((2, 4, 4), 9), images, num_patches=16, vocab_size=4)
