"""Classification metrics from a predict function: top-k, per-class accuracy, confusion matrix, PNG."""

import json

import numpy as np
import pytest
import torch

from vitkit.eval.classification import evaluate_classification, plot_confusion_matrix, write_results


def test_metrics_match_a_hand_count(tmp_path):
    # 3 classes; logits chosen so the top-1 and top-2 hits are known by construction.
    logits = torch.tensor([[3.0, 2, 1], [1, 3, 2], [3, 1, 2], [1, 2, 3], [2, 3, 1], [1, 2, 3]])
    labels = torch.tensor([0, 1, 1, 2, 0, 0])
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]
    result = evaluate_classification(lambda x: x, batches, ["a", "b", "c"], top_k=(1, 2))
    assert result.num_samples == 6
    assert result.top_k(1) == pytest.approx(3 / 6)  # rows 0, 1, 3
    assert result.top_k(2) == pytest.approx(4 / 6)  # + row 4 (0 is second)
    expected = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.per_class_accuracy == pytest.approx({"a": 1 / 3, "b": 1 / 2, "c": 1.0})
    results = json.loads(write_results(result, tmp_path / "r.json", split="test").read_text())
    assert results["confusion_matrix"] == expected.tolist() and results["split"] == "test"
    png = plot_confusion_matrix(result, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reduce_sums_counts_over_processes():
    logits, labels = torch.eye(2), torch.tensor([0, 1])
    result = evaluate_classification(
        lambda x: x, [(logits, labels)], ["x", "y"], top_k=(1,), reduce=lambda t: 2 * t
    )
    assert result.num_samples == 4 and result.top_k(1) == 1.0


def test_wrong_number_of_classes_is_named():
    with pytest.raises(ValueError, match="predicts 3 classes but the data has 2"):
        evaluate_classification(lambda x: x, [(torch.zeros(1, 3), torch.tensor([0]))], ["x", "y"])
