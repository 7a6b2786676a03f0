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
import logging
from pathlib import Path

from lora_exp.core import errors
from lora_exp.reports.report import COMPARISON_RUN, DEFAULT_LOG_EXPERIMENT, build_report, log_report
from lora_exp.reports.selection import add_arguments as selection_arguments
from lora_exp.reports.selection import from_args, search
from lora_exp.tracking.server import redact

log = logging.getLogger(__name__)

HELP = "compare MLflow runs: baseline vs fine-tuned, methods, curves, confusion matrices -> Markdown report"



def add_arguments(parser: argparse.ArgumentParser) -> None:
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

    uri, sel, _ = from_args(args)
    client = MlflowClient(tracking_uri=uri)
    runs = search(client, sel, statuses=("FINISHED",), latest=not args.all_attempts)
    if not runs:
        raise errors.UserError(f"no finished lora-exp runs match ({sel.describe()}) at {redact(uri)}")
    out = Path(args.out)
    report = build_report(client, runs, out, sel.describe())
    log.info("report: %s (%d runs)", out / "report.md", len(runs))
    if not args.no_log:
        run_id = log_report(client, uri, report, args.log_experiment)
        log.info("logged as MLflow run %s (%s)", run_id, COMPARISON_RUN)
    print(report.markdown_summary())
    return errors.OK
