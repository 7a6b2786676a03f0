"""What the classification formulations share: a ``(batch, num_labels)`` score matrix per batch.

Both the classifier and the verbalizer reduce the model's output to per-label scores in
``preprocess_logits``, so metrics, predictions, reports and plots are one code path for every
classification formulation and method. ``write_split_outputs`` writes a split's results.json,
predictions.csv, report.json and confusion_matrix.png.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lora_exp.core.errors import SpecError
from lora_exp.core.plots import confusion_matrix_chart
from lora_exp.formulations.base import check_early_stopping, check_sweep_metric, map_batches
from lora_exp.tasks import CLASSIFICATION, ClassificationTask
from lora_exp.tasks.base import check_template

if TYPE_CHECKING:
    from lora_exp.config.schema import RunSpec


def render(template: str, batch: dict[str, list[Any]], fields: tuple[str, ...]) -> list[str]:
    """The template filled with each row's text fields."""
    n = len(batch[fields[0]])
    return [template.format(**{f: batch[f][i] for f in fields}) for i in range(n)]


class ClassificationFormulation:
    """Shared by the classification formulations: tokenize with ``encode``, score, evaluate."""

    task_kinds: ClassVar[tuple[str, ...]] = (CLASSIFICATION,)
    prediction_loss_only: ClassVar[bool] = False
    loss_counts_items: ClassVar[bool] = True
    kind: ClassVar[str]
    task: ClassificationTask

    @classmethod
    def training_metrics(cls, task: ClassificationTask) -> tuple[str, ...]:
        return ("loss", "accuracy", *(m for m in task.metrics if m != "accuracy"))

    @classmethod
    def check_spec(cls, spec: RunSpec, task: ClassificationTask) -> None:
        """A template over the task's text fields; verbalizer words, when given, for exactly its labels."""
        check_template(spec.formulation.template or task.template, task.text_fields)
        words = spec.formulation.verbalizers
        if words is not None:
            missing = [lab for lab in task.labels if lab not in words]
            extra = [lab for lab in words if lab not in task.labels]
            if missing or extra:
                raise SpecError(
                    f"formulation.verbalizers: must map exactly the labels {list(task.labels)}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unknown {extra}" if extra else "")
                )
        check_early_stopping(spec, cls.kind, cls.training_metrics(task))
        check_sweep_metric(spec, task, cls.kind, cls.final_metrics(task))

    @classmethod
    def final_metrics(cls, task: ClassificationTask) -> tuple[str, ...]:
        return cls.training_metrics(task)

    def encode(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        raise NotImplementedError

    def gold(self, label_ids: np.ndarray) -> np.ndarray:
        """The gold label ids of a batch's ``labels`` as the collator padded them."""
        raise NotImplementedError

    def tokenize(self, ds: Any) -> Any:
        return map_batches(ds, self.encode, f"tokenizing ({self.kind})")

    def compute_metrics(self, p: Any) -> dict[str, float]:
        return self.task.score(self.gold(p.label_ids), p.predictions.argmax(axis=1))

    def evaluate(self, trainer: Any, raw: Any, split: str, out_dir: Path) -> dict[str, float]:
        scores, label_ids, loss = predict_by_length(trainer, self.tokenize(raw), split)
        if not trainer.is_world_process_zero():
            return {}
        metrics = write_split_outputs(out_dir, split, self.task, raw, scores, self.gold(label_ids))
        metrics["loss"] = loss
        return metrics


def predict_by_length(trainer: Any, data: Any, split: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores and label ids in the data's order, predicted longest first: batches of similar lengths pad
    little (the rows of a split arrive in any order), and the order is restored, so predictions are those of
    the unsorted pass. Returns (scores, label_ids, mean loss)."""
    order = np.argsort([-len(ids) for ids in data["input_ids"]], kind="stable")
    pred = trainer.predict(data.select(order), metric_key_prefix=split)
    back = np.argsort(order)
    return pred.predictions[back], pred.label_ids[back], pred.metrics.get(f"{split}_loss", float("nan"))


def write_split_outputs(out_dir: Path, split: str, task: ClassificationTask, rows: Any, scores: np.ndarray,
                        gold: np.ndarray) -> dict[str, float]:
    """Write results.json, predictions.csv, report.json and confusion_matrix.png for one eval split."""
    from sklearn.metrics import classification_report, confusion_matrix

    out_dir.mkdir(parents=True, exist_ok=True)
    pred = scores.argmax(axis=1)
    metrics = task.score(gold, pred)
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
    confusion_matrix_chart(cm.tolist(), task.labels, f"{task.name} / {split}", out_dir / "confusion_matrix.png")
    return metrics
