"""Few-shot linear evaluation: the closed form, exact on separable features, the shot draws, the probe."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from vitkit.eval.fewshot import (
    BIAS_CONSTANT,
    FewShotConfig,
    evaluate_fewshot,
    fewshot_accuracies,
    fit_ridge,
    format_table,
    linear_probe,
    sample_shots,
)


def separable(num_per_class: int, num_classes: int = 5, dim: int = 16, seed: int = 0):
    """Features = a far-apart class centre + small noise, so any sensible classifier is exact."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 10
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    features = centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def test_ridge_matches_a_direct_solve_in_primal_and_dual_form():
    features, labels = separable(6, num_classes=3, dim=4)  # N = 18 >= D + 1 = 5: primal
    wide, wide_labels = separable(2, num_classes=3, dim=40)  # N = 6 < 41: dual
    for x, y in ((features, labels), (wide, wide_labels)):
        classifier = fit_ridge(x, y, 3, l2_reg=2.0)
        # Hand-built: whiten, append the bias constant, solve the normal equations with numpy.
        xn = x.double().numpy()
        xn = (xn - xn.mean(0)) / (xn.std(0) + 1e-5)
        design = np.concatenate([xn, np.full((len(xn), 1), BIAS_CONSTANT)], axis=1)
        targets = 2.0 * np.eye(3)[y.numpy()] - 1.0
        expected = np.linalg.solve(design.T @ design + 2.0 * np.eye(design.shape[1]), design.T @ targets)
        np.testing.assert_allclose(classifier.weight.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_fewshot_on_separable_features_is_exact():
    train_features, train_labels = separable(30)
    test_features, test_labels = separable(20, seed=1)
    config = FewShotConfig(shots=(1, 5, 25), num_seeds=3)
    metrics = fewshot_accuracies(train_features, train_labels, test_features, test_labels, config)
    assert {k: metrics[k] for k in ("1shot", "5shot", "25shot")} == {
        "1shot": 1.0,
        "5shot": 1.0,
        "25shot": 1.0,
    }
    assert metrics["5shot_std"] == 0.0


def test_fewshot_fails_on_shuffled_labels():
    # The same features with random labels cannot be predicted: accuracy near chance (0.2).
    train_features, train_labels = separable(30)
    test_features, test_labels = separable(40, seed=1)
    shuffled = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(0))]
    metrics = fewshot_accuracies(
        train_features, train_labels, test_features, shuffled, FewShotConfig(shots=(5,))
    )
    assert metrics["5shot"] < 0.4


def test_sample_shots_draws_exactly_k_per_class_and_depends_on_the_seed():
    labels = torch.tensor([0, 1, 2] * 10)
    chosen = sample_shots(labels, 4, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert len(set(chosen.tolist())) == 12
    assert torch.equal(chosen, sample_shots(labels, 4, seed=0))
    assert not torch.equal(chosen, sample_shots(labels, 4, seed=1))
    with pytest.raises(ValueError, match="25-shot evaluation: class 0 has only 10"):
        sample_shots(labels, 25, seed=0)


def test_linear_probe_separates_and_picks_a_regulariser():
    train_features, train_labels = separable(20)
    test_features, test_labels = separable(10, seed=1)
    config = FewShotConfig(probe_c_values=(0.1, 1.0))
    metrics = linear_probe(train_features, train_labels, test_features, test_labels, config)
    assert metrics["linear_probe"] == 1.0 and metrics["linear_probe_c"] in (0.1, 1.0)


def test_evaluate_fewshot_reads_only_the_images_it_needs():
    # Images are the features themselves (1x1 "images" with D channels); predict counts its inputs.
    train_features, train_labels = separable(40)
    test_features, test_labels = separable(10, seed=1)
    train_set = TensorDataset(train_features[:, :, None, None], train_labels)
    train_set.targets = train_labels
    test_set = TensorDataset(test_features[:, :, None, None], test_labels)
    seen = []

    def predict(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return images.flatten(1)

    config = FewShotConfig(shots=(1, 5), num_seeds=2, linear_probe=True, probe_samples_per_class=8)
    metrics = evaluate_fewshot(predict, train_set, test_set, config)
    assert metrics["1shot"] == metrics["5shot"] == metrics["linear_probe"] == 1.0
    assert metrics["num_test"] == 50 and metrics["feature_dim"] == 16
    # At most (1 + 5) * 2 seeds + 8 probe images per class of train, then all 50 test images.
    assert 50 < sum(seen) <= 5 * (12 + 8) + 50
    assert "| 5-shot | 5 | 100.00 +- 0.00 |" in format_table(metrics, (1, 5))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="shots must be >= 1"):
        FewShotConfig(shots=(0, 5))
    with pytest.raises(ValueError, match=r"features must be \(N, D\)"):
        fit_ridge(torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="labels span"):
        fit_ridge(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), 2)


def test_fewshot_command_on_digits(tmp_path, capsys):
    import json

    import vitkit
    from helpers import tiny_config
    from vitkit.cli import main

    torch.manual_seed(0)
    vitkit.save(vitkit.VisionTransformer(tiny_config(img_size=16, patch_size=4)), tmp_path / "m.safetensors")
    out = tmp_path / "fewshot.json"
    argv = ["fewshot", str(tmp_path / "m.safetensors"), "--dataset", "digits", "--shots", "1", "5"]
    assert (
        main([*argv, "--seeds", "2", "--probe-per-class", "20", "--max-test", "100", "--out", str(out)]) == 0
    )
    assert "| 5-shot |" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    # Even random features of a ViT beat chance (10%) on digits with 5 shots.
    assert metrics["num_test"] == 100 and metrics["5shot"] > 0.2 and 0 < metrics["linear_probe"] <= 1
