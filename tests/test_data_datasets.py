"""Data sets: ImageFolder's colour modes and hostile files, digits, synthetic, tar shards, CIFAR-10."""

import json
import logging
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitkit.data.datasets import (
    BadImageError,
    ImageFolder,
    ShardDataset,
    Synthetic,
    Unreadable,
    decode_image,
    stratified_split,
    write_shards,
)
from vitkit.data.digits import Digits

CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand, so its header can declare anything (16-bit RGB, a bomb's size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw_rows))
        + chunk(b"IEND", b"")
    )


def rgb(value: int, size: int = 6) -> np.ndarray:
    """A small image whose pixels all differ, offset by `value` so images are told apart."""
    pixels = (np.arange(size * size * 3).reshape(size, size, 3) * 5 + value) % 256
    return pixels.astype(np.uint8)


def write_hostile_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        name: folder / name for name in ("empty.jpg", "truncated.jpg", "text.jpg", "bomb.png", "gif.png")
    }
    paths["empty.jpg"].write_bytes(b"")
    jpeg = folder / "whole.jpg"
    Image.fromarray(rgb(0, 64)).save(jpeg, quality=95)
    paths["truncated.jpg"].write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    jpeg.unlink()
    paths["text.jpg"].write_text("not an image at all\n")
    # 100000 x 100000 pixels declared in 60 bytes: Pillow's bomb guard must refuse it at open.
    paths["bomb.png"].write_bytes(png_bytes(100_000, 100_000, 8, 2, b""))
    # A valid GIF, but GIF is not an accepted format, whatever the file is called.
    Image.fromarray(rgb(0)).save(paths["gif.png"], format="GIF")
    return paths


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Two classes (created in reverse order) holding every accepted format and colour mode."""
    root = tmp_path / "folder"
    (root / "zebra").mkdir(parents=True)
    (root / "apple" / "nested").mkdir(parents=True)
    Image.fromarray(rgb(1)).save(root / "apple" / "a.png")
    Image.fromarray(rgb(2)).save(root / "apple" / "b.JPG", quality=95)
    Image.fromarray(rgb(3)).save(root / "apple" / "nested" / "c.webp", lossless=True)
    Image.fromarray(rgb(4)).save(root / "apple" / "d.bmp")
    Image.fromarray(rgb(5)[:, :, 0]).save(root / "zebra" / "gray.png")
    Image.fromarray(rgb(6)).convert("P").save(root / "zebra" / "palette.png")
    Image.new("CMYK", (6, 6), (0, 255, 0, 0)).save(root / "zebra" / "cmyk.jpg")
    Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)).save(root / "zebra" / "gray16.png")
    Image.fromarray(np.dstack([rgb(7), np.zeros((6, 6), np.uint8)])).save(root / "zebra" / "rgba.png")
    rows = b"".join(b"\x00" + np.full((6, 3), 40000, dtype=">u2").tobytes() for _ in range(6))
    (root / "zebra" / "rgb16.png").write_bytes(png_bytes(6, 6, 16, 2, rows))
    # Not listed: hidden files (macOS resource forks carry image extensions) and other extensions.
    (root / "zebra" / "._gray.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (root / "zebra" / "notes.txt").write_text("ignored")
    (root / ".hidden_class").mkdir()
    return root


def test_image_folder_reads_every_format_and_mode_as_uint8_rgb(mixed_folder: Path) -> None:
    dataset = ImageFolder(mixed_folder)
    assert dataset.classes == ["apple", "zebra"]
    assert dataset.class_to_idx == {"apple": 0, "zebra": 1}
    names = [Path(path).name for path, _ in dataset.samples]
    assert names == ["a.png", "b.JPG", "d.bmp", "c.webp"] + sorted(
        ["gray.png", "palette.png", "cmyk.jpg", "gray16.png", "rgba.png", "rgb16.png"]
    )
    assert dataset.targets == [0] * 4 + [1] * 6
    by_name = {}
    for index, name in enumerate(names):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 6, 6), name
        assert label == dataset.targets[index]
        by_name[name] = image
    expected = {
        name: torch.from_numpy(rgb(value)).permute(2, 0, 1) for name, value in [("a.png", 1), ("rgba.png", 7)]
    }
    expected["c.webp"] = torch.from_numpy(rgb(3)).permute(2, 0, 1)
    expected["d.bmp"] = torch.from_numpy(rgb(4)).permute(2, 0, 1)
    expected["gray.png"] = torch.from_numpy(rgb(5)[:, :, 0]).expand(3, -1, -1)
    for name, pixels in expected.items():
        assert torch.equal(by_name[name], pixels), name
    # 16-bit values keep their 8 most significant bits (Pillow's convert would clip them to 255).
    assert (by_name["gray16.png"] == 40000 >> 8).all()
    assert (by_name["rgb16.png"] == 40000 >> 8).all()
    assert torch.equal(by_name["cmyk.jpg"][:, 0, 0], torch.tensor([255, 0, 255], dtype=torch.uint8))
    palette = np.array(Image.open(mixed_folder / "zebra" / "palette.png").convert("RGB"))
    assert torch.equal(by_name["palette.png"], torch.from_numpy(palette).permute(2, 0, 1))
    assert dataset.bad_files == []


@pytest.mark.parametrize("declared", [10_000, 100_000], ids=["over-limit-warning", "over-twice-limit-error"])
def test_decompression_bomb_is_a_bad_image(declared: int) -> None:
    # Pillow warns above MAX_IMAGE_PIXELS (~89M) and raises above twice that: both are refused.
    with pytest.raises(BadImageError, match="bomb.png.*[Dd]ecompression"):
        decode_image(png_bytes(declared, declared, 8, 2, b""), name="bomb.png")


def test_hostile_files_are_refused_by_name_in_error_mode(tmp_path: Path) -> None:
    paths = write_hostile_files(tmp_path / "folder" / "class")
    for name, path in paths.items():
        with pytest.raises(BadImageError, match=name) as raised:
            decode_image(path)
        assert raised.value.path == str(path)
    with pytest.raises(BadImageError, match="4 bad file.*empty.jpg.*gif.png.*text.jpg") as raised:
        ImageFolder(tmp_path / "folder", on_bad="error", verify="header")
    assert raised.value.path == str(paths["bomb.png"])
    # Without checks at index time, the load raises a BadImageError naming the file.
    lazy = ImageFolder(tmp_path / "folder", on_bad="error")
    truncated = [index for index, (path, _) in enumerate(lazy.samples) if path.endswith("truncated.jpg")]
    with pytest.raises(BadImageError, match="truncated.jpg.*truncated"):
        lazy[truncated[0]]


def test_hostile_files_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = write_hostile_files(tmp_path / "folder" / "class")
    Image.fromarray(rgb(9)).save(tmp_path / "folder" / "class" / "good.png")
    good = torch.from_numpy(rgb(9)).permute(2, 0, 1)

    with caplog.at_level(logging.WARNING, logger="vitkit.data.datasets"):
        checked = ImageFolder(tmp_path / "folder", verify="header")
    # A truncated JPEG passes the header check; every other hostile file is dropped and named.
    assert {Path(path).name for path, _ in checked.bad_files} == set(bad) - {"truncated.jpg"}
    assert "skipped 4 bad file(s)" in caplog.text
    assert [Path(path).name for path, _ in checked.samples] == ["good.png", "truncated.jpg"]

    full = ImageFolder(tmp_path / "folder", verify="full")
    assert {Path(path).name for path, _ in full.bad_files} == set(bad)
    assert len(full) == 1

    # Unchecked: each bad file found at load time is named, recorded, and returned as Unreadable,
    # never replaced by another sample.
    lazy = ImageFolder(tmp_path / "folder")
    assert len(lazy) == 6
    samples = [lazy[index] for index in range(len(lazy))]
    unreadable = [sample for sample in samples if isinstance(sample, Unreadable)]
    assert sorted(Path(sample.path).name for sample in unreadable) == sorted(bad)
    ((image, label),) = [sample for sample in samples if not isinstance(sample, Unreadable)]
    assert torch.equal(image, good) and label == 0
    assert sorted(Path(path).name for path, _ in lazy.bad_files) == sorted(bad)


def test_bad_file_in_a_worker_raises_a_named_error(tmp_path: Path) -> None:
    write_hostile_files(tmp_path / "folder" / "class")
    dataset = ImageFolder(tmp_path / "folder", on_bad="error")
    with pytest.raises(BadImageError, match=r"bad image .*(bomb|empty|gif|text|truncated)"):
        list(DataLoader(dataset, batch_size=2, num_workers=1))


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.fromarray(rgb(0)).save(tmp_path / "cat" / "x.png")
    with pytest.raises(FileNotFoundError, match="dog"):
        ImageFolder(tmp_path)


def test_digits_split_is_stratified_deterministic_and_uint8() -> None:
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=5)
    train_counts, test_counts = Counter(train.targets), Counter(test.targets)
    for digit in range(10):
        assert test_counts[digit] / (train_counts[digit] + test_counts[digit]) == pytest.approx(0.2, abs=0.02)
    assert train.classes == [str(digit) for digit in range(10)]
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert train.images.max() == 255 and train.images.min() == 0
    again = Digits("train")
    assert torch.equal(again.images, train.images) and again.targets == train.targets
    # The split holds no image twice: every digit image is in exactly one of the two sets.
    from sklearn.datasets import load_digits

    every = {tuple(np.rint(row * 255 / 16).astype(np.uint8)) for row in load_digits().data}
    seen = [
        tuple(dataset.images[i, 0].flatten().tolist())
        for dataset in (train, test)
        for i in range(len(dataset))
    ]
    assert set(seen) == every


def test_stratified_split_partitions_each_class() -> None:
    targets = [0] * 50 + [1] * 30 + [2] * 20
    kept, held_out = stratified_split(targets, 0.2, seed=3)
    assert sorted(kept + held_out) == list(range(100))
    assert Counter(targets[i] for i in held_out) == {0: 10, 1: 6, 2: 4}
    assert stratified_split(targets, 0.2, seed=3) == (kept, held_out)
    assert stratified_split(targets, 0.2, seed=4) != (kept, held_out)


def test_synthetic_is_seeded_and_learnable() -> None:
    train = Synthetic(200, num_classes=4, img_size=8, seed=1)
    test = Synthetic(100, num_classes=4, img_size=8, split="test", seed=1)
    image, label = train[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and label == 1
    assert torch.equal(image, Synthetic(200, num_classes=4, img_size=8, seed=1)[5][0])
    assert not torch.equal(image, Synthetic(200, num_classes=4, img_size=8, seed=2)[5][0])
    assert not torch.equal(train[0][0], test[0][0])
    # The rule is learnable: the nearest class mean of the train set labels the test set.
    train_images = torch.stack([train[i][0] for i in range(len(train))]).float().flatten(1)
    means = torch.stack([train_images[torch.tensor(train.targets) == c].mean(0) for c in range(4)])
    test_images = torch.stack([test[i][0] for i in range(len(test))]).float().flatten(1)
    predicted = torch.cdist(test_images, means).argmin(1)
    assert (predicted == torch.tensor(test.targets)).float().mean() > 0.95


@pytest.fixture
def unique_folder(tmp_path: Path) -> Path:
    """Three classes, 13 PNGs, each image's pixels offset by its own number."""
    root = tmp_path / "unique"
    for number in range(13):
        folder = root / f"class{number % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(number)).save(folder / f"{number:02d}.png")
    return root


