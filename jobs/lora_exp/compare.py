"""Compare MLflow runs: baseline vs fine-tuned, methods side by side, learning curves, confusion matrices.

Reads what the train and eval jobs logged (metrics named ``<split>_<metric>``, the per-split artifacts under
``eval/<split>/``) and writes, to ``--out``:

- ``comparison_table.csv``: every selected run's final metrics, one row per run (the MLflow UI's columns);
- ``improvements.json``: absolute and relative change of each fine-tuned run over the baseline run(s) of
  its task, per eval split and metric;
- ``method_table.csv``: seed 003's columns (artifact size, trainable parameters and share, training time,
  peak GPU/CPU memory, best train/validation loss, task metrics, samples/s);
- charts (``comparison.png``, ``methods.png``, ``kd.png``, ``learning_curves.png``, ``confusion_<split>.png``)
  and ``report.md``, which embeds them all.

These files are then logged as the artifacts of an MLflow run named ``comparison`` (tag ``job=compare``),
so the report sits beside the runs it describes. Nothing here depends on the task kind: splits and metrics
are discovered from the metric names, so classification, QA and LM runs compare alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_exp import errors
from lora_exp.selection import RunInfo

log = logging.getLogger(__name__)

HELP = "compare MLflow runs: baseline vs fine-tuned, methods, curves, confusion matrices -> Markdown report"

LOWER_IS_BETTER = {"loss", "perplexity"}  # metric names (after the split prefix) where smaller is better
NOT_SCORES = {"samples", "runtime", "samples_per_second", "steps_per_second"}  # counts and speeds
METHOD_ORDER = ("head_only", "lora", "qlora", "full")  # the order seed 003 reports methods in
COMPARISON_RUN = "comparison"
DEFAULT_LOG_EXPERIMENT = "lora-exp-comparisons"  # when the runs span several experiments
NOTE_LIMIT = 7900  # MLflow tag values (the run's description) hold at most 8000 characters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lora_exp.selection import add_arguments as selection_arguments

    selection_arguments(parser)
    parser.add_argument("--out", default="comparison", help="directory for the report (default: ./comparison)")
    parser.add_argument("--all-attempts", action="store_true",
                        help="keep every finished run, not only the newest per run key")
    parser.add_argument("--log-experiment",
                        help="MLflow experiment for the 'comparison' run (default: the runs' own experiment when "
                        f"they share one, else {DEFAULT_LOG_EXPERIMENT})")
    parser.add_argument("--no-log", action="store_true", help="write the report locally only; log nothing")


def main(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from lora_exp.selection import from_args, search

    uri, sel, _ = from_args(args)
    client = MlflowClient(tracking_uri=uri)
    runs = search(client, sel, statuses=("FINISHED",), latest=not args.all_attempts)
    if not runs:
        raise errors.UserError(f"no finished lora-exp runs match ({sel.describe()}) at {uri}")
    out = Path(args.out)
    report = build_report(client, runs, out, sel.describe())
    log.info("report: %s (%d runs)", out / "report.md", len(runs))
    if not args.no_log:
        run_id = log_report(client, uri, report, args.log_experiment)
        log.info("logged as MLflow run %s (%s)", run_id, COMPARISON_RUN)
    print(report.markdown_summary())
    return errors.OK


# --------------------------------------------------------------------------------------------------
# Reading the runs' numbers


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


def baselines_for(run: Table, baselines: list[Table]) -> list[Table]:
    """Baselines of the run's task; narrowed to the same model, then the same experiment, where any match
    (a custom task is named 'custom' in every experiment, and a task may be run on several base models)."""
    found = [b for b in baselines if b.info.task == run.info.task]
    for same in (lambda b: b.info.model == run.info.model, lambda b: b.info.experiment == run.info.experiment):
        narrowed = [b for b in found if same(b)]
        found = narrowed or found
    return found


def improvements(tables: list[Table]) -> list[dict[str, Any]]:
    """One record per (fine-tuned run, baseline, split, metric) the two share."""
    baselines = [t for t in tables if t.info.is_baseline]
    out = []
    for run in (t for t in tables if not t.info.is_baseline):
        for base in baselines_for(run, baselines):
            for split, metrics in run.splits.items():
                for metric, value in metrics.items():
                    before = base.splits.get(split, {}).get(metric)
                    if before is None or metric in NOT_SCORES:
                        continue
                    out.append(_change(run, base, split, metric, before, value))
    return out


def _change(run: Table, base: Table, split: str, metric: str, before: float, after: float) -> dict[str, Any]:
    delta = after - before
    return {
        "run": run.info.name, "run_id": run.info.run_id, "method": run.info.method, "task": run.info.task,
        "baseline": base.info.name, "baseline_run_id": base.info.run_id,
        "split": split, "metric": metric, "baseline_value": before, "value": after,
        "abs_change": delta, "rel_change": delta / abs(before) if before else None,
        "higher_is_better": higher_is_better(metric),
        "improved": delta > 0 if higher_is_better(metric) else delta < 0,
    }


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
}
METHOD_HEADERS = {
    "size_mb": "size (MB)", "trainable_params": "trainable params", "trainable_share": "trainable share",
    "train_runtime_s": "train time (s)", "peak_gpu_memory_mb": "peak GPU (MB)", "peak_cpu_memory_mb": "peak CPU (MB)",
    "best_train_loss": "best train loss", "best_val_loss": "best val loss", "train_samples_per_second": "samples/s",
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
        row.update({f"{s}_{name}": v for s, ms in t.splits.items() for name, v in ms.items() if is_score(name)})
        row["train_samples_per_second"] = m.get("train_samples_per_second")
        if t.info.tags.get("kd"):
            row["kd"] = t.info.tags["kd"]
            row["teacher_run_id"] = t.info.tags.get("distill.teacher_run_id")
        rows.append(row)
    return rows


def method_groups(tables: list[Table]) -> list[Table]:
    """Train runs of the PEFT/full methods, in seed 003's order, when at least two methods are present."""
    runs = [t for t in tables if t.info.trained and t.info.method in METHOD_ORDER]
    if len({t.info.method for t in runs}) < 2:
        return []
    return sorted(runs, key=lambda t: METHOD_ORDER.index(t.info.method))


