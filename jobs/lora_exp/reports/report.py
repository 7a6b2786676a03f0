"""The comparison report: charts (baseline vs fine-tuned, methods, KD, learning curves, confusion
matrices), the Markdown page that embeds them, and the ``comparison`` run that logs it all to MLflow."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp.core import tags
from lora_exp.core.plots import bar_chart, palette
from lora_exp.core.tables import markdown_table, write_csv
from lora_exp.methods import get_method, method_names
from lora_exp.reports.arms import Arm, arms_of, example_scores, improvements, kd_arms, method_arms, pairwise
from lora_exp.reports.charts import confusion_matrices, learning_curves, metric_bars
from lora_exp.reports.runs import METHOD_HEADERS, Table, comparison_rows, method_rows, read_runs, role
from lora_exp.reports.selection import RunInfo
from lora_exp.reports.stats import summarize
from lora_exp.tracking.server import experiment_id, git_commit

log = logging.getLogger(__name__)

COMPARISON_RUN = "comparison"
DEFAULT_LOG_EXPERIMENT = "lora-exp-comparisons"  # when the runs span several experiments
NOTE_LIMIT = 7900  # MLflow tag values (the run's description) hold at most 8000 characters

@dataclass
class Report:
    out: Path
    selection: str
    tables: list[Table]
    improvements: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    arms: list[Arm] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    charts: dict[str, Path] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.out / "report.md"

    def files(self) -> list[str]:
        return ["report.md", "comparison_table.csv", "arms_table.csv", "improvements.json", "method_table.csv",
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
    arms = arms_of(tables)
    colors = palette([t.info.run_id for t in tables])
    scores, tmp = example_scores(client)
    with tmp:
        report = Report(out, selection, tables, improvements(arms, scores), method_rows(client, tables), arms,
                        pairwise(arms, scores))
    write_csv(out / "comparison_table.csv", comparison_rows(tables))
    write_csv(out / "arms_table.csv", arm_rows(arms))
    (out / "improvements.json").write_text(json.dumps(
        {"baselines": {t.info.run_id: t.info.name for t in tables if t.info.is_baseline},
         "statistics": STATISTICS, "improvements": report.improvements, "comparisons": report.comparisons},
        indent=2))
    write_csv(out / "method_table.csv", report.methods)
    for name, group, label in (("comparison", arms, None),
                               ("methods", method_arms(arms), lambda a: f"{a.label} ({arm_method_label(a)})"),
                               ("kd", kd_arms(arms), lambda a: f"{a.label} ({'KD' if a.kd else 'no KD'})")):
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
STATISTICS = ("Per arm: mean over its runs (seeds), 95% t-interval. Between arms: the seed-level test (Welch t-test, "
              "or a one-sample t-test against a single run) when an arm was repeated, else the example-level test "
              "(McNemar exact test for the accuracy of two single runs, else a paired permutation test over examples, "
              "with a bootstrap interval); "
              "significant when the 95% interval of the difference excludes 0.")


def arm_method_label(arm: Arm) -> str:
    """How an arm's method reads in charts: its registered label (the tag as is for unknown methods)."""
    return get_method(arm.method).label if arm.method in set(method_names()) else arm.method


def arm_rows(arms: list[Arm]) -> list[dict[str, Any]]:
    """One row per arm and (split, metric): n, mean, std and 95% interval across its runs."""
    rows = []
    for arm in arms:
        for split, metrics in arm.metrics().items():
            for metric in metrics:
                s = summarize(arm.values(split, metric))
                rows.append({"arm": arm.label, "runs": " ".join(t.info.name for t in arm.tables),
                             "role": "baseline" if arm.is_baseline else "fine-tuned", "method": arm.method,
                             "split": split, "metric": metric, **s.as_dict()})
    return rows


def _interval(low: float | None, high: float | None) -> str | None:
    return None if low is None or high is None else f"[{low:.4g}, {high:.4g}]"


def _comparison_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"arm": i["run"], "vs": i["baseline"], "split": i["split"], "metric": i["metric"],
             "n": i["n"], "before": i["baseline_value"], "after": i["value"], "after 95% CI": _interval(*i["ci"]),
             "change": i["abs_change"], "change 95% CI": _interval(*i["diff_ci"]), "p": i["p_value"],
             "test": (i["seed_test"] or i["example_test"] or {}).get("test", "-"),
             "significant": "yes" if i["significant"] else "no"} for i in records]


def markdown_sections(r: Report) -> list[str]:
    def image(key: str, alt: str) -> list[str]:
        return [f"![{alt}]({r.charts[key].name})\n"] if key in r.charts else []

    runs = [{"run": t.info.name, "role": role(t), "job": t.info.job, "method": t.info.method, "task": t.info.task,
             "model": t.info.model, "experiment": t.info.experiment, "run id": t.info.run_id} for t in r.tables]
    s = [f"# Comparison report\n\n{len(r.tables)} runs in {len(r.arms)} arms ({r.selection}), "
         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.\n",
         "## Runs\n", markdown_table(runs)]
    s += ["## Baseline vs fine-tuned\n", *image("comparison", "baseline vs fine-tuned")]
    if r.improvements:
        s += [markdown_table(_comparison_rows(r.improvements)), _verdicts(r.improvements)]
    else:
        s.append("_No baseline to compare with: add an eval run of the base model (`job: eval`, no model "
                 "source) for the same task._\n")
    if r.comparisons:
        s += ["## Arms compared\n", markdown_table(_comparison_rows(r.comparisons)), _verdicts(r.comparisons)]
    s.append(f"_How to read this: {STATISTICS} A single-seed comparison says nothing about seed-to-seed "
             "variation: give a run `repeats: 3` (or `seeds: [...]`) for that._\n")
    s += ["## Methods\n", "Seed 003's columns; size is the saved artifact (adapter, head or full model).\n",
          markdown_table(r.methods, headers=METHOD_HEADERS)]
    groups = method_arms(r.arms)
    if groups:
        s += ["### Head-only vs LoRA vs QLoRA\n", *image("methods", "methods"),
              markdown_table(_rows_of(r.methods, groups), headers=METHOD_HEADERS)]
    kd = kd_arms(r.arms)
    if kd:
        names = {a.label for a in kd}
        judged = [c for c in r.comparisons if {c["run"], c["baseline"]} <= names and c["run"] != c["baseline"]]
        s += ["### KD vs no KD\n", *image("kd", "KD vs no KD"),
              markdown_table(_rows_of(r.methods, kd), headers=METHOD_HEADERS),
              _verdicts(judged) if judged else ""]
    if "learning_curves" in r.charts:
        s += ["## Learning curves\n", *image("learning_curves", "learning curves")]
    confusion = [k for k in r.charts if k.startswith("confusion:")]
    if confusion:
        s.append("## Confusion matrices\n")
        for key in confusion:
            s += [f"### {key.split(':', 1)[1]}\n", *image(key, key)]
    s += ["## Files\n", "".join(f"- `{p}`\n" for p in r.files())]
    return s


def _verdicts(records: list[dict[str, Any]]) -> str:
    """The verdict of each comparison on its arm's first metric of each split (the table has the rest)."""
    seen: set[tuple[str, str, str]] = set()
    lines = []
    for i in records:
        key = (i["run"], i["baseline"], i["split"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {i['split']} {i['metric']}: {i['verdict']}")
    return "\n".join(lines) + "\n"


def _rows_of(rows: list[dict[str, Any]], arms: list[Arm]) -> list[dict[str, Any]]:
    order = [t.info.name for a in arms for t in a.tables]
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
