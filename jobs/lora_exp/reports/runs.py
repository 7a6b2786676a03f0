"""The numbers a comparison reads from MLflow runs: each run's final ``<split>_<metric>`` values and seed
003's method table (arms, their comparisons and statistics: ``lora_exp.reports.arms``).
Nothing here depends on the task kind: splits and metrics are discovered from the metric names, so
classification, QA and LM runs compare alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_exp.core import tags
from lora_exp.reports.selection import RunInfo

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"loss", "perplexity"}  # metric names (after the split prefix) where smaller is better
NOT_SCORES = {"samples", "runtime", "samples_per_second", "steps_per_second"}  # counts and speeds

def eval_splits(client: Any, run: RunInfo) -> list[str]:
    """The run's final-eval splits: ``eval/<split>`` artifact folders, plus every ``<split>_samples`` metric
    (each split logs its row count), so a split is found even when its artifacts were not logged."""
    found = {k.removesuffix("_samples") for k in run.metrics if k.endswith("_samples")}
    try:
        found |= {Path(f.path).name for f in client.list_artifacts(run.run_id, "eval") if f.is_dir}
    except Exception as e:  # artifacts unreachable (e.g. a server without --serve-artifacts): metrics suffice
        log.warning("run %s: cannot list artifacts (%s); splits from metric names only", run.name, e)
    return sorted(found)


def split_metrics(metrics: dict[str, float], splits: list[str]) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` from ``<split>_<metric>`` keys; the longest split name wins, so
    ``validation_matched_accuracy`` belongs to ``validation_matched``, not ``validation``."""
    out: dict[str, dict[str, float]] = {}
    by_length = sorted(splits, key=len, reverse=True)
    for key, value in metrics.items():
        split = next((s for s in by_length if key.startswith(s + "_")), None)
        if split is not None:
            out.setdefault(split, {})[key[len(split) + 1:]] = value
    return {s: out[s] for s in splits if s in out}


def is_score(metric: str) -> bool:
    """Task quality metrics (accuracy, f1, exact, perplexity...): what charts and method tables show."""
    return metric not in NOT_SCORES and metric != "loss"


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def primary_split(splits: list[str]) -> str | None:
    """The split that stands for "validation" when a single one is needed (best validation loss)."""
    return min(splits, key=lambda s: (not s.startswith("validation"), s)) if splits else None


@dataclass
class Table:
    """The numbers of one run the report needs, read once."""

    info: RunInfo
    splits: dict[str, dict[str, float]]

    @property
    def flat(self) -> dict[str, float]:
        return {f"{s}_{m}": v for s, ms in self.splits.items() for m, v in ms.items()}


def read_runs(client: Any, runs: list[RunInfo]) -> list[Table]:
    return [Table(r, split_metrics(r.metrics, eval_splits(client, r))) for r in runs]


# --------------------------------------------------------------------------------------------------
# Baseline vs fine-tuned


def role(t: Table) -> str:
    return "baseline" if t.info.is_baseline else "fine-tuned"


def comparison_rows(tables: list[Table]) -> list[dict[str, Any]]:
    """One row per run: who it is, then every final ``<split>_<metric>``."""
    rows = []
    for t in tables:
        i = t.info
        rows.append({"run": i.name, "run_id": i.run_id, "experiment": i.experiment, "role": role(t),
                     "job": i.job, "method": i.method, "task": i.task, "model": i.model, **t.flat})
    return rows


# --------------------------------------------------------------------------------------------------
# The method table (seed 003's columns)

METHOD_COLUMNS = {  # column -> the metric it is (None: computed)
    "size_mb": "artifact_size_mb",
    "trainable_params": "trainable_params",
    "trainable_share": "trainable_share",
    "train_runtime_s": "train_runtime",
    "peak_gpu_memory_mb": "peak_gpu_memory_mb",
    "peak_cpu_memory_mb": "peak_cpu_memory_mb",
    "best_train_loss": None,
    "best_val_loss": None,
    "device_hours": "device_hours",
    "energy_kj": None,
    "cost": "cost",
}
OPTIONAL_COLUMNS = ("energy_kj", "cost")
METHOD_HEADERS = {
    "size_mb": "size (MB)", "trainable_params": "trainable params", "trainable_share": "trainable share",
    "train_runtime_s": "train time (s)", "peak_gpu_memory_mb": "peak GPU (MB)", "peak_cpu_memory_mb": "peak CPU (MB)",
    "best_train_loss": "best train loss", "best_val_loss": "best val loss", "train_samples_per_second": "samples/s",
    "device_hours": "device-hours", "energy_kj": "GPU energy (kJ)", "cost": "cost",
}


def best_losses(client: Any, t: Table) -> tuple[float | None, float | None]:
    """Lowest training loss, and lowest validation loss: the in-training ``eval_loss`` curve, else the final
    loss of the validation split (a baseline, or a run trained without in-training eval). A run that logged
    ``best_train_loss``/``best_eval_loss`` itself is taken at its word; older runs are read from the curves."""
    m = t.info.metrics
    train = [m["best_train_loss"]] if "best_train_loss" in m else [v for _, v in t.info.history(client, "loss")]
    val = [m["best_eval_loss"]] if "best_eval_loss" in m else [v for _, v in t.info.history(client, "eval_loss")]
    if not val:
        split = primary_split(list(t.splits))
        final = t.splits.get(split, {}).get("loss") if split else None
        val = [final] if final is not None else []
    return (min(train) if train else None), (min(val) if val else None)


def method_rows(client: Any, tables: list[Table]) -> list[dict[str, Any]]:
    rows = []
    for t in tables:
        m = t.info.metrics
        best_train, best_val = best_losses(client, t)
        row: dict[str, Any] = {"run": t.info.name, "method": t.info.method, "model": t.info.model}
        for column, metric in METHOD_COLUMNS.items():
            row[column] = m.get(metric) if metric else None
        row["best_train_loss"], row["best_val_loss"] = best_train, best_val
        energy = [v for _, v in t.info.history(client, tags.ENERGY)] if tags.ENERGY in m else []
        row["energy_kj"] = sum(energy) / 1000 if energy else None  # one point per attempt
        row.update({f"{s}_{name}": v for s, ms in t.splits.items() for name, v in ms.items() if is_score(name)})
        row["train_samples_per_second"] = m.get("train_samples_per_second")
        if t.info.kd is not None:
            row["kd"] = tags.kd_value(t.info.kd)
            row["teacher_run_id"] = t.info.tags.get(tags.TEACHER_RUN_ID)
        rows.append(row)
    for column in OPTIONAL_COLUMNS:  # shown where some run has them (a GPU's energy counter, a priced profile)
        if all(r.get(column) is None for r in rows):
            for r in rows:
                r.pop(column, None)
    return rows
