"""The one training path, after preparation, for every method, task and job that trains:

    Prepared -> MLflow run -> Trainer (resumes from the newest complete checkpoint) -> artifact -> evaluation

Re-running resumes from the latest complete checkpoint in the run's output dir and logs into the same
MLflow run; a finished run is not trained again (:func:`finished_metrics`), though what it could not upload
then is uploaded now. SIGTERM at any moment ends the job with a state the next attempt resumes from
(``lora_exp.core.preemption``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from lora_exp.config.fields import redact_uri
from lora_exp.config.loading import Run, write_spec
from lora_exp.core import allocator, preemption
from lora_exp.core.errors import Preempted
from lora_exp.core.layout import SPEC_FILE, RunDir, publish_dir, staging_dir, write_json
from lora_exp.core.tags import TRAIN
from lora_exp.engine.artifacts import artifact_size_mb
from lora_exp.engine.evaluation import evaluate_splits
from lora_exp.engine.memory import MemoryWatch, peak_memory
from lora_exp.engine.prepare import Prepared, prepare
from lora_exp.engine.trainer import best_losses, build_trainer, check_accelerator, describe_parallelism
from lora_exp.methods import Method, count_parameters
from lora_exp.tracking.runs import mlflow_run, upload_pending
from lora_exp.tracking.server import probe, run_tracking_uri
from lora_exp.tracking.spool import Tracker

log = logging.getLogger(__name__)
COST_ENV = "LORA_EXP_COST_PER_GPU_HOUR"  # the profile's price of a device-hour (the chart sets it)


def finished_metrics(run: Run, state: RunDir | None = None) -> dict[str, float] | None:
    """The metrics of a run that already finished (its ``metrics.json``), after uploading whatever of it
    never reached MLflow; None for a run still to do."""
    d = state or run.dir
    if not d.finished:
        return None
    upload_pending(run, d)
    log.info("run %s already finished (%s); delete %s (or use --restart) to run it again", run.name, d.metrics,
             d.root)
    return dict(json.loads(d.metrics.read_text()))


def train_run(run: Run, prepare_fn: Callable[[Run], Prepared] = prepare) -> dict[str, float]:
    """The train job (``lora-exp train``), and each trial of a sweep: nothing when finished (but upload what
    is pending), else check that the tracking server answers (seconds, before any model loads), prepare, fit."""
    done = finished_metrics(run)
    if done is not None:
        return done
    probe(run_tracking_uri(run))
    check_accelerator(run.spec)
    watch = MemoryWatch()  # before the model loads: its weights are part of what the plan estimates
    return fit(run, prepare_fn(run), watch)


def record_spec(run: Run) -> None:
    """Remember the spec the run starts with: a later attempt with another spec is refused (preflight)."""
    if not run.dir.run_spec.is_file():
        spec = run.spec.model_dump(mode="json")
        if spec["tracking"].get("tracking_uri"):  # compared without it; kept without its credentials
            spec["tracking"]["tracking_uri"] = redact_uri(spec["tracking"]["tracking_uri"])
        write_json(run.dir.run_spec, spec)


def memory_plan(run: Run, trainer: Any, train_ds: Any = None) -> dict[str, float]:
    """The plan's estimate for this run on this machine (``lora-exp plan``) at the length its batches reach
    (its data's longest row), logged beside the measured peak. Only a record: a failure to estimate is logged
    and never costs the run."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from lora_exp.planning.memplan import estimate, longest_row

    if is_deepspeed_zero3_enabled():
        # transformers would build even the meta model under deepspeed.zero.Init (collectives on one rank):
        # `lora-exp plan` gives the estimate of a ZeRO-3 run, from its own process.
        log.info("memory plan: not estimated inside a ZeRO-3 run (lora-exp plan estimates it)")
        return {}
    try:
        plan = estimate(run.spec, "gpu" if trainer.args.device.type == "cuda" else "cpu",
                        gpus=trainer.accelerator.num_processes, length=longest_row(run.spec, train_ds))
    except Exception as e:  # noqa: BLE001 - the estimate is a record, the run goes on
        log.warning("memory plan: no estimate (%s)", e)
        return {}
    if plan.device == "cpu":
        log.info("%s", allocator.describe())
    log.info("memory plan: peak %.0f MiB per device (%s)", plan.peak_mb,
             ", ".join(f"{k} {v:.0f}" for k, v in plan.breakdown.items()))
    return plan.metrics()


def device_cost(device_s: float | None) -> dict[str, float]:
    """``device_hours`` of the training, every attempt of a resumed run included, each at its own number of
    processes (one device per process: a GPU, or a CPU pod) and, where the profile prices them (the chart's
    ``costPerGpuHour``, env LORA_EXP_COST_PER_GPU_HOUR), its ``cost``. An attempt killed outright (SIGKILL,
    the node lost) never records itself: its time is missing."""
    if not device_s:
        return {}
    hours = device_s / 3600
    out = {"device_hours": hours}
    price = os.environ.get(COST_ENV, "")
    try:
        if price and float(price) > 0:
            out["cost"] = hours * float(price)
    except ValueError:
        log.warning("%s=%r is not a number: no cost logged", COST_ENV, price)
    return out


def fit(run: Run, p: Prepared, watch: MemoryWatch | None = None) -> dict[str, float]:
    spec, d = run.spec, run.dir
    trainable, total = count_parameters(p.model)
    log.info("parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    d.root.mkdir(parents=True, exist_ok=True)
    record_spec(run)
    with mlflow_run(run, spec.job, state_dir=d) as tracker:
        tracker.set_tags(p.tags)
        tracker.log_inputs([i.as_record() for i in p.inputs])
        tracker.log_metrics({"trainable_params": trainable, "total_params": total,
                             "trainable_share": trainable / total})
        trainer, stop = build_trainer(spec, p.model, p.form, p.tokenizer, d.root, p.train_ds, p.val_ds, tracker)
        describe_parallelism(trainer)
        # The plan models train runs; a distillation's student is not a model the plan builds.
        if trainer.is_world_process_zero() and spec.job == TRAIN:
            tracker.log_metrics(memory_plan(run, trainer, p.train_ds))
        resume = d.latest_checkpoint()
        if resume:
            log.info("resuming from %s", resume)
        started, device_s = time.monotonic(), 0.0
        with preemption.deferred():
            try:
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            finally:
                if trainer.is_world_process_zero():
                    device_s = d.record_attempt(time.monotonic() - started, trainer.accelerator.num_processes)
        if preemption.requested():
            saved, step = d.latest_checkpoint(), stop.stopped_at or trainer.state.global_step
            raise Preempted(f"run {run.name}: SIGTERM; stopped after step {step}, checkpoint "
                            f"{saved.name if saved else '(none)'} in {d.root}; the next attempt resumes")
        tracker.log_metrics({**result.metrics, **peak_memory(), **best_losses(trainer.state.log_history),
                             **device_cost(device_s)},
                            step=trainer.state.global_step)
        save_artifact(run, trainer, p.method, tracker)
        metrics = evaluate_splits(trainer, p.form, p.evals_raw, d.eval_dir, tracker)
        if watch is not None and trainer.is_world_process_zero():  # the whole run's peak, final evaluation too
            tracker.log_metrics(watch.metrics(), step=trainer.state.global_step)
        if spec.tracking.register_model:
            tracker.register_model(spec.tracking.register_model, "model")
        if trainer.is_world_process_zero():
            write_json(d.metrics, metrics)
    return metrics


def save_artifact(run: Run, trainer: Any, method: Method, tracker: Tracker) -> RunDir:
    """Write ``<run>/final`` atomically (all ranks take part: ZeRO-3 gathers shards) and log it as ``model``."""
    d = run.dir
    staging = staging_dir(d.final) if trainer.is_world_process_zero() else d.final.with_name("final.tmp")
    trainer.accelerator.wait_for_everyone()
    method.save(trainer, str(staging))
    if trainer.is_world_process_zero():
        write_spec(run, staging / SPEC_FILE)
        publish_dir(staging, d.final)
        tracker.log_artifacts(d.final, "model")
        tracker.log_metrics({"artifact_size_mb": artifact_size_mb(d.final)})
    trainer.accelerator.wait_for_everyone()
    return d
