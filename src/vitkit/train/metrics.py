"""What a run logs: metrics.jsonl and metrics.csv (and TensorBoard), read back, and drawn as curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..files import atomic_write
from . import run_folder

CSV_COLUMNS = [
    "step",
    "epoch",
    "kind",
    "split",
    "loss",
    "accuracy",
    "lr",
    "grad_norm",
    "samples_per_s",
    "train_time_s",
    "top1",
    "top5",
    "mean_class_accuracy",
]


class MetricsLog:
    """Rows to metrics.jsonl and metrics.csv, scalars to TensorBoard; a no-op off the main process.

    On resume, rows after the checkpoint's step are dropped: the resumed run logs them again.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.jsonl = out_dir / "metrics.jsonl"
        self.csv = out_dir / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        rows = [
            row for row in read_metrics(self.jsonl) if resume_step is not None and row["step"] <= resume_step
        ]
        atomic_write(
            self.jsonl, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))
        )

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.csv, write_csv)
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as handle:
            csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore").writerow(row)
        for key, value in row.items():
            if key not in ("step", "kind", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{row['kind']}_{row['split']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (a last line cut by a killed write is dropped, with a log line)."""
    return run_folder.read_jsonl(path)


def plot_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """Training loss and eval top-1 against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.set_yscale("log")
    loss_axes.legend()
    scored = [r for r in train if "accuracy" in r]  # a regression objective has none
    if scored:
        accuracy_axes.plot(
            [r["step"] for r in scored], [r["accuracy"] for r in scored], alpha=0.5, label="train batch"
        )
    if evals:
        accuracy_axes.plot(
            [r["step"] for r in evals],
            [r["top1"] for r in evals],
            marker="o",
            label=f"{evals[0]['split']} top-1",
        )
    accuracy_axes.set_xlabel("step")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.grid(alpha=0.3)
    if scored or evals:
        accuracy_axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return Path(path)