def kd_groups(tables: list[Table]) -> list[Table]:
    """Distillation runs with and without the teacher's soft targets, when both kinds are present."""
    runs = [t for t in tables if t.info.tags.get("kd") in ("true", "false")]
    if {t.info.tags["kd"] for t in runs} != {"true", "false"}:
        return []
    return sorted(runs, key=lambda t: t.info.tags["kd"], reverse=True)


# --------------------------------------------------------------------------------------------------
# Charts


def score_keys(tables: list[Table]) -> list[tuple[str, str]]:
    """(split, metric) pairs worth a bar panel, in first-seen order."""
    keys: dict[tuple[str, str], None] = {}
    for t in tables:
        for split, metrics in t.splits.items():
            keys.update({(split, m): None for m in metrics if is_score(m)})
    return list(keys)


def metric_bars(tables: list[Table], colors: dict[str, str], label: Any = None) -> list[Any]:
    """A panel per (split, metric): a bar per run, baselines hatched."""
    from lora_exp.report_plots import Bars

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
    from lora_exp.report_plots import Lines, line_chart

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
    ``lora_exp.metrics.plot_confusion_matrix``; they are reused, not redrawn)."""
    from lora_exp.report_plots import image_row

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


# --------------------------------------------------------------------------------------------------
# The report


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
    from lora_exp.report_plots import bar_chart, palette
    from lora_exp.tables import write_csv

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
                               ("methods", method_groups(tables), lambda t: f"{t.info.name} ({t.info.method})"),
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
    return "KD" if t.info.tags.get("kd") == "true" else "no KD"


def markdown_sections(r: Report) -> list[str]:
    from lora_exp.tables import markdown_table

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

    from lora_exp.tracking import _experiment_id, git_commit

    exps = {t.info.experiment for t in report.tables}
    name = experiment or (exps.pop() if len(exps) == 1 else DEFAULT_LOG_EXPERIMENT)
    ids = ",".join(t.info.run_id for t in report.tables)
    tags = {"job": "compare", "git_commit": git_commit(), "lora_exp.selection": report.selection[:500],
            "lora_exp.compared_runs": ids[:7900], MLFLOW_RUN_NOTE: report.markdown_summary()}
    run = client.create_run(_experiment_id(client, name, uri), run_name=COMPARISON_RUN, tags=tags)
    try:
        for name in report.files():  # only what this report wrote, whatever else --out holds
            client.log_artifact(run.info.run_id, str(report.out / name))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
