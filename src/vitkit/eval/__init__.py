"""Evaluation: classification metrics (top-k, per-class accuracy, confusion matrix) and prediction."""

from .classification import EVALUATORS, ClassificationResult, evaluate_classification, plot_confusion_matrix

__all__ = ["EVALUATORS", "ClassificationResult", "evaluate_classification", "plot_confusion_matrix"]
