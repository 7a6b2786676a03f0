"""Which MLflow runs a report covers: the selection shared by ``lora-exp compare`` and ``lora-exp status``.

Runs are found through the tags every lora-exp job writes (``lora_exp.core.tags``), never through
run names alone: a values file's runs are its experiment plus the ``lora_exp.run`` tags of its run keys,
a Helm release's are those tagged ``lora_exp.release``. Re-running a job creates a new MLflow run with the
same tags, so by default only the newest run per (experiment, run key) is kept: the report shows the
current result, not every attempt.

Imports no ML library at module level; ``mlflow`` is imported by the functions that talk to the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_exp.config.loading import Run, resolve_runs
from lora_exp.core import tags
from lora_exp.core.errors import UserError
from lora_exp.tracking.server import redact, run_tracking_uri, tracking_uri


@dataclass(frozen=True)
class Selection:
    """What to select. The fields combine with AND; ``run_ids`` add runs to that. Empty: every lora-exp run."""

    experiments: tuple[str, ...] = ()
    run_names: tuple[str, ...] | None = None  # lora_exp.run tags (from a values file), None: any
    release: str | None = None
    filter: str | None = None  # an MLflow search filter, e.g. "tags.task = 'mnli'"
    run_ids: tuple[str, ...] = ()  # explicit runs: taken as they are, whatever their job or age

    def describe(self) -> str:
        parts = []
        if self.experiments:
            parts.append("experiment " + ", ".join(self.experiments))
        if self.run_names is not None:
            parts.append("runs " + ", ".join(self.run_names))
        if self.release:
            parts.append(f"release {self.release}")
        if self.filter:
            parts.append(f"filter {self.filter!r}")
        if self.run_ids:
            parts.append("run ids " + ", ".join(self.run_ids))
        return "; ".join(parts) or "every lora-exp run"


@dataclass
class RunInfo:
    """One MLflow run as the report tools see it: its tags, latest metrics and where it belongs."""

    run: Any  # mlflow.entities.Run
    experiment: str
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    @property
    def name(self) -> str:
        """The run key of the values file (the MLflow run name can be overridden by tracking.run_name)."""
        return str(self.tags.get(tags.RUN_KEY) or self.run.info.run_name or self.run_id[:8])

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.run.data.tags)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.run.data.metrics)

    @property
    def status(self) -> str:
        return str(self.run.info.status)

    @property
    def job(self) -> str:
        return self.tags.get(tags.JOB, "")

    @property
    def method(self) -> str:
        return self.tags.get(tags.METHOD, "")

    @property
    def task(self) -> str:
        return self.tags.get(tags.TASK, "")

    @property
    def model(self) -> str:
        return self.tags.get(tags.MODEL, "")

    @property
    def kd(self) -> bool | None:
        """True/False for a distillation run with/without the teacher's soft targets, else None."""
        return tags.kd_of(self.tags)

    @property
    def trained(self) -> bool:
        return self.job in tags.TRAINING_JOBS

    @property
    def is_baseline(self) -> bool:
        """An eval job of the base model as is: what fine-tuning is measured against."""
        return self.job == tags.EVAL and self.tags.get(tags.EVAL_SOURCE) == tags.BASELINE_SOURCE

    def history(self, client: Any, key: str) -> list[tuple[int, float]]:
        """(step, value) points of a metric, fetched once and kept."""
        if key not in self.histories:
            points = client.get_metric_history(self.run_id, key) if key in self.metrics else []
            self.histories[key] = sorted((m.step, m.value) for m in points)
        return self.histories[key]