def test_shards_stream_every_sample_once_across_ranks_and_workers(
    unique_folder: Path, tmp_path: Path
) -> None:
    shards = write_shards(unique_folder, tmp_path / "shards", max_count_per_shard=2)
    assert [path.name for path in shards] == [f"shard-{i:06d}.tar" for i in range(7)]
    info = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert info["classes"] == ["class0", "class1", "class2"]
    assert info["num_samples"] == 13 and [shard["num_samples"] for shard in info["shards"]] == [2] * 6 + [1]

    expected = Counter()
    folder = ImageFolder(unique_folder)
    for image, label in (folder[i] for i in range(len(folder))):
        expected[(image.numpy().tobytes(), label)] += 1

    def epoch(epoch: int) -> tuple[Counter, list]:
        seen, order = Counter(), []
        for rank in range(2):
            dataset = ShardDataset(tmp_path / "shards", rank=rank, world_size=2, shuffle_buffer=4, seed=5)
            dataset.set_epoch(epoch)
            for images, labels in DataLoader(dataset, batch_size=None, num_workers=2):
                seen[(images.numpy().tobytes(), int(labels))] += 1
                order.append(int(labels))
        return seen, order

    seen, order = epoch(0)
    assert seen == expected
    seen_again, order_again = epoch(0)
    assert seen_again == expected and order_again == order
    seen_next, order_next = epoch(1)
    assert seen_next == expected and order_next != order


