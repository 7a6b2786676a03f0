"""Classification metrics and the per-split outputs (results JSON, predictions CSV, report, confusion matrix).

Metrics come from scikit-learn, the package underneath ``evaluate``'s GLUE metrics: ``evaluate`` fetches
its metric scripts from the hub at run time, which fails on air-gapped clusters and in our CI.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.tasks import ClassificationTask


def classification_metrics(task: ClassificationTask, gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {"accuracy": float(accuracy_score(gold, pred))}
    labels = list(range(task.num_labels))
    for name in task.metrics:
        if name == "f1_macro":
            out[name] = float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
        elif name == "f1":
            pos = task.labels.index(task.positive_label) if task.positive_label else 1
            out[name] = float(f1_score(gold, pred, pos_label=pos, average="binary", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(gold, pred))
    return out


def write_split_outputs(
    out_dir: Path, split: str, task: ClassificationTask, rows: Any, scores: np.ndarray, gold: np.ndarray
) -> dict[str, float]:
    """Write results.json, predictions.csv, report.json and confusion_matrix.png for one eval split."""
    from sklearn.metrics import classification_report, confusion_matrix

    out_dir.mkdir(parents=True, exist_ok=True)
    pred = scores.argmax(axis=1)
    metrics = classification_metrics(task, gold, pred)
    metrics["samples"] = len(gold)
    (out_dir / "results.json").write_text(json.dumps({"split": split, "task": task.name, **metrics}, indent=2))

    with (out_dir / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", *task.text_fields, "label", "prediction", "correct", *(f"score_{n}" for n in task.labels)])
        for i in range(len(gold)):
            texts = [rows[f][i] for f in task.text_fields]
            w.writerow([i, *texts, task.labels[gold[i]], task.labels[pred[i]], bool(gold[i] == pred[i]),
                        *(f"{s:.6g}" for s in scores[i])])

    labels = list(range(task.num_labels))
    report = classification_report(gold, pred, labels=labels, target_names=list(task.labels),
                                   output_dict=True, zero_division=0)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    cm = confusion_matrix(gold, pred, labels=labels)
    plot_confusion_matrix(cm, task.labels, f"{task.name} / {split}", out_dir / "confusion_matrix.png")
    return metrics


def plot_confusion_matrix(cm: np.ndarray, labels: tuple[str, ...], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.0 * len(labels)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
