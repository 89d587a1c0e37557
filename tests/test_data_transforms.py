"""Tensor transforms and mixup: shapes, exact geometry, agreement with PIL, seeding, soft targets."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vitkit.data import transforms as T
from vitkit.data.loader import DataConfig
from vitkit.data.mixup import Mixup, cutmix_box, one_hot, soft_target_cross_entropy
from vitkit.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD


def random_image(height: int = 24, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (3, height, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("auto_augment", ["none", "randaugment", "3aug"])
def test_train_pipeline_gives_normalised_float_of_the_target_size(auto_augment: str) -> None:
    cfg = DataConfig(img_size=16, auto_augment=auto_augment, color_jitter=0.3)
    pipeline = T.build_transforms(cfg, train=True)
    for seed in range(8):
        out = pipeline(random_image(20 + seed, 30), seeded(seed))
        assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
        assert out.min() >= -1 and out.max() <= 1  # mean = std = 0.5 maps 0..255 to [-1, 1]


def test_pipelines_are_reproducible_from_the_generator() -> None:
    cfg = DataConfig(img_size=16, auto_augment="randaugment", color_jitter=0.4, random_erasing=0.5)
    pipeline = T.build_transforms(cfg, train=True)
    image = random_image()
    first = pipeline(image, seeded(1))
    assert torch.equal(first, pipeline(image, seeded(1)))
    assert not torch.equal(first, pipeline(image, seeded(2)))
    # Without a generator the global RNG is used, so torch.manual_seed reproduces it.
    torch.manual_seed(3)
    global_first = pipeline(image)
    torch.manual_seed(3)
    assert torch.equal(global_first, pipeline(image))


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_eval_pipelines_are_deterministic(resize: str) -> None:
    pipeline = T.build_transforms(DataConfig(img_size=16, eval_resize=resize), train=False)
    image = random_image(20, 30)
    out = pipeline(image, seeded(0))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, pipeline(image, seeded(1)))


def test_flip_is_an_exact_mirror() -> None:
    image = random_image()
    assert torch.equal(T.RandomHorizontalFlip(1.0)(image), image[:, :, torch.arange(31, -1, -1)])
    assert torch.equal(T.RandomHorizontalFlip(0.0)(image), image)
    flips = [torch.equal(T.RandomHorizontalFlip()(image, seeded(s)), image) for s in range(200)]
    assert 70 < sum(flips) < 130


def test_center_crop_matches_a_hand_computation() -> None:
    image = torch.arange(3 * 16 * 32, dtype=torch.int32).reshape(3, 16, 32).to(torch.uint8)
    # Shorter side 16 = floor(8 / 0.5): no resize; the window starts at (16-8)/2 = 4 and (32-8)/2 = 12.
    out = T.ResizeCenterCrop(8, crop_pct=0.5)(image)
    assert torch.equal(out, image[:, 4:12, 12:20])
    # Offsets round as torchvision: (7 - 4) / 2 = 1.5 rounds to 2.
    assert torch.equal(T.center_crop(image[:, :7, :7], 4), image[:, 2:6, 2:6])
    assert T.center_crop(image[:, :3, :5], 4).shape == (3, 4, 4)  # zero-padded when too small


def test_eval_crop_resizes_the_shorter_side_to_size_over_crop_pct() -> None:
    # A 40 x 80 image whose left half is black: the shorter side goes to floor(16 / 0.8) = 20, the
    # longer to 40, and the centre 16 x 16 straddles the boundary in the middle.
    image = torch.zeros((3, 40, 80), dtype=torch.uint8)
    image[:, :, 40:] = 255
    out = T.ResizeCenterCrop(16, crop_pct=0.8)(image)
    assert out.shape == (3, 16, 16)
    assert (out[:, :, :6] == 0).all() and (out[:, :, -6:] == 255).all()
    squashed = T.SquashResize(16)(image)
    assert squashed.shape == (3, 16, 16)
    assert (squashed[:, :, :6] == 0).all() and (squashed[:, :, -6:] == 255).all()
    # Squash keeps the whole width: the boundary stays in the middle, as with the crop above.
    assert (squashed[:, :, 8:] >= 128).all() and (squashed[:, :, :8] < 128).all()


def test_resize_agrees_with_pil_bicubic() -> None:
    smooth = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (48, 36), Image.BICUBIC
    )
    tensor = torch.from_numpy(np.array(smooth)).permute(2, 0, 1)
    for size in [(20, 24), (72, 96)]:
        ours = T.resize(tensor, size).permute(1, 2, 0).numpy().astype(int)
        theirs = np.array(smooth.resize(size[::-1], Image.BICUBIC)).astype(int)
        assert np.abs(ours - theirs).max() <= 1
    constant = torch.full((3, 10, 14), 77, dtype=torch.uint8)
    assert (T.resize(constant, (5, 9)) == 77).all()


def test_random_resized_crop_boxes_respect_scale_and_ratio() -> None:
    crop = T.RandomResizedCrop(8, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    for seed in range(100):
        top, left, height, width = crop.box(60, 80, seeded(seed))
        assert top >= 0 and top + height <= 60 and left >= 0 and left + width <= 80
        assert 0.2 * 0.9 <= height * width / (60 * 80) <= 0.6 * 1.1
        assert 0.5 * 0.9 <= width / height <= 2.0 * 1.1
    image = random_image(16, 16)
    assert torch.equal(T.RandomResizedCrop(16, scale=(1, 1), ratio=(1, 1))(image, seeded(0)), image)


def test_randaugment_ops_keep_shape_and_are_identity_at_zero_magnitude() -> None:
    image = random_image() // 2 + 40  # not the full range, so that AutoContrast has work to do
    augment = T.RandAugment()
    changes_at_zero = {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing"}
    for name in T.RAND_AUGMENT_OPS:
        strong = augment.apply(name, image, 1.0, seeded(0))
        assert strong.dtype == torch.uint8 and strong.shape == image.shape, name
        assert not torch.equal(strong, image), name
        if name not in changes_at_zero:
            assert torch.equal(augment.apply(name, image, 0.0, seeded(0)), image), name
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        augment.apply("Cutout", image, 0.5)


def test_colour_ops_match_pil() -> None:
    image = random_image(12, 16) // 3 + 20
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())

    def as_tensor(picture: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1)

    assert torch.equal(T.equalize(image), as_tensor(ImageOps.equalize(pil)))
    assert torch.equal(T.auto_contrast(image), as_tensor(ImageOps.autocontrast(pil)))
    assert torch.equal(T.solarize(image, 100), as_tensor(ImageOps.solarize(pil, 100)))
    assert torch.equal(T.posterize(image, 2), as_tensor(ImageOps.posterize(pil, 2)))
    assert torch.equal(T.invert(image), as_tensor(ImageOps.invert(pil)))
    gray = T.grayscale(image)[0].int() - torch.from_numpy(np.array(pil.convert("L"))).int()
    assert gray.abs().max() <= 1


def test_rotation_by_90_degrees_is_exact_and_counter_clockwise() -> None:
    image = random_image(16, 16)
    rotated = T.rotate(image, 90, fill=(0, 0, 0), interpolation="bicubic")
    assert torch.equal(rotated, torch.rot90(image, 1, dims=(1, 2)))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).rotate(90)
    assert torch.equal(rotated, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_translation_fills_uncovered_pixels() -> None:
    image = random_image(8, 10)
    shifted = T.affine(image, (1, 0, 3, 0, 1, 0), fill=(1, 2, 3), interpolation="bilinear")
    assert torch.equal(shifted[:, :, :7], image[:, :, 3:])
    assert torch.equal(
        shifted[:, :, 7:], torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None].expand(3, 8, 3)
    )


def test_three_augment_gives_grayscale_solarize_or_blur() -> None:
    image = random_image()
    kinds = set()
    for seed in range(30):
        out = T.ThreeAugment()(image, seeded(seed))
        assert out.shape == image.shape and out.dtype == torch.uint8
        if torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]):
            kinds.add("grayscale")
        elif torch.equal(out, T.solarize(image, 128)):
            kinds.add("solarize")
        else:
            kinds.add("blur")
            assert out.float().std() < image.float().std()
    assert kinds == {"grayscale", "solarize", "blur"}


def test_color_jitter_of_zero_strength_is_identity() -> None:
    image = random_image()
    assert torch.equal(T.ColorJitter(0, 0, 0)(image, seeded(0)), image)
    assert not torch.equal(T.ColorJitter(0.4, 0.4, 0.4)(image, seeded(0)), image)


def test_random_erasing_replaces_one_box() -> None:
    image = torch.zeros((3, 32, 32))
    assert torch.equal(T.RandomErasing(prob=0.0)(image, seeded(0)), image)
    for seed in range(20):
        erased = T.RandomErasing(prob=1.0)(image, seeded(seed))
        changed = (erased != 0).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert changed.sum() == box  # one solid rectangle
        assert 0.02 * 0.8 <= box / 32**2 <= 1 / 3 * 1.2


def test_normalize_maps_to_the_configured_statistics() -> None:
    image = torch.tensor([0, 255, 51], dtype=torch.uint8).reshape(3, 1, 1).expand(3, 2, 2)
    out = T.Normalize()(image)
    assert torch.allclose(out[:, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    imagenet = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(image)
    assert imagenet[0, 0, 0].item() == pytest.approx(-0.485 / 0.229)


# Mixup --------------------------------------------------------------------------------------------


def batch(size: int = 4, num_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant i, so every output pixel tells which input it came from."""
    images = torch.arange(size, dtype=torch.float32)[:, None, None, None].expand(size, 3, 10, 20).clone()
    return images, torch.arange(size) % num_classes