def test_shards_skip_or_refuse_a_bad_image(tmp_path: Path) -> None:
    folder = tmp_path / "folder" / "class"
    write_hostile_files(folder)
    Image.fromarray(rgb(1)).save(folder / "good.png")
    # The header check keeps bad files out of the shards, except a truncated JPEG.
    write_shards(tmp_path / "folder", tmp_path / "shards", max_count_per_shard=10)
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["num_samples"] == 2

    skipping = ShardDataset(tmp_path / "shards")
    samples = list(skipping)
    assert [label for _, label in [sample for sample in samples if not isinstance(sample, Unreadable)]] == [0]
    assert [type(sample) for sample in samples].count(Unreadable) == 1
    assert len(skipping.bad_files) == 1 and "truncated" in skipping.bad_files[0][1]
    with pytest.raises(BadImageError, match="shard-000000.tar"):
        list(ShardDataset(tmp_path / "shards", on_bad="error"))


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 not found at {CIFAR10} (shared data absent)")
def test_cifar10_smoke() -> None:
    dataset = ImageFolder(CIFAR10 / "test")
    assert dataset.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert len(dataset) == 10_000
    for index in (0, 4321, 9999):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert label == dataset.targets[index] == index // 1000


def test_digits_read_from_the_bundled_csv_equal_scikit_learns_loader(monkeypatch) -> None:
    """The CSV read directly (no scikit-learn import) gives what `load_digits` gives, and a
    scikit-learn laid out without the CSV falls back to its loader with the same result."""
    import importlib.util

    from sklearn.datasets import load_digits

    from vitkit.data import digits as module

    reference = load_digits()
    for hide_csv in (False, True):
        module._load_digits.cache_clear()
        if hide_csv:
            monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        images, labels = module._load_digits()
        np.testing.assert_array_equal(images, reference.images)
        np.testing.assert_array_equal(labels, reference.target)
    module._load_digits.cache_clear()
