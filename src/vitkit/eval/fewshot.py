"""Few-shot linear evaluation of frozen features, as in the ViT paper, and a linear probe.

The ViT paper (section 4.1, "Metrics"): "Few-shot accuracies are obtained by solving a regularized
least-squares regression problem that maps the (frozen) representation of a subset of training
images to {-1, 1}^K target vectors. This formulation allows us to recover the exact solution in
closed form." The details follow big_vision's `evaluators/fewshot_lsr.py`: features are whitened
with the few-shot set's mean and standard deviation, a constant feature of 100 stands in for an
(almost unregularised) bias, and the ridge problem is solved in its primal or dual form, whichever
matrix is smaller. Each shot count (1, 5, 10, 25 per class) is drawn with several seeds and the
accuracies averaged.

The linear probe is multinomial logistic regression on all (or a capped number of) training
features, its inverse regularisation chosen on a held-out part of the training set (as CLIP's).

One interface (big_vision's evaluators): `evaluate_fewshot(predict, train_set, test_set, config)`
takes a predict function `images -> features` and returns metrics.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data.datasets import BadImageError, Unreadable

log = logging.getLogger(__name__)

Predict = Callable[[torch.Tensor], torch.Tensor]
# big_vision's constant bias feature: large, so that the ridge penalty barely touches the bias.
BIAS_CONSTANT = 100.0


@dataclass(frozen=True)
class FewShotConfig:
    """What to evaluate. Defaults are the ViT paper's shots and big_vision's regulariser."""

    shots: tuple[int, ...] = (1, 5, 10, 25)
    num_seeds: int = 3
    # Ridge strength on whitened features; big_vision's default 2^10.
    l2_reg: float = 1024.0
    # The linear probe: on at most this many training images per class (0: all), C chosen from
    # `probe_c_values` on a held-out `probe_val_fraction` of them.
    linear_probe: bool = True
    probe_samples_per_class: int = 0
    probe_c_values: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    probe_val_fraction: float = 0.2
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))
        object.__setattr__(self, "probe_c_values", tuple(float(c) for c in self.probe_c_values))
        checks = {
            "shots must be >= 1": all(k >= 1 for k in self.shots),
            "num_seeds must be >= 1": self.num_seeds >= 1,
            "l2_reg must be > 0": self.l2_reg > 0,
            "probe_c_values must be > 0": all(c > 0 for c in self.probe_c_values),
            "probe_val_fraction must be in (0, 1)": 0 < self.probe_val_fraction < 1,
            "batch_size must be >= 1": self.batch_size >= 1,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid FewShotConfig ({'; '.join(failed)})")


# The closed-form few-shot classifier ---------------------------------------------------------------------
@dataclass
class RidgeClassifier:
    """Whitening statistics and weights (D + 1, K) of a least-squares fit onto {-1, 1} targets."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor

    def _design(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.std
        return torch.cat([x, x.new_full((len(x), 1), BIAS_CONSTANT)], dim=1)  # (N, D + 1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, K) regression outputs; the predicted class is the largest."""
        return self._design(features) @ self.weight

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.scores(features).argmax(dim=1)


def fit_ridge(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2_reg: float = 1024.0
) -> RidgeClassifier:
    """Closed-form ridge regression of features (N, D) onto one-hot targets in {-1, 1}^K, in float64.

    W = (X^T X + l2 I)^-1 X^T Y when N >= D, else the same W as X^T (X X^T + l2 I)^-1 Y, which
    solves an N x N system instead of D x D (25 shots of 10 classes: 250 x 250, not 769 x 769).
    """
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(
            f"fit_ridge: features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"fit_ridge: labels span [{int(labels.min())}, {int(labels.max())}], not 0..{num_classes - 1}"
        )
    x = features.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + 1e-5  # constant features stay finite
    classifier = RidgeClassifier(mean, std, weight=torch.empty(0))
    design = classifier._design(features)  # (N, D + 1)
    targets = 2.0 * torch.nn.functional.one_hot(labels.long(), num_classes).double() - 1.0  # (N, K)
    num_points, dim = design.shape
    if num_points >= dim:
        gram = design.T @ design + l2_reg * torch.eye(dim, dtype=torch.float64)
        classifier.weight = torch.linalg.solve(gram, design.T @ targets)
    else:
        gram = design @ design.T + l2_reg * torch.eye(num_points, dtype=torch.float64)
        classifier.weight = design.T @ torch.linalg.solve(gram, targets)
    return classifier


def sample_shots(labels: torch.Tensor, shots: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of `shots` examples of every class, drawn without replacement with a seeded generator."""
    labels = torch.as_tensor(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < shots:
            raise ValueError(
                f"{shots}-shot evaluation: class {label} has only {len(members)} training examples"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen)


def fewshot_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: FewShotConfig = FewShotConfig(),
    num_classes: int | None = None,
) -> dict[str, float]:
    """Test accuracy of the ridge classifier per shot count, mean and std over seeds.

    Returns {"5shot": mean, "5shot_std": std, ...}. Seed s of k shots draws with seed
    config.seed + s, so every k uses the same draws whatever other shot counts are asked for.
    """
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    out: dict[str, float] = {}
    for shots in config.shots:
        accuracies = []
        for seed in range(config.num_seeds):
            chosen = sample_shots(train_labels, shots, config.seed + seed, num_classes)
            classifier = fit_ridge(train_features[chosen], train_labels[chosen], num_classes, config.l2_reg)
            accuracies.append((classifier.predict(test_features) == test_labels).double().mean().item())
        out[f"{shots}shot"] = float(np.mean(accuracies))
        out[f"{shots}shot_std"] = float(np.std(accuracies))
    return out


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: FewShotConfig = FewShotConfig(),
) -> dict[str, float]:
    """Logistic-regression probe: C chosen on a held-out part of train, refit on all of train."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = train_features.double().numpy(), train_labels.numpy()
    x_test, y_test = test_features.double().numpy(), test_labels.numpy()
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(x_train))
    num_val = max(1, int(round(config.probe_val_fraction * len(x_train))))
    val, fit = order[:num_val], order[num_val:]

    def train(c: float, rows: np.ndarray):
        scaler = StandardScaler().fit(x_train[rows])
        with warnings.catch_warnings():
            # A capped lbfgs run is still a fine probe; its warning would repeat once per C.
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x_train[rows]), y_train[rows])
        return lambda x: probe.predict(scaler.transform(x))

    scores = {c: float((train(c, fit)(x_train[val]) == y_train[val]).mean()) for c in config.probe_c_values}
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    log.info("linear probe: validation accuracy per C %s; chose C=%g", scores, best)
    accuracy = float((train(best, np.arange(len(x_train)))(x_test) == y_test).mean())
    return {"linear_probe": accuracy, "linear_probe_c": best}