# --------------------------------------------------------------------------------------------------
# Command-line arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The selection flags shared by ``compare`` and ``status``."""
    g = parser.add_argument_group("which runs")
    g.add_argument("-f", "--values", help="a values file: its experiment and run keys (and its tracking URI)")
    g.add_argument("--run", dest="runs", action="append", default=[], metavar="NAME",
                   help="with -f: only this run key (repeatable)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with -f: override a spec field, as for train (e.g. tracking.experiment_name=x)")
    g.add_argument("--experiment", dest="experiments", action="append", default=[], metavar="NAME",
                   help="an MLflow experiment (repeatable)")
    g.add_argument("--release", help="a Helm release: the runs tagged lora_exp.release=NAME")
    g.add_argument("--filter", help="an MLflow search filter ANDed to the rest, e.g. \"tags.task = 'mnli'\"")
    g.add_argument("--run-ids", nargs="+", default=[], metavar="ID", help="these MLflow runs, as they are")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: the values file's, else "
                   "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def from_args(args: argparse.Namespace) -> tuple[str, Selection, list[Run]]:
    """Tracking URI, selection and, with ``-f``, the values file's resolved runs (status lists unstarted ones)."""
    if (args.runs or args.overrides) and not args.values:
        raise UserError("--run and --set apply to a values file: give the file with -f")
    values_runs: list[Run] = [run for name in args.runs or [None] for run in
                              resolve_runs(args.values, name, args.overrides)] if args.values else []
    experiments = list(dict.fromkeys([*args.experiments, *(r.experiment_name for r in values_runs)]))
    sel = Selection(
        experiments=tuple(experiments),
        run_names=tuple(r.name for r in values_runs) if values_runs else None,
        release=args.release,
        filter=args.filter,
        run_ids=tuple(args.run_ids),
    )
    uris = {run_tracking_uri(r) for r in values_runs}
    if len(uris) > 1 and not args.tracking_uri:
        raise UserError(f"{args.values}: runs log to different tracking URIs {sorted(map(redact, uris))}; pick one "
                        "with "
                        "--tracking-uri")
    uri = args.tracking_uri or (uris.pop() if uris else tracking_uri())
    return uri, sel, values_runs


# --------------------------------------------------------------------------------------------------
# Searching


def filter_string(sel: Selection) -> str:
    """The server-side part of the selection (MLflow filters cannot OR run names: that happens locally)."""
    parts = []
    if sel.release is not None:
        parts.append(f"tags.\"{tags.RELEASE}\" = '{_quote(sel.release)}'")
    if sel.run_names is not None and len(sel.run_names) == 1:
        parts.append(f"tags.\"{tags.RUN_KEY}\" = '{_quote(sel.run_names[0])}'")
    if sel.filter:
        parts.append(sel.filter)
    return " and ".join(parts)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def search(client: Any, sel: Selection, statuses: Sequence[str] | None = None, latest: bool = True) -> list[RunInfo]:
    """The selected runs, oldest first. ``statuses`` keeps only runs in those states (e.g. FINISHED);
    ``latest`` keeps the newest run per (experiment, run key). Explicit run ids are always kept."""
    found = {rid: _get_run(client, rid) for rid in sel.run_ids}
    if sel.experiments or sel.release or sel.filter or sel.run_names is not None or not sel.run_ids:
        for r in _search_pages(client, _experiment_ids(client, sel), filter_string(sel)):
            if _wanted(r, sel):
                found.setdefault(r.info.run_id, r)
    names: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    out = []
    for r in sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True):
        if statuses and r.info.status not in statuses:
            continue
        exp_id = r.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        info = RunInfo(r, names[exp_id])
        if latest and r.info.run_id not in sel.run_ids:
            if (exp_id, info.name) in seen:
                continue
            seen.add((exp_id, info.name))
        out.append(info)
    return out[::-1]


def _wanted(run: Any, sel: Selection) -> bool:
    run_tags = run.data.tags
    if run_tags.get(tags.JOB) not in tags.RESULT_JOBS:
        return False
    return sel.run_names is None or run_tags.get(tags.RUN_KEY) in sel.run_names


def _experiment_ids(client: Any, sel: Selection) -> list[str]:
    """The named experiments that exist (a values file whose runs never started has none), else all."""
    if sel.experiments:
        exps = [client.get_experiment_by_name(name) for name in sel.experiments]
        return [e.experiment_id for e in exps if e is not None]
    return [e.experiment_id for e in _all_experiments(client)]


def _search_pages(client: Any, experiment_ids: list[str], filter_: str) -> Iterator[Any]:
    if not experiment_ids:
        return
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _all_experiments(client: Any) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _get_run(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise UserError(f"--run-ids: no MLflow run {run_id!r} ({e.message})") from None
