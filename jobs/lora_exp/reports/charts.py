"""The report's charts: bars per arm (mean, with its 95% interval across seeds as an error bar; baselines
hatched), overlaid learning curves, and the runs' confusion matrices side by side."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_exp.core.plots import Bars, Lines, image_row, line_chart
from lora_exp.reports.arms import Arm
from lora_exp.reports.runs import NOT_SCORES, Table, is_score
from lora_exp.reports.stats import summarize

log = logging.getLogger(__name__)


def score_keys(arms: list[Arm]) -> list[tuple[str, str]]:
    """(split, metric) pairs worth a bar panel, in first-seen order."""
    keys: dict[tuple[str, str], None] = {}
    for arm in arms:
        for t in arm.tables:
            for split, metrics in t.splits.items():
                keys.update({(split, m): None for m in metrics if is_score(m)})
    return list(keys)


def metric_bars(arms: list[Arm], colors: dict[str, str], label: Callable[[Arm], str] | None = None) -> list[Bars]:
    """A panel per (split, metric): a bar per arm at its mean, with its 95% interval when it was repeated."""
    name = label or (lambda a: a.label if len(a.tables) == 1 else f"{a.label} (n={len(a.tables)})")
    panels = []
    for split, metric in score_keys(arms):
        summaries = [summarize(v) if (v := a.values(split, metric)) else None for a in arms]
        panels.append(Bars(
            title=f"{split} {metric}", labels=[name(a) for a in arms],
            values=[s.mean if s else None for s in summaries],
            colors=[colors[a.first.info.run_id] for a in arms], hatched=[a.is_baseline for a in arms],
            intervals=[(s.ci_low, s.ci_high) if s and s.ci_low is not None and s.ci_high is not None else None
                       for s in summaries]))
    return panels


def curve_keys(tables: list[Table]) -> list[str]:
    """Training loss, then every in-training eval curve (``eval_loss``, ``eval_accuracy``...)."""
    keys = {"loss": None, "eval_loss": None}
    for t in tables:
        keys.update({k: None for k in sorted(t.info.metrics) if k.startswith("eval_")
                     and k.removeprefix("eval_") not in NOT_SCORES})
    return [k for k in keys if any(k in t.info.metrics for t in tables)]


def learning_curves(client: Any, tables: list[Table], colors: dict[str, str], path: Path) -> Path | None:
    trained = [t for t in tables if t.info.trained]
    keys = curve_keys(trained)
    if not keys:
        return None
    names = {t.info.run_id: t.info.name for t in trained}
    panels = [Lines(title=_curve_title(k), series={names[t.info.run_id]: t.info.history(client, k) for t in trained},
                    colors={names[t.info.run_id]: colors[t.info.run_id] for t in trained}) for k in keys]
    return line_chart(panels, path, "learning curves")


def _curve_title(key: str) -> str:
    return "train loss" if key == "loss" else key.replace("eval_", "eval ", 1)


def confusion_matrices(client: Any, tables: list[Table], out: Path) -> dict[str, Path]:
    """Per split, each run's logged confusion matrix side by side (the eval jobs drew them with
    ``lora_exp.core.plots.confusion_matrix_chart``; they are reused, not redrawn)."""
    splits = list(dict.fromkeys(s for t in tables for s in t.splits))
    charts = {}
    with tempfile.TemporaryDirectory(prefix="lora-exp-compare-") as tmp:
        for split in splits:
            images = []
            for t in tables:
                local = _download(client, t.info.run_id, f"eval/{split}/confusion_matrix.png", Path(tmp))
                if local is not None:
                    images.append((t.info.name, local))
            if images:
                charts[split] = image_row(images, out / f"confusion_{_slug(split)}.png", f"confusion matrices: {split}")
    return charts


def _download(client: Any, run_id: str, path: str, tmp: Path) -> Path | None:
    parent, name = path.rsplit("/", 1)
    try:
        if not any(Path(f.path).name == name for f in client.list_artifacts(run_id, parent)):
            return None
        return Path(client.download_artifacts(run_id, path, str(tmp / run_id)))
    except Exception as e:  # a report with one image fewer beats no report
        log.warning("run %s: cannot fetch %s (%s)", run_id, path, e)
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "split"
