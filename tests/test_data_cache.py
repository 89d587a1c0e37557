"""The decoded-image cache, the classic CIFAR pad-and-crop, and batch augmentation in the loader."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitkit.data import cache as cache_module
from vitkit.data.cache import CachedImages
from vitkit.data.datasets import ImageFolder, decode_image
from vitkit.data.loader import DataConfig, build_loader
from vitkit.data.transforms import Normalize, RandomPadCrop, build_transforms, crop_batch, pad_crop_flip_batch


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Twelve random 8x8 PNGs in three classes under images/train."""
    rng = np.random.default_rng(0)
    for number in range(12):
        folder = tmp_path / "images" / "train" / f"class{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{number}.png")
    return tmp_path / "images"


def test_cache_holds_the_decoded_images_and_reloads_them_from_its_file(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ImageFolder(image_folder / "train")
    cached = CachedImages(folder, cache_dir=tmp_path / "cache", name="train")
    assert cached.images.shape == (12, 3, 8, 8) and cached.images.dtype == torch.uint8
    assert cached.targets == folder.targets and cached.classes == folder.classes
    for index, (path, label) in enumerate(folder.samples):
        image, target = cached[index]
        assert torch.equal(image, decode_image(path)) and target == label
    (cache_file,) = (tmp_path / "cache").glob("train-*.npy")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache file was there")

    monkeypatch.setattr(cache_module, "decode_all", no_decoding)
    again = CachedImages(folder, cache_dir=tmp_path / "cache", name="train")
    assert torch.equal(again.images, cached.images)
    # A changed file changes the fingerprint: the stale cache file is not used.
    path = Path(folder.samples[0][0])
    os.utime(path, ns=(0, 0))
    with pytest.raises(AssertionError, match="decoded again"):
        CachedImages(ImageFolder(image_folder / "train"), cache_dir=tmp_path / "cache", name="train")
    # A cache file of the wrong shape is refused by name.
    monkeypatch.undo()
    key = cache_module.fingerprint(ImageFolder(image_folder / "train"))
    np.save(tmp_path / "cache" / f"train-{key}.npy", np.zeros((3, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=rf"train-{key}\.npy.*12 uint8"):
        CachedImages(ImageFolder(image_folder / "train"), cache_dir=tmp_path / "cache", name="train")
    assert cache_file.exists()


def test_cache_refuses_images_of_different_sizes_naming_the_file(image_folder: Path) -> None:
    odd = image_folder / "train" / "class1" / "odd.png"
    Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(odd)
    with pytest.raises(ValueError, match=r"odd\.png has shape \(3, 6, 9\)"):
        CachedImages(ImageFolder(image_folder / "train"))


def test_batch_crop_equals_per_image_windows_and_flips() -> None:
    images = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8)
    tops, lefts = torch.tensor([0, 4, 2, 1, 4]), torch.tensor([0, 2, 1, 2, 0])
    flips = torch.tensor([False, True, False, True, True])
    crops = crop_batch(images, tops, lefts, flips, 8)
    for i in range(5):
        window = images[i, :, tops[i] : tops[i] + 8, lefts[i] : lefts[i] + 8]
        assert torch.equal(crops[i], window.flip(-1) if flips[i] else window)


def test_pad_crop_is_a_shift_of_the_zero_padded_image() -> None:
    image = torch.randint(1, 256, (3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    padded = F.pad(image, (2,) * 4)
    windows = {padded[:, t : t + 8, s : s + 8].numpy().tobytes() for t in range(5) for s in range(5)}
    flipped = {
        np.ascontiguousarray(np.flip(np.frombuffer(w, np.uint8).reshape(3, 8, 8), -1)).tobytes()
        for w in windows
    }
    generator = torch.Generator().manual_seed(0)
    crops = [RandomPadCrop(8, 2)(image, generator) for _ in range(40)]
    assert {crop.numpy().tobytes() for crop in crops} <= windows and len(
        {c.numpy().tobytes() for c in crops}
    ) > 5
    batch = pad_crop_flip_batch(image.expand(40, -1, -1, -1), 8, 2, 0.5, generator)
    seen = {crop.numpy().tobytes() for crop in batch}
    assert seen <= windows | flipped and seen & (flipped - windows)


def test_config_checks_batch_augment_and_cache() -> None:
    with pytest.raises(ValueError, match="batch_augment needs cache"):
        DataConfig(batch_augment=True, train_crop="pad")
    with pytest.raises(ValueError, match="batch_augment needs"):
        DataConfig(batch_augment=True, cache=True, train_crop="pad", auto_augment="randaugment")
    with pytest.raises(ValueError, match="cache does not apply"):
        DataConfig(dataset="shards", root="x", cache=True)
    with pytest.raises(ValueError, match="train_crop"):
        DataConfig(train_crop="random")
    pipeline = build_transforms(DataConfig(img_size=8, train_crop="pad", crop_padding=2), train=True)
    assert pipeline(torch.zeros((3, 8, 8), dtype=torch.uint8)).shape == (3, 8, 8)


def test_batch_augment_loader_is_seeded_resumable_and_keeps_labels() -> None:
    cfg = DataConfig(
        dataset="synthetic",
        synthetic_size=48,
        img_size=8,
        batch_size=4,
        num_workers=0,
        cache=True,
        train_crop="pad",
        crop_padding=2,
        batch_augment=True,
        val_fraction=0.25,
    )
    loader = build_loader(cfg, "train", epoch=1)
    assert len(loader) == 9
    batches = [(images.clone(), labels.clone()) for images, labels in loader]
    assert batches[0][0].shape == (4, 3, 8, 8) and batches[0][0].dtype == torch.float32
    again = [(images.clone(), labels.clone()) for images, labels in build_loader(cfg, "train", epoch=1)]
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True)
    )
    other_epoch = next(iter(build_loader(cfg, "train", epoch=2)))
    assert not torch.equal(other_epoch[0], batches[0][0])
    resumed = list(build_loader(cfg, "train", epoch=1, start_index=3 * 4))
    assert len(resumed) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[3:], resumed, strict=True))
    # Every image is a (possibly mirrored) shifted window of the held-in sample its label belongs to.
    train_set = build_loader(cfg.replace(batch_augment=False), "train").dataset  # Subset of CachedImages
    sources = train_set.dataset.images[train_set.indices]
    labels = torch.as_tensor(train_set.dataset.targets)[train_set.indices]
    # All (source, shift, flip) windows, normalised: (N * 25 * 2, 3, 8, 8), with their labels.
    padded = F.pad(sources, (2,) * 4)
    windows = torch.stack([padded[:, :, t : t + 8, s : s + 8] for t in range(5) for s in range(5)], dim=1)
    windows = torch.stack([windows, windows.flip(-1)], dim=2).flatten(0, 2)
    windows = Normalize(cfg.mean, cfg.std)(windows)
    window_labels = labels.repeat_interleave(50)
    for images, batch_labels in batches:
        distance = (images[:, None] - windows[None]).abs().flatten(2).amax(-1)  # (B, windows)
        for row, label in zip(distance, batch_labels, strict=True):
            assert set(window_labels[row < 1e-6].tolist()) == {int(label)}
