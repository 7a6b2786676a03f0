"""Pre-flight checks of a train run, minutes before it would spend GPU hours: ``lora-exp sanity -f values/x.yaml``.

Seed 001's list. Each check is a function returning a :class:`Check`, run on the model and data the real
training path builds (``lora_exp.runtime.prepare``, ``build_trainer``), so what passes here is what trains
(the checks themselves: ``lora_exp.reports.sanity_checks``):

============== ===========================================================================================
model_loads    data (checked), tokenizer, formulation and model with its method are built
trainable      parameters train, and only the method's (its registered ``trainable_rule``): LoRA the
               adapters (+ the task head), head_only the head, full everything; the trainable count and share
data           splits non-empty; classification labels decode, are in range and not a single class
               (WARN: a label missing, or one above ``--max-label-share``); token lengths; truncation rate
               (WARN above ``--max-truncation``)
gradient_flow  one backward pass: every adapted module receives a non-zero gradient, nothing else does
overfit        a tiny batch is learnt: training loss below ``--overfit-loss`` within ``--overfit-steps``
mlflow         the tracking server answers
reproducible   two short runs from the same seed log the same losses
============== ===========================================================================================

PASS and WARN pass; a FAIL makes the command exit with ``SANITY_FAILED`` (3); a bad spec or data file that
cannot even be read exits 2 like every command. Results are printed as a table and logged to MLflow as a
run ``<run>-sanity`` tagged ``job=sanity`` (``sanity.json``, one ``sanity.<check>.passed`` metric per check).

The checks run single-process and without DeepSpeed, whatever the spec says: they probe the model and data,
not the cluster. ``overfit`` trains the loaded model, so it runs last among the model checks.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_exp.config.loading import Run, add_spec_arguments, resolve_runs
from lora_exp.core import errors, tags
from lora_exp.core.tables import text_table
from lora_exp.runtime.tracking import mlflow_run

log = logging.getLogger(__name__)

HELP = "pre-flight checks of a train run: model, LoRA setup, data, gradients, overfit, MLflow, reproducibility"

SANITY_FAILED = errors.SANITY_FAILED  # a check failed (2 stays "bad spec or data", as for every command)
PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
CHECKS = ("model_loads", "trainable", "data", "gradient_flow", "overfit", "mlflow", "reproducible")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class Options:
    overfit_samples: int = 8
    overfit_steps: int = 100
    overfit_loss: float = 0.1
    overfit_lr: float | None = None  # None: the spec's learning rate
    repro_steps: int = 3
    repro_tolerance: float = 1e-6  # relative difference allowed between the two runs' losses
    max_truncation: float = 0.1
    max_label_share: float = 0.9
    skip: tuple[str, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    d = Options()
    parser.add_argument("--overfit-samples", type=int, default=d.overfit_samples, help="examples in the tiny batch")
    parser.add_argument("--overfit-steps", type=int, default=d.overfit_steps, help="steps allowed to overfit it")
    parser.add_argument("--overfit-loss", type=float, default=d.overfit_loss, help="loss the tiny batch must reach")
    parser.add_argument("--overfit-lr", type=float, help="learning rate for the overfit check (default: the spec's)")
    parser.add_argument("--repro-steps", type=int, default=d.repro_steps, help="steps of each reproducibility run")
    parser.add_argument("--max-truncation", type=float, default=d.max_truncation,
                        help="warn when a larger share of training examples is cut at model.max_length")
    parser.add_argument("--max-label-share", type=float, default=d.max_label_share,
                        help="warn when one label holds a larger share of the training rows")
    parser.add_argument("--skip", action="append", default=[], choices=CHECKS, help="skip a check (repeatable)")
    parser.add_argument("--no-log", action="store_true", help="do not log the results to MLflow")


def main(args: argparse.Namespace) -> int:
    from lora_exp.reports.sanity_checks import run_checks  # loads torch: only when checks run

    runs = [r for r in resolve_runs(args.values, args.run, args.overrides) if r.spec.job == tags.TRAIN]
    if not runs:
        raise errors.UserError(f"{args.values}: no train run to check (sanity checks the train jobs; eval and "
                               "distill runs are not checked)")
    opts = Options(overfit_samples=args.overfit_samples, overfit_steps=args.overfit_steps,
                   overfit_loss=args.overfit_loss, overfit_lr=args.overfit_lr, repro_steps=args.repro_steps,
                   max_truncation=args.max_truncation, max_label_share=args.max_label_share, skip=tuple(args.skip))
    failed = False
    for run in runs:
        checks = run_checks(run, opts)
        print(f"\nsanity: run {run.name}\n" + text_table([_row(c) for c in checks]))
        failed |= any(c.failed for c in checks)
        if not args.no_log:
            log_results(run, checks)
    return SANITY_FAILED if failed else errors.OK


def _row(c: Check) -> dict[str, str]:
    return {"check": c.name, "result": c.status, "detail": c.detail}


def log_results(run: Run, checks: list[Check]) -> str | None:
    """A run ``<run>-sanity`` (tag job=sanity) beside the experiment's runs; skipped when MLflow is down."""
    if any(c.name == "mlflow" and c.failed for c in checks):
        log.warning("MLflow unreachable: sanity results not logged")
        return None
    tracking = run.spec.tracking.model_copy(update={"run_name": f"{run.run_name}-sanity"})
    sanity_run = Run(experiment=run.experiment, name=run.name, spec=run.spec.model_copy(update={"tracking": tracking}),
                     source=run.source)
    failed = [c.name for c in checks if c.failed]
    with mlflow_run(sanity_run, tags.SANITY) as tracker, tempfile.TemporaryDirectory() as tmp:
        tracker.set_tags({tags.METHOD: run.spec.method.name, tags.SANITY_PASSED: str(not failed).lower(),
                          tags.SANITY_FAILED: ",".join(failed)})
        metrics = {f"sanity.{c.name}.passed": float(c.status in (PASS, WARN)) for c in checks if c.status != SKIP}
        metrics.update({f"sanity.{c.name}.{k}": v for c in checks for k, v in c.values.items()})
        tracker.log_metrics(metrics)
        (Path(tmp) / "sanity.json").write_text(json.dumps([asdict(c) for c in checks], indent=2))
        (Path(tmp) / "sanity.txt").write_text(text_table([_row(c) for c in checks]))
        tracker.log_artifact(Path(tmp) / "sanity.json")
        tracker.log_artifact(Path(tmp) / "sanity.txt")
        return tracker.run_id