def test_mixup_with_lam_one_is_identity() -> None:
    images, labels = batch()
    mixup = Mixup(5, label_smoothing=0.0)
    for use_cutmix in (False, True):
        mixed, targets = mixup.mix(images, labels, 1.0, use_cutmix)
        assert torch.equal(mixed, images)
        assert torch.equal(targets, F.one_hot(labels, 5).float())


def test_mixup_blends_each_image_with_its_mirror() -> None:
    images, labels = batch()
    mixed, targets = Mixup(5, label_smoothing=0.0).mix(images, labels, 0.3, use_cutmix=False)
    assert torch.allclose(mixed, 0.3 * images + 0.7 * images.flip(0))
    assert targets[0, 0] == pytest.approx(0.3) and targets[0, 3] == pytest.approx(0.7)


def test_cutmix_box_area_matches_lambda() -> None:
    images, labels = batch()
    for seed in range(20):
        mixed, targets = Mixup(5, label_smoothing=0.0).mix(
            images, labels, 0.6, use_cutmix=True, generator=seeded(seed)
        )
        from_mirror = (mixed[0] == 3).float().mean().item()  # image 0's partner is image 3
        assert targets[0, 3].item() == pytest.approx(from_mirror)
        assert targets[0, 0].item() == pytest.approx(1 - from_mirror)
    # The box has sides sqrt(1 - lam) of the image's, so when no border clips it lam is exact.
    boxes = [cutmix_box(100, 100, 0.75, seeded(seed)) for seed in range(50)]
    for (top, bottom, left, right), lam in boxes:
        assert lam == 1 - (bottom - top) * (right - left) / 100**2 >= 0.75
    inside = [
        lam
        for (top, bottom, left, right), lam in boxes
        if top > 0 and left > 0 and bottom < 100 and right < 100
    ]
    assert inside and all(lam == 0.75 for lam in inside)


def test_soft_targets_sum_to_one_and_carry_label_smoothing() -> None:
    images, labels = batch(6)
    mixup = Mixup(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for seed in range(10):
        mixed, targets = mixup(images, labels, seeded(seed))
        assert mixed.shape == images.shape and targets.shape == (6, 5)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        assert targets.min() >= 0.1 / 5 - 1e-6
    smoothing_only = Mixup(5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    same, smoothed = smoothing_only(images, labels, seeded(0))
    assert torch.equal(same, images)
    assert torch.allclose(smoothed, one_hot(labels, 5, 0.1))
    assert smoothed[0, 0].item() == pytest.approx(0.9 + 0.02)
    first = mixup(images, labels, seeded(7))
    second = mixup(images, labels, seeded(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_soft_target_cross_entropy_matches_torch() -> None:
    logits = torch.randn(6, 5, generator=seeded(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert soft_target_cross_entropy(logits, one_hot(labels, 5)).item() == pytest.approx(
        F.cross_entropy(logits, labels).item()
    )
    assert soft_target_cross_entropy(logits, one_hot(labels, 5, 0.1)).item() == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.1).item()
    )
    assert math.isfinite(soft_target_cross_entropy(logits * 100, one_hot(labels, 5)).item())
