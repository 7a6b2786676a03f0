"""The comparison report: charts (baseline vs fine-tuned, methods, KD, learning curves, confusion
matrices), the Markdown page that embeds them, and the ``comparison`` run that logs it all to MLflow."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp.core import tags
from lora_exp.core.plots import Bars, Lines, bar_chart, image_row, line_chart, palette
from lora_exp.core.tables import markdown_table, write_csv
from lora_exp.reports.comparison import (
    METHOD_HEADERS,
    NOT_SCORES,
    Table,
    comparison_rows,
    improvements,
    is_score,
    kd_groups,
    method_groups,
    method_label,
    method_rows,
    read_runs,
    role,
)
from lora_exp.reports.selection import RunInfo
from lora_exp.runtime.tracking import experiment_id, git_commit

log = logging.getLogger(__name__)

COMPARISON_RUN = "comparison"
DEFAULT_LOG_EXPERIMENT = "lora-exp-comparisons"  # when the runs span several experiments
NOTE_LIMIT = 7900  # MLflow tag values (the run's description) hold at most 8000 characters

def score_keys(tables: list[Table]) -> list[tuple[str, str]]:
    """(split, metric) pairs worth a bar panel, in first-seen order."""
    keys: dict[tuple[str, str], None] = {}
    for t in tables:
        for split, metrics in t.splits.items():
            keys.update({(split, m): None for m in metrics if is_score(m)})
    return list(keys)


def metric_bars(tables: list[Table], colors: dict[str, str], label: Any = None) -> list[Bars]:
    """A panel per (split, metric): a bar per run, baselines hatched."""
    label = label or (lambda t: t.info.name)
    return [Bars(title=f"{split} {metric}", labels=[label(t) for t in tables],
                 values=[t.splits.get(split, {}).get(metric) for t in tables],
                 colors=[colors[t.info.run_id] for t in tables], hatched=[t.info.is_baseline for t in tables])
            for split, metric in score_keys(tables)]


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




@dataclass
class Report:
    out: Path
    selection: str
    tables: list[Table]
    improvements: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    charts: dict[str, Path] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.out / "report.md"

    def files(self) -> list[str]:
        return ["report.md", "comparison_table.csv", "improvements.json", "method_table.csv",
                *(p.name for p in self.charts.values())]

    def markdown_summary(self) -> str:
        """The report without its images: the run's MLflow description and the command's output."""
        text = "\n".join(s for s in self.sections if "![" not in s)
        if len(text) > NOTE_LIMIT:
            text = text[: NOTE_LIMIT - 60].rsplit("\n", 1)[0] + "\n\n_(truncated: see report.md in the artifacts)_\n"
        return text


def build_report(client: Any, runs: list[RunInfo], out: Path, selection: str) -> Report:
    """Write every table, chart and the Markdown report for ``runs`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tables = read_runs(client, runs)
    colors = palette([t.info.run_id for t in tables])
    report = Report(out, selection, tables, improvements(tables), method_rows(client, tables))
    write_csv(out / "comparison_table.csv", comparison_rows(tables))
    (out / "improvements.json").write_text(json.dumps(
        {"baselines": {t.info.run_id: t.info.name for t in tables if t.info.is_baseline},
         "improvements": report.improvements}, indent=2))
    write_csv(out / "method_table.csv", report.methods)
    for name, group, label in (("comparison", tables, None),
                               ("methods", method_groups(tables), lambda t: f"{t.info.name} ({method_label(t)})"),
                               ("kd", kd_groups(tables), lambda t: f"{t.info.name} ({_kd_label(t)})")):
        panels = metric_bars(group, colors, label)
        if panels:
            report.charts[name] = bar_chart(panels, out / f"{name}.png", _CHART_TITLES[name])
    curves = learning_curves(client, tables, colors, out / "learning_curves.png")
    if curves:
        report.charts["learning_curves"] = curves
    report.charts.update({f"confusion:{s}": p for s, p in confusion_matrices(client, tables, out).items()})
    report.sections = markdown_sections(report)
    report.path.write_text("\n".join(report.sections))
    return report


_CHART_TITLES = {"comparison": "baseline vs fine-tuned", "methods": "methods", "kd": "distillation: KD vs no KD"}


def _kd_label(t: Table) -> str:
    return "KD" if t.info.kd else "no KD"


def markdown_sections(r: Report) -> list[str]:
    def image(key: str, alt: str) -> list[str]:
        return [f"![{alt}]({r.charts[key].name})\n"] if key in r.charts else []

    runs = [{"run": t.info.name, "role": role(t), "job": t.info.job, "method": t.info.method, "task": t.info.task,
             "model": t.info.model, "experiment": t.info.experiment, "run id": t.info.run_id} for t in r.tables]
    s = [f"# Comparison report\n\n{len(r.tables)} runs ({r.selection}), "
         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.\n",
         "## Runs\n", markdown_table(runs)]
    s += ["## Baseline vs fine-tuned\n", *image("comparison", "baseline vs fine-tuned")]
    if r.improvements:
        shown = [{**i, "rel_change": None if i["rel_change"] is None else f"{i['rel_change']:+.1%}",
                  "improved": "yes" if i["improved"] else "no"} for i in r.improvements]
        s.append(markdown_table(shown, ["run", "baseline", "split", "metric", "baseline_value", "value", "abs_change",
                                        "rel_change", "improved"],
                                {"baseline": "vs", "baseline_value": "before", "value": "after",
                                 "abs_change": "change", "rel_change": "relative"}))
    else:
        s.append("_No baseline to compare with: add an eval run of the base model (`job: eval`, no model "
                 "source) for the same task._\n")
    s += ["## Methods\n", "Seed 003's columns; size is the saved artifact (adapter, head or full model).\n",
          markdown_table(r.methods, headers=METHOD_HEADERS)]
    groups = method_groups(r.tables)
    if groups:
        s += ["### Head-only vs LoRA vs QLoRA\n", *image("methods", "methods"),
              markdown_table(_rows_of(r.methods, groups), headers=METHOD_HEADERS)]
    kd = kd_groups(r.tables)
    if kd:
        s += ["### KD vs no KD\n", *image("kd", "KD vs no KD"),
              markdown_table(_rows_of(r.methods, kd), headers=METHOD_HEADERS)]
    if "learning_curves" in r.charts:
        s += ["## Learning curves\n", *image("learning_curves", "learning curves")]
    confusion = [k for k in r.charts if k.startswith("confusion:")]
    if confusion:
        s.append("## Confusion matrices\n")
        for key in confusion:
            s += [f"### {key.split(':', 1)[1]}\n", *image(key, key)]
    s += ["## Files\n", "".join(f"- `{p}`\n" for p in r.files())]
    return s


def _rows_of(rows: list[dict[str, Any]], tables: list[Table]) -> list[dict[str, Any]]:
    order = [t.info.name for t in tables]
    return sorted((row for row in rows if row["run"] in order), key=lambda row: order.index(row["run"]))




# --------------------------------------------------------------------------------------------------
# MLflow


def log_report(client: Any, uri: str, report: Report, experiment: str | None = None) -> str:
    """Log the report directory as the artifacts of a FINISHED run named ``comparison`` (tag job=compare)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    exps = {t.info.experiment for t in report.tables}
    name = experiment or (exps.pop() if len(exps) == 1 else DEFAULT_LOG_EXPERIMENT)
    ids = ",".join(t.info.run_id for t in report.tables)
    run_tags = {tags.JOB: tags.COMPARE, tags.GIT_COMMIT: git_commit(), tags.SELECTION: report.selection[:500],
                tags.COMPARED_RUNS: ids[:7900], MLFLOW_RUN_NOTE: report.markdown_summary()}
    run = client.create_run(experiment_id(client, name, uri), run_name=COMPARISON_RUN, tags=run_tags)
    try:
        for name in report.files():  # only what this report wrote, whatever else --out holds
            client.log_artifact(run.info.run_id, str(report.out / name))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return str(run.info.run_id)
