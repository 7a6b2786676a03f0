"""Pre-flight checks of a train run, minutes before it would spend GPU hours: ``lora-exp sanity -f values/x.yaml``.

Seed 001's list. Each check is a function returning a :class:`Check`, run on the model and data the real
training path builds (``lora_exp.engine.prepare``, ``build_trainer``), so what passes here is what trains
(the checks: the functions below):

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
import contextlib
import functools
import gc
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_exp.config.loading import Run, add_spec_arguments, resolve_runs
from lora_exp.config.schema import RunSpec
from lora_exp.core import errors, tags
from lora_exp.core.tables import text_table
from lora_exp.methods import TrainableRule, count_parameters
from lora_exp.tasks import ClassificationTask
from lora_exp.tracking.server import probe, redact, run_tracking_uri

if TYPE_CHECKING:
    from lora_exp.engine.prepare import Prepared
    from lora_exp.formulations.class_scores import ClassificationFormulation

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
    from lora_exp.pipelines.sanity import run_checks

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
    from lora_exp.tracking.runs import mlflow_run

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


# The checks


MAX_DATA_ROWS = 50_000  # label and length statistics read at most this many (shuffled) training rows
PrepareFn = Callable[[Run], "Prepared"]



ModelCheck = Callable[["Prepared", RunSpec, Options], Check]


def run_checks(run: Run, opts: Options, prepare_fn: PrepareFn | None = None) -> list[Check]:
    """Every check, in order; a check that cannot run (the model did not load) is SKIPped, not failed twice.

    ``prepare_fn`` (default ``lora_exp.engine.prepare.prepare``) builds the run's model and data; tests pass their
    own to inject faults (a frozen adapter, a seed that does not hold).
    """
    from lora_exp.engine.prepare import prepare  # loads torch: only when checks run

    prepare_fn = prepare_fn or prepare
    loaded, p = check_model_loads(run, prepare_fn)
    results = [loaded]
    model_checks: list[tuple[str, ModelCheck]] = [("trainable", check_trainable), ("data", check_data),
                                                  ("gradient_flow", check_gradient_flow), ("overfit", check_overfit)]
    for name, fn in model_checks:
        skipped = _skipped(name, opts, p is not None)
        results.append(skipped or _guard(name, functools.partial(fn, p, run.spec, opts)))  # type: ignore[arg-type]
    ok = p is not None
    del p
    gc.collect()  # two more models load below
    results.append(_skipped("mlflow", opts, True) or _guard("mlflow", lambda: check_mlflow(run_tracking_uri(run))))
    results.append(_skipped("reproducible", opts, ok)
                   or _guard("reproducible", lambda: check_reproducible(run, opts, prepare_fn)))
    return results


def _skipped(name: str, opts: Options, loaded: bool) -> Check | None:
    if name in opts.skip:
        return Check(name, SKIP, "skipped (--skip)")
    return None if loaded else Check(name, SKIP, "the model did not load")


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check that crashes reports FAIL with the error (and the traceback in the log), and the rest still run."""
    try:
        return fn()
    except Exception as e:
        log.exception("sanity check %s raised", name)
        return Check(name, FAIL, f"{type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# The checks


def check_model_loads(run: Run, prepare_fn: PrepareFn) -> tuple[Check, Prepared | None]:
    t0 = time.monotonic()
    try:
        p = prepare_fn(run)
    except Exception as e:  # a data or spec error is this check's finding, not a crash
        log.debug("prepare failed", exc_info=True)
        return Check("model_loads", FAIL, f"{type(e).__name__}: {_first_line(e)}"), None
    seconds = time.monotonic() - t0
    return Check("model_loads", PASS, f"{type(p.model).__name__} ({p.form.kind}) in {seconds:.1f}s",
                 {"load_seconds": seconds}), p


def trainable_rule(p: Prepared) -> TrainableRule:
    """What the run's method says must (and may) train, from its registered ``trainable_rule``."""
    return p.method.trainable_rule(p.model)


def check_trainable(p: Prepared, spec: RunSpec, opts: Options) -> Check:
    trainable, total = count_parameters(p.model)
    values = {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}
    summary = f"{trainable:,} of {total:,} parameters train ({values['trainable_share']:.3%})"
    named = list(p.model.named_parameters())
    if trainable == 0:
        return Check("trainable", FAIL, "no parameter trains", values)
    rule = trainable_rule(p)
    own = [n for n, _ in named if rule.required(n)]
    frozen = [n for n, q in named if rule.required(n) and not q.requires_grad]
    outside = [n for n, q in named if q.requires_grad and not rule.allowed(n)]
    if not own:
        return Check("trainable", FAIL, f"{summary}; the model has no {rule.what}", values)
    if frozen:
        return Check("trainable", FAIL, f"{summary}; {len(frozen)} of {len(own)} tensors of {rule.what} are "
                     f"frozen, e.g. {frozen[0]}", values)
    if outside:
        return Check("trainable", FAIL, f"{summary}; {len(outside)} tensors outside {rule.what} train, "
                     f"e.g. {outside[0]}", values)
    return Check("trainable", PASS, f"{summary}: {rule.what} only", values)


def check_data(p: Prepared, spec: RunSpec, opts: Options) -> Check:
    """Sizes, token lengths and truncation, and (classification) whether the labels can teach anything."""
    ds = p.train_ds.select(range(min(len(p.train_ds), MAX_DATA_ROWS)))
    sizes = {"train": len(p.train_ds), **{split: len(rows) for split, rows in p.evals_raw.items()}}
    values: dict[str, float] = {f"{k}_rows": v for k, v in sizes.items()}
    fails, warns = [f"split {k!r} is empty" for k, n in sizes.items() if n == 0], []
    notes = [", ".join(f"{k} {n:,}" for k, n in sizes.items()) + " rows"]
    if "input_ids" in ds.column_names and len(ds):
        lengths = [len(ids) for ids in ds["input_ids"]]
        values["truncation_rate"] = sum(n >= spec.model.max_length for n in lengths) / len(lengths)
        values["mean_tokens"], values["max_tokens"] = sum(lengths) / len(lengths), max(lengths)
        notes.append(f"tokens mean {values['mean_tokens']:.1f}, max {max(lengths)} of {spec.model.max_length}; "
                     f"{values['truncation_rate']:.0%} truncated")
        if values["truncation_rate"] > opts.max_truncation:
            warns.append(f"{values['truncation_rate']:.0%} of training examples reach model.max_length "
                         f"{spec.model.max_length} (truncated)")
    task, form = p.task, p.form
    from lora_exp.formulations.class_scores import ClassificationFormulation

    if ("labels" in ds.column_names and isinstance(task, ClassificationTask)
            and isinstance(form, ClassificationFormulation)):
        _label_findings(task, form, ds, opts, values, fails, warns, notes)
    status = FAIL if fails else WARN if warns else PASS
    return Check("data", status, "; ".join([*fails, *warns, *notes]), values)


def _label_findings(task: ClassificationTask, form: ClassificationFormulation, ds: Any, opts: Options,
                    values: dict[str, float], fails: list[str], warns: list[str], notes: list[str]) -> None:
    import numpy as np

    labels = list(task.labels)
    try:
        gold = np.asarray(form.gold(_padded(ds["labels"])))
    except Exception as e:  # e.g. a verbalizer target that is no label word
        fails.append(f"labels do not decode to the label set {labels}: {type(e).__name__}: {_first_line(e)}")
        return
    bad = int(((gold < 0) | (gold >= len(labels))).sum())
    if bad:
        fails.append(f"{bad} training labels outside 0..{len(labels) - 1} ({labels})")
        return
    counts = {name: int((gold == i).sum()) for i, name in enumerate(labels)}
    shares = {name: n / max(len(gold), 1) for name, n in counts.items()}
    values.update({f"label_share.{name}": s for name, s in shares.items()})
    notes.append("labels " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    present = [name for name, n in counts.items() if n]
    if len(present) < 2:
        fails.append(f"every training row has the same label ({present[0] if present else '-'}): nothing to learn")
    elif len(present) < len(labels):
        warns.append(f"label(s) {[k for k in labels if not counts[k]]} never occur in training")
    elif max(shares.values()) > opts.max_label_share:
        top = max(shares, key=lambda k: shares[k])
        warns.append(f"label {top!r} holds {shares[top]:.0%} of training rows")


def _padded(labels: list[Any]) -> Any:
    """The label column as the collator would hand it to ``form.gold``: ragged token labels padded with -100."""
    import numpy as np

    if not labels or not isinstance(labels[0], list):
        return np.asarray(labels)
    out = np.full((len(labels), max(len(x) for x in labels)), -100, dtype=np.int64)
    for i, row in enumerate(labels):
        out[i, : len(row)] = row
    return out


def check_gradient_flow(p: Prepared, spec: RunSpec, opts: Options) -> Check:
    """One training batch through the Trainer's own loss: each adapted module (LoRA A and B together: B starts
    at zero, so A's first gradient is zero by design) must get a non-zero gradient, and nothing outside."""
    import torch

    with _trainer(p, spec, p.train_ds.select(range(min(len(p.train_ds), opts.overfit_samples)))) as trainer:
        model = trainer.model
        model.train()
        model.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        first = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(model, {k: v.to(device) if hasattr(v, "to") else v for k, v in first.items()})
        if not torch.isfinite(loss):
            return Check("gradient_flow", FAIL, f"loss is {loss.item()} on the first batch")
        loss.backward()
        rule = trainable_rule(p)
        groups: dict[str, float] = {}
        leaked = []
        for name, q in model.named_parameters():
            norm = float(q.grad.norm()) if q.grad is not None else 0.0
            if rule.required(name):
                groups[_module(name)] = groups.get(_module(name), 0.0) + norm
            elif norm > 0 and not rule.allowed(name):
                leaked.append(name)
        model.zero_grad(set_to_none=True)
    dead = [g for g, v in groups.items() if v == 0]
    values = {"loss": loss.item(), "grad_norm": math.fsum(groups.values()), "modules": len(groups),
              "modules_without_gradient": len(dead)}
    if not groups:
        return Check("gradient_flow", FAIL, "no trainable parameters to receive gradients", values)
    if dead:
        return Check("gradient_flow", FAIL, f"{len(dead)} of {len(groups)} trained modules get no gradient, e.g. "
                     f"{dead[0]}", values)
    if leaked:
        return Check("gradient_flow", FAIL, f"{len(leaked)} frozen tensors got gradients, e.g. {leaked[0]}", values)
    return Check("gradient_flow", PASS, f"all {len(groups)} trained modules get gradients (total norm "
                 f"{values['grad_norm']:.3g}); frozen weights none", values)


def _module(param: str) -> str:
    return re.sub(r"\.lora_[AB](\..*)?$", "", param)


def check_overfit(p: Prepared, spec: RunSpec, opts: Options) -> Check:
    """Learn ``overfit_samples`` examples (one batch, constant learning rate): a pipeline whose labels, loss or
    optimiser are miswired cannot, however long it trains."""
    tiny = p.train_ds.select(range(min(len(p.train_ds), opts.overfit_samples)))
    lr = opts.overfit_lr or spec.training.learning_rate
    overrides = {"max_steps": opts.overfit_steps, "learning_rate": lr, "lr_scheduler": "constant",
                 "warmup_ratio": 0.0, "weight_decay": 0.0, "per_device_train_batch_size": len(tiny),
                 "gradient_accumulation_steps": 1}
    with _trainer(p, spec, tiny, **overrides) as trainer:
        trainer.add_callback(_stop_below(opts.overfit_loss))
        trainer.train()
        losses = _losses(trainer)
    values = {"first_loss": losses[0], "best_loss": min(losses), "steps": len(losses), "learning_rate": lr}
    reached = next((i + 1 for i, v in enumerate(losses) if v < opts.overfit_loss), None)
    what = f"{len(tiny)} examples, lr {lr:g}: loss {losses[0]:.3g} -> {losses[-1]:.3g}"
    if reached is None:
        return Check("overfit", FAIL, f"{what}; not below {opts.overfit_loss} in {opts.overfit_steps} steps", values)
    return Check("overfit", PASS, f"{what}; below {opts.overfit_loss} at step {reached}", values)


def check_mlflow(uri: str) -> Check:
    """The jobs' own probe: one cheap request without retries, so an unreachable server fails fast."""
    t0 = time.monotonic()
    try:
        probe(uri, timeout=10)
    except Exception as e:  # an outage, a missing package, another fault (lora_exp.tracking.faults): one line each
        return Check("mlflow", FAIL, str(e))
    ms = 1000 * (time.monotonic() - t0)
    return Check("mlflow", PASS, f"{redact(uri)} answers ({ms:.0f} ms)", {"latency_ms": ms})


def check_reproducible(run: Run, opts: Options, prepare_fn: PrepareFn) -> Check:
    """Two fresh builds and short trainings from the same global seed (as two fresh processes start) must
    log the same losses: catches unseeded data order, initialisation or state that leaks between runs."""
    first = short_losses(run, opts.repro_steps, prepare_fn)
    second = short_losses(run, opts.repro_steps, prepare_fn)
    seed = run.spec.training.seed
    values: dict[str, float] = {"steps": len(first), "seed": seed}
    if len(first) != len(second):
        return Check("reproducible", FAIL, f"the runs logged {len(first)} and {len(second)} losses", values)
    for step, (a, b) in enumerate(zip(first, second, strict=True), start=1):
        if abs(a - b) > opts.repro_tolerance * max(abs(a), abs(b), 1e-12):
            return Check("reproducible", FAIL, f"seed {seed}: losses differ at step {step}: {a:.8g} vs {b:.8g}",
                         {**values, "first_difference_step": step})
    return Check("reproducible", PASS, f"seed {seed}: {len(first)} steps, same losses ({first[-1]:.6g} at the end)",
                 values)


def short_losses(run: Run, steps: int, prepare_fn: PrepareFn) -> list[float]:
    from lora_exp.engine.trainer import seed_everything

    seed_everything(run.spec.training.seed)
    p = prepare_fn(run)
    with _trainer(p, run.spec, p.train_ds, max_steps=steps) as trainer:
        trainer.train()
        return _losses(trainer)


# --------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def _trainer(p: Prepared, spec: RunSpec, train_ds: Any, **training: Any) -> Iterator[Any]:
    """The run's real Trainer (optimiser, schedule, precision, collator, loss) for a few quiet steps: logging
    every step, no evaluation, no checkpoints, no DeepSpeed, output in a temporary directory."""
    t = spec.training.model_copy(update={"logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                                         "early_stopping": None, "zero_stage": 0, "zero_offload": False, **training})
    quick = spec.model_copy(update={"training": t})
    from lora_exp.engine.callbacks import ProgressLogger
    from lora_exp.engine.trainer import build_trainer
    from lora_exp.tracking.spool import Tracker

    with tempfile.TemporaryDirectory(prefix="lora-exp-sanity-") as tmp:
        trainer, _ = build_trainer(quick, p.model, p.form, p.tokenizer, Path(tmp), train_ds, None, Tracker(None))
        trainer.remove_callback(ProgressLogger)
        yield trainer


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _stop_below(threshold: float) -> Any:
    from transformers import TrainerCallback

    class StopBelow(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and logs.get("loss", math.inf) < threshold:
                control.should_training_stop = True

    return StopBelow()
