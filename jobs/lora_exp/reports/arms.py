"""Arms: the runs a comparison treats as one condition (the repeats of a run, tagged with its group; or a
single run), and the comparisons between arms with their uncertainty (``lora_exp.reports.stats``).

Every fine-tuned arm is compared with the baseline arm(s) of its task, and the fine-tuned arms of a task
with each other (methods, KD vs no KD, two seeds' worth of the same run...). Each comparison reports
both arms' means (with 95% intervals across seeds), the difference with a seed-level test (when an arm was
repeated) and an example-level paired test on the runs' logged per-example predictions (for metrics that are
means over examples), and one verdict.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_exp.core import tags
from lora_exp.methods import get_method, method_names
from lora_exp.reports.runs import NOT_SCORES, Table, higher_is_better
from lora_exp.reports.stats import Difference, example_level, seed_level, summarize, verdict

log = logging.getLogger(__name__)

# Metrics that are the mean of a per-example score in predictions.csv: (column, scale to the logged metric).
PER_EXAMPLE = {"accuracy": ("correct", 1.0), "exact": ("exact", 100.0), "f1": ("f1", 100.0)}
KEY_COLUMNS_END = ("prediction",)  # predictions.csv columns before this one identify the example


@dataclass
class Arm:
    """Runs of one condition: the repeats of a run (same group tag), or one run."""

    label: str
    tables: list[Table] = field(default_factory=list)

    @property
    def first(self) -> Table:
        return self.tables[0]

    @property
    def experiment(self) -> str:
        return self.first.info.experiment

    @property
    def task(self) -> str:
        return self.first.info.task

    @property
    def model(self) -> str:
        return self.first.info.model

    @property
    def method(self) -> str:
        return self.first.info.method

    @property
    def is_baseline(self) -> bool:
        return all(t.info.is_baseline for t in self.tables)

    @property
    def trained(self) -> bool:
        return self.first.info.trained

    @property
    def kd(self) -> bool | None:
        return self.first.info.kd

    def values(self, split: str, metric: str) -> list[float]:
        return [t.splits[split][metric] for t in self.tables if metric in t.splits.get(split, {})]

    def metrics(self) -> dict[str, list[str]]:
        """split -> the score metrics every run of the arm has."""
        out: dict[str, list[str]] = {}
        for split in self.first.splits:
            shared = [m for m in self.first.splits[split] if m not in NOT_SCORES
                      and all(m in t.splits.get(split, {}) for t in self.tables)]
            if shared:
                out[split] = shared
        return out


def arms_of(tables: list[Table]) -> list[Arm]:
    """Group runs by (experiment, group tag or run key), in the order they first appear."""
    arms: dict[tuple[str, str], Arm] = {}
    for t in tables:
        label = t.info.tags.get(tags.GROUP) or t.info.name
        arms.setdefault((t.info.experiment, label), Arm(label)).tables.append(t)
    return list(arms.values())


class ExampleScores:
    """Per-example scores from the runs' logged ``eval/<split>/predictions.csv`` (downloaded once each)."""

    def __init__(self, client: Any, tmp: Path) -> None:
        self.client, self.tmp = client, tmp
        self._rows: dict[tuple[str, str], list[dict[str, str]] | None] = {}

    def rows(self, t: Table, split: str) -> list[dict[str, str]] | None:
        key = (t.info.run_id, split)
        if key not in self._rows:
            self._rows[key] = self._download(t.info.run_id, split)
        return self._rows[key]

    def _download(self, run_id: str, split: str) -> list[dict[str, str]] | None:
        try:
            path = self.client.download_artifacts(run_id, f"eval/{split}/predictions.csv", str(self.tmp / run_id))
        except Exception:  # no per-example predictions logged (LM runs), or no artifact access
            return None
        with Path(path).open(newline="") as fh:
            return list(csv.DictReader(fh))

    def matrix(self, arm: Arm, split: str, metric: str) -> tuple[np.ndarray, list[tuple[str, ...]]] | None:
        """(runs x examples) scores of the metric for the arm, and the examples' identities; None when a run
        has no per-example predictions or the runs disagree on the examples."""
        if metric not in PER_EXAMPLE:
            return None
        column, scale = PER_EXAMPLE[metric]
        matrix, keys = [], None
        for t in arm.tables:
            rows = self.rows(t, split)
            if not rows or column not in rows[0]:
                return None
            cols = list(rows[0])
            ident = cols[: cols.index(KEY_COLUMNS_END[0])] if KEY_COLUMNS_END[0] in cols else cols[:1]
            these = [tuple(r[c] for c in ident) for r in rows]
            if keys is not None and these != keys:
                return None
            keys = these
            matrix.append([_score(r[column]) * scale for r in rows])
        assert keys is not None
        return np.asarray(matrix, dtype=float), keys


