"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from vitkit.data.datasets import stratified_split


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) with values 0..16, labels): the CSV scikit-learn bundles, read directly,
    since its loader imports scikit-learn (a second of every command's start-up)."""
    spec = importlib.util.find_spec("sklearn")
    table = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if table is None or not table.is_file():  # a scikit-learn laid out otherwise: its own loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    values = np.loadtxt(table, delimiter=",")
    return values[:, :-1].reshape(-1, 8, 8), values[:, -1].astype(np.int64)


class Digits(Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), as uint8 RGB (3, 8, 8).

    A fixed stratified split holds out 20% of each class as "test"; pixel values 0..16 become 0..255.
    """

    classes = [str(digit) for digit in range(10)]
    class_to_idx = {name: digit for digit, name in enumerate(classes)}
    TEST_FRACTION = 0.2
    SPLIT_SEED = 0

    def __init__(self, split: Literal["train", "test"] = "train") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"Digits split={split!r}: expected 'train' or 'test'")
        images, labels = _load_digits()
        train, test = stratified_split(labels.tolist(), self.TEST_FRACTION, self.SPLIT_SEED)
        chosen = train if split == "train" else test
        gray = torch.from_numpy(np.rint(images[chosen] * (255 / 16)).astype(np.uint8))
        self.images = gray[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
        self.targets = labels[chosen].tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]
