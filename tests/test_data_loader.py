"""The loader: closed config, resumable sampler, seeding across workers/ranks/epochs, shards, resume."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.datasets import write_shards
from vitkit.data.loader import DataConfig, ResumableSampler, build_loader


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(TypeError, match="'mixpu'.*did you mean mixup"):
        DataConfig.from_dict({"mixpu": 0.8})
    with pytest.raises(TypeError, match="unknown DataConfig"):
        DataConfig().replace(crop=0.9)
    with pytest.raises(ValueError, match="auto_augment"):
        DataConfig(auto_augment="autoaugment")
    with pytest.raises(ValueError, match="crop_pct"):
        DataConfig(crop_pct=1.5)
    with pytest.raises(ValueError, match="need a root"):
        DataConfig(dataset="imagefolder")
    with pytest.raises(ValueError, match="mean.*expected 3"):
        DataConfig(mean=(0.5, 0.5))
    cfg = DataConfig.from_dict({"scale": [0.3, 1.0], "mean": [0.485, 0.456, 0.406], "mixup": 0.8})
    assert cfg.scale == (0.3, 1.0) and cfg.mean == (0.485, 0.456, 0.406)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


# The sampler ------------------------------------------------------------------------------------


def epoch_indices(sampler: ResumableSampler) -> list[int]:
    return [index for index, _, _ in sampler]


def test_resumed_epoch_sees_each_remaining_sample_exactly_once() -> None:
    num_samples, world_size, interrupted_at = 40, 2, 12
    seen = Counter()
    for rank in range(world_size):
        before = ResumableSampler(num_samples, shuffle=True, seed=3, rank=rank, world_size=world_size)
        before.set_epoch(5)
        uninterrupted = list(before)
        seen.update(index for index, _, _ in uninterrupted[:interrupted_at])
        # A fresh process resumes: same seed and epoch, starting after the samples already used.
        after = ResumableSampler(num_samples, shuffle=True, seed=3, rank=rank, world_size=world_size)
        after.set_epoch(5)
        after.set_start(interrupted_at)
        assert len(after) == num_samples // world_size - interrupted_at
        resumed = list(after)
        seen.update(index for index, _, _ in resumed)
        assert uninterrupted[interrupted_at:] == resumed
    assert seen == Counter(range(num_samples))


def test_sampler_shuffles_per_seed_and_epoch() -> None:
    sampler = ResumableSampler(50, shuffle=True, seed=0)
    first = epoch_indices(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert epoch_indices(sampler) == first
    sampler.set_epoch(1)
    assert epoch_indices(sampler) != first
    assert epoch_indices(ResumableSampler(50, shuffle=True, seed=1)) != first
    assert epoch_indices(ResumableSampler(50, shuffle=False)) == list(range(50))
    # set_epoch starts the next epoch from its beginning.
    sampler.set_start(10)
    sampler.set_epoch(2)
    assert len(sampler) == 50


def test_padding_gives_equal_ranks_and_eval_sees_each_sample_once() -> None:
    padded = [ResumableSampler(41, shuffle=True, rank=rank, world_size=4) for rank in range(4)]
    assert [len(sampler) for sampler in padded] == [11] * 4
    assert set().union(*(epoch_indices(sampler) for sampler in padded)) == set(range(41))
    unpadded = [ResumableSampler(41, shuffle=False, rank=rank, world_size=4, pad=False) for rank in range(4)]
    assert [len(sampler) for sampler in unpadded] == [11, 10, 10, 10]
    assert sorted(sum((epoch_indices(sampler) for sampler in unpadded), [])) == list(range(41))


def test_repeated_augmentation_sends_each_copy_to_another_rank() -> None:
    samplers = [
        ResumableSampler(12, shuffle=True, rank=rank, world_size=3, num_repeats=3) for rank in range(3)
    ]
    keys = [list(sampler) for sampler in samplers]
    # An epoch keeps its length (12 / 3 per rank), and the 3 copies of a sample go to the 3 ranks.
    assert [len(rank_keys) for rank_keys in keys] == [4] * 3
    indices = [sorted(index for index, _, _ in rank_keys) for rank_keys in keys]
    assert indices[0] == indices[1] == indices[2]
    positions = [position for rank_keys in keys for _, _, position in rank_keys]
    assert len(set(positions)) == 12  # each copy has its own position, so its own augmentation


# The loader -------------------------------------------------------------------------------------


@pytest.fixture
def same_image_folder(tmp_path: Path) -> Path:
    """Twelve copies of one image in two classes: any difference between samples is augmentation."""
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for number in range(12):
        folder = tmp_path / "images" / "train" / f"class{number % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{number}.png")
    return tmp_path / "images"


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), targets.clone()) for images, targets in loader]


def assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for (images, targets), (images_again, targets_again) in zip(first, second, strict=True):
        assert torch.equal(images, images_again) and torch.equal(targets, targets_again)


def test_workers_augment_differently_and_a_seed_reproduces_the_batches(same_image_folder: Path) -> None:
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(same_image_folder),
        img_size=8,
        batch_size=1,
        num_workers=2,
        drop_last=False,
    )
    batches = collect(build_loader(cfg, "train"))
    # Batches alternate between the two workers: the first two come from different ones.
    assert not torch.equal(batches[0][0], batches[1][0])
    assert len({batch[0].numpy().tobytes() for batch in batches}) == 12
    assert_same_batches(batches, collect(build_loader(cfg, "train")))
    # The augmentation follows the sample, not the worker: no workers gives the same batches.
    assert_same_batches(batches, collect(build_loader(cfg.replace(num_workers=0), "train")))
    other_seed = collect(build_loader(cfg.replace(seed=1), "train"))
    assert not torch.equal(batches[0][0], other_seed[0][0])
    next_epoch = collect(build_loader(cfg, "train", epoch=1))
    assert not torch.equal(batches[0][0], next_epoch[0][0])
    ranks = [collect(build_loader(cfg, "train", rank=rank, world_size=2)) for rank in range(2)]
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])


def test_resumed_loader_gives_the_rest_of_the_uninterrupted_epoch() -> None:
    cfg = DataConfig(
        dataset="synthetic",
        synthetic_size=48,
        img_size=8,
        batch_size=4,
        num_workers=0,
        auto_augment="randaugment",
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        random_erasing=0.25,
    )
    loader = build_loader(cfg, "train", epoch=2)
    assert len(loader) == 12
    uninterrupted = collect(loader)
    images, targets = uninterrupted[0]
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    resumed = build_loader(cfg, "train", epoch=2, start_index=5 * 4)
    assert len(resumed) == 7
    assert_same_batches(uninterrupted[5:], collect(resumed))
    # The next epoch starts from its beginning again.
    resumed.set_epoch(3)
    assert len(resumed) == 12


def test_eval_split_across_ranks_sees_each_sample_once() -> None:
    cfg = DataConfig(dataset="digits", batch_size=64, num_workers=0)
    loaders = [build_loader(cfg, "test", rank=rank, world_size=3) for rank in range(3)]
    labels = torch.cat([targets for loader in loaders for _, targets in loader])
    total = len(loaders[0].dataset)
    assert labels.dtype == torch.long and len(labels) == total
    expected = Counter(loaders[0].dataset.targets)
    assert Counter(labels.tolist()) == expected
    images, _ = next(iter(loaders[0]))
    assert images.shape == (64, 3, 32, 32)


def test_val_fraction_holds_out_part_of_train(same_image_folder: Path) -> None:
    cfg = DataConfig(
        dataset="imagefolder", root=str(same_image_folder), val_fraction=0.25, num_workers=0, batch_size=4
    )
    train, val = build_loader(cfg, "train"), build_loader(cfg, "val")
    assert train.classes == val.classes == ["class0", "class1"]
    assert train.class_to_idx == {"class0": 0, "class1": 1} and train.num_classes == 2
    train_indices, val_indices = set(train.dataset.indices), set(val.dataset.indices)
    assert not train_indices & val_indices and len(train_indices | val_indices) == 12
    assert Counter(train.dataset.dataset.targets[i] for i in val_indices) == {0: 2, 1: 2}


def test_shards_loader_streams_once_with_equal_train_steps(tmp_path: Path) -> None:
    for number in range(22):
        folder = tmp_path / "images" / f"class{number % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), number * 10, dtype=np.uint8)).save(folder / f"{number}.png")
    write_shards(tmp_path / "images", tmp_path / "shards" / "train", max_count_per_shard=3)
    write_shards(tmp_path / "images", tmp_path / "shards" / "test", max_count_per_shard=3)
    cfg = DataConfig(dataset="shards", root=str(tmp_path / "shards"), img_size=8, batch_size=2, num_workers=2)

    # Eval: every sample once across 2 ranks x 2 workers; squash resizing keeps the constant images.
    seen = []
    for rank in range(2):
        for images, labels in build_loader(
            cfg.replace(eval_resize="squash"), "test", rank=rank, world_size=2
        ):
            values = ((images[:, 0, 0, 0] * 0.5 + 0.5) * 255).round().long()
            seen += zip(values.tolist(), labels.tolist(), strict=True)
    assert sorted(seen) == [(number * 10, number % 2) for number in range(22)]

    # Train: ranks take the same number of steps, and a resumed epoch replays the stream exactly.
    loaders = [build_loader(cfg, "train", rank=rank, world_size=2, epoch=1) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == len(collect(loaders[0])) == len(collect(loaders[1]))
    uninterrupted = collect(loaders[0])
    resumed = build_loader(cfg, "train", rank=0, world_size=2, epoch=1, start_index=2)
    assert_same_batches(uninterrupted[1:], collect(resumed))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        resumed.set_start(3)