def _score(value: str) -> float:
    if value in ("True", "False"):
        return 1.0 if value == "True" else 0.0
    return float(value) if value else 0.0


def baselines_for(arm: Arm, baselines: list[Arm]) -> list[Arm]:
    """Baselines of the arm's task; narrowed to the same model, then the same experiment, where any match
    (a custom task is named 'custom' in every experiment, and a task may be run on several base models)."""
    found = [b for b in baselines if b.task == arm.task]
    for same in (lambda b: b.model == arm.model, lambda b: b.experiment == arm.experiment):
        narrowed = [b for b in found if same(b)]
        found = narrowed or found
    return found


def compare(a: Arm, b: Arm, split: str, metric: str, scores: ExampleScores | None) -> dict[str, Any] | None:
    """``b`` against ``a`` on one split and metric: both summaries, both tests, the verdict."""
    va, vb = a.values(split, metric), b.values(split, metric)
    if not va or not vb:
        return None
    sa, sb = summarize(va), summarize(vb)
    seeds = seed_level(va, vb)
    examples: Difference | None = None
    if scores is not None:
        ma, mb = scores.matrix(a, split, metric), scores.matrix(b, split, metric)
        if ma is not None and mb is not None and ma[1] == mb[1]:
            examples = example_level(ma[0], mb[0], accuracy=metric == "accuracy")
    primary = seeds or examples
    hib = higher_is_better(metric)
    delta = sb.mean - sa.mean
    return {
        "run": b.label, "run_id": b.first.info.run_id, "runs": [t.info.name for t in b.tables],
        "method": b.method, "task": b.task,
        "baseline": a.label, "baseline_run_id": a.first.info.run_id, "baseline_runs": [t.info.name for t in a.tables],
        "split": split, "metric": metric,
        "baseline_value": sa.mean, "value": sb.mean, "n": sb.n, "baseline_n": sa.n,
        "ci": [sb.ci_low, sb.ci_high], "baseline_ci": [sa.ci_low, sa.ci_high],
        "abs_change": delta, "rel_change": delta / abs(sa.mean) if sa.mean else None,
        "higher_is_better": hib, "improved": delta > 0 if hib else delta < 0,
        "seed_test": seeds.as_dict() if seeds else None,
        "example_test": examples.as_dict() if examples else None,
        "p_value": primary.p_value if primary else None,
        "diff_ci": [primary.ci_low, primary.ci_high] if primary else [None, None],
        "significant": bool(primary and primary.significant),
        "single_seed": sa.n == 1 and sb.n == 1,
        "verdict": verdict(a.label, b.label, primary, hib),
    }


def improvements(arms: list[Arm], scores: ExampleScores | None) -> list[dict[str, Any]]:
    """Each fine-tuned arm against the baseline arm(s) of its task, on every split and metric they share."""
    baselines = [a for a in arms if a.is_baseline]
    out = []
    for arm in (a for a in arms if not a.is_baseline):
        for base in baselines_for(arm, baselines):
            for split, metrics in arm.metrics().items():
                for metric in metrics:
                    record = compare(base, arm, split, metric, scores)
                    if record is not None:
                        out.append(record)
    return out


def method_arms(arms: list[Arm]) -> list[Arm]:
    """Trained arms of the registered methods, in their report order (seed 003's: head-only, LoRA, QLoRA,
    full), when at least two methods are present."""
    known = set(method_names())
    found = [a for a in arms if a.trained and a.method in known and a.kd is None]
    if len({a.method for a in found}) < 2:
        return []
    return sorted(found, key=lambda a: (get_method(a.method).report_order, a.method))


def kd_arms(arms: list[Arm]) -> list[Arm]:
    """Distillation arms with and without the teacher's soft targets (KD first), when both kinds exist."""
    found = [a for a in arms if a.kd is not None]
    if {a.kd for a in found} != {True, False}:
        return []
    return sorted(found, key=lambda a: not a.kd)


def pairwise(arms: list[Arm], scores: ExampleScores | None) -> list[dict[str, Any]]:
    """Fine-tuned arms of one task compared with each other (methods, KD vs no KD, seeds...), each pair once,
    the later arm against the earlier (in the report's order)."""
    fine = [a for a in arms if not a.is_baseline]
    out = []
    for i, a in enumerate(fine):
        for b in fine[i + 1:]:
            if a.task != b.task:
                continue
            for split, metrics in b.metrics().items():
                for metric in metrics:
                    record = compare(a, b, split, metric, scores)
                    if record is not None:
                        out.append(record)
    return out


def example_scores(client: Any) -> tuple[ExampleScores, tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="lora-exp-compare-")
    return ExampleScores(client, Path(tmp.name)), tmp
