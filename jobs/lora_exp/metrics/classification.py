"""Classification metrics from scikit-learn, the package underneath ``evaluate``'s GLUE metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

KNOWN = ("accuracy", "f1_macro", "f1", "mcc")


def classification_scores(names: Sequence[str], num_labels: int, positive: int, gold: Any,
                          pred: Any) -> dict[str, float]:
    """Accuracy always, then each of ``names``: ``f1_macro``, ``f1`` (of class ``positive``), ``mcc``."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    gold, pred = np.asarray(gold), np.asarray(pred)
    out = {"accuracy": float(accuracy_score(gold, pred))}
    labels = list(range(num_labels))
    for name in names:
        if name == "f1_macro":
            out[name] = float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
        elif name == "f1":
            out[name] = float(f1_score(gold, pred, pos_label=positive, average="binary", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(gold, pred))
        elif name != "accuracy":
            raise ValueError(f"unknown classification metric {name!r}; known: {KNOWN}")
    return out