# From images to metrics -----------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(
    predict: Predict, dataset: Dataset, batch_size: int = 64, desc: str = "features", num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `predict` (images (B, C, H, W) -> features (B, D)) over a data set of (image, label):
    (features float32 (N, D), labels long (N,))."""
    features, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, batch_labels in tqdm(loader, desc=desc, leave=False):
        features.append(predict(images).float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(features), torch.cat(labels).long()


class Transformed(Dataset):
    """A data set of (uint8 image, label) seen through a deterministic (eval) transform."""

    def __init__(self, dataset: Dataset, transform: Callable[[torch.Tensor, None], torch.Tensor]):
        self.dataset = dataset
        self.transform = transform
        self.targets = _targets(dataset)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.dataset[index]
        if isinstance(sample, Unreadable):  # its label was already drawn: refuse rather than substitute
            raise BadImageError(sample.path, sample.reason)
        image, label = sample
        return self.transform(image, None), label


def evenly_spaced(dataset: Dataset, limit: int) -> Dataset:
    """At most `limit` items, every k-th: a class-balanced cut of a data set listed class by class
    (ImageFolder); all of it when limit is 0."""
    if not limit:
        return dataset
    stride = max(len(dataset) // limit, 1)
    return Subset(dataset, list(range(0, len(dataset), stride))[:limit])


def _targets(dataset: Dataset) -> torch.Tensor:
    """Labels without decoding images: from `targets`, through Subsets, or by reading every item."""
    if isinstance(dataset, Subset):
        return _targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    return torch.as_tensor([label for _, label in dataset])  # type: ignore[attr-defined]


def _per_class_cap(labels: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """At most `cap` indices of each class, each class on its own (a small class keeps all it has
    and caps no other); every index when cap is 0. Drawn with a seeded generator."""
    if cap <= 0:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:cap]])
    return torch.cat(chosen)


def evaluate_fewshot(
    predict: Predict,
    train_set: Dataset,
    test_set: Dataset,
    config: FewShotConfig = FewShotConfig(),
    num_workers: int = 0,
) -> dict[str, float]:
    """Few-shot accuracies (and the linear probe) of frozen features on a labelled train/test pair.

    Only the training images that some draw (or the probe) uses are run through the model: 25 shots
    x 3 seeds of CIFAR-10 read at most 750 of its 50,000 training images.
    """
    labels = _targets(train_set)
    num_classes = int(labels.max()) + 1
    needed = [
        sample_shots(labels, shots, config.seed + seed, num_classes)
        for shots in config.shots
        for seed in range(config.num_seeds)
    ]
    probe_rows = _per_class_cap(labels, config.probe_samples_per_class, config.seed)
    if config.linear_probe:
        needed.append(probe_rows)
    used = torch.unique(torch.cat(needed))
    train_features, train_labels = extract_features(
        predict, Subset(train_set, used.tolist()), config.batch_size, "train features", num_workers
    )
    test_features, test_labels = extract_features(
        predict, test_set, config.batch_size, "test features", num_workers
    )
    # Put the features back at their data-set positions, so that sample_shots draws the same indices.
    full_features = train_features.new_zeros(len(labels), train_features.shape[1])
    full_features[used] = train_features
    metrics = fewshot_accuracies(full_features, labels, test_features, test_labels, config, num_classes)
    if config.linear_probe:
        metrics.update(
            linear_probe(full_features[probe_rows], labels[probe_rows], test_features, test_labels, config)
        )
        per_class = torch.bincount(labels[probe_rows], minlength=num_classes)
        metrics["linear_probe_rows"] = int(per_class.sum())
        metrics["linear_probe_rows_per_class_min"] = int(per_class.min())
        metrics["linear_probe_rows_per_class_max"] = int(per_class.max())
    metrics["num_test"] = len(test_labels)
    metrics["feature_dim"] = train_features.shape[1]
    if not math.isfinite(sum(v for k, v in metrics.items() if k.endswith("shot"))):
        raise ValueError("few-shot accuracies are not finite: are the features NaN?")
    return metrics


def format_table(metrics: dict[str, float], shots: Sequence[int]) -> str:
    """A markdown table of the few-shot accuracies (mean +- std over seeds) and the probe."""
    rows = ["| evaluation | training rows per class | accuracy (%) |", "|---|---:|---:|"]
    for k in shots:
        rows.append(
            f"| {k}-shot | {k} | {100 * metrics[f'{k}shot']:.2f} +- {100 * metrics[f'{k}shot_std']:.2f} |"
        )
    if "linear_probe" in metrics:
        low, high = metrics["linear_probe_rows_per_class_min"], metrics["linear_probe_rows_per_class_max"]
        per_class = f"{low}" if low == high else f"{low}-{high}"
        rows.append(
            f"| linear probe (C={metrics['linear_probe_c']:g}) | {per_class} | {100 * metrics['linear_probe']:.2f} |"
        )
    return "\n".join(rows)
