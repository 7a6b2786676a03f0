"""MLflow tracking that never costs a run: one MLflow run per job, reattached by every later attempt, written
only by rank 0, and never in the training loop's way (the spool: :mod:`lora_exp.tracking.spool`).

At the end the job waits a bounded time (``LORA_EXP_TRACKING_DEADLINE``, default 300 s) for the spool to drain;
if the server is still away, the results stay on disk and the job exits ``TRACKER_UNAVAILABLE`` (75): the chart
retries it and the next attempt only uploads. Runs are created with a key written to the run's directory
first, so an attempt killed between creating the run and recording its id reattaches to it by that key: no
orphan runs.

transformers' own ``MLflowCallback`` is not used: it logs TrainingArguments rather than our spec, cannot set
our tags, and ends the run when training ends, before our final evaluation and artifacts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_exp.config.fields import MLFLOW_PARAM_LENGTH, MLFLOW_TAG_LENGTH
from lora_exp.config.loading import Run, flatten, write_spec
from lora_exp.core import allocator, preemption, tags
from lora_exp.core.errors import Preempted, TrackerUnavailable, UserError
from lora_exp.core.layout import RunDir
from lora_exp.tracking.faults import classify, first_line
from lora_exp.tracking.server import (
    DEADLINE_ENV,
    START_DEADLINE_ENV,
    apply_client_defaults,
    deadline,
    experiment_id,
    git_commit,
    is_permanent,
    is_rank_zero,
    probe,
    redact,
    run_tracking_uri,
    store_lock,
)
from lora_exp.tracking.spool import Spool, Tracker
from lora_exp.tracking.sysmetrics import SystemMetrics

log = logging.getLogger(__name__)


def run_tags(run: Run, job: str) -> dict[str, str]:
    s = run.spec
    return {
        tags.TASK: s.task.name,
        tags.METHOD: {tags.TRAIN: s.method.name, tags.DISTILL: tags.DISTILL}.get(job, tags.NO_METHOD),
        tags.MODEL: s.model.name,
        tags.FORMULATION: s.formulation.kind,
        tags.JOB: job,
        tags.GIT_COMMIT: git_commit(),
        tags.HARDWARE_PROFILE: os.environ.get("LORA_EXP_PROFILE", "local"),
        tags.IMAGE: os.environ.get("LORA_EXP_IMAGE", "local"),
        tags.VALUES_FILE: run.source,
        tags.RUN_KEY: run.name,
        tags.EXPERIMENT: run.experiment,
        tags.RELEASE: os.environ.get("LORA_EXP_RELEASE", ""),  # the Helm release, set by the chart
        tags.SEED: str(s.training.seed),
        tags.ALLOCATOR: allocator.in_use(),
        **({tags.GROUP: run.group} if run.group else {}),
        **({tags.SWEEP_OF: run.sweep, tags.PARENT_RUN_ID: run.parent_run_id} if run.parent_run_id and run.sweep
           else {}),
        **s.tracking.tags,
    }


def run_params(run: Run) -> dict[str, str]:
    """The spec as flat MLflow params; the tracking URI redacted."""
    params = flatten(run.spec.model_dump(mode="json"))
    if params.get("tracking.tracking_uri"):
        params["tracking.tracking_uri"] = redact(params["tracking.tracking_uri"])
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}


def fit_params(params: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(params as MLflow keeps them, a tag naming those cut). MLflow cuts a value over its limit without a word
    (a few-shot template of 7 kB): cut here, and said so, the whole value being in the run's spec.yaml."""
    cut = sorted(k for k, v in params.items() if len(v) > MLFLOW_PARAM_LENGTH)
    if not cut:
        return params, {}
    note = (f"{', '.join(cut)}: longer than MLflow's {MLFLOW_PARAM_LENGTH} characters, cut; the whole spec is the "
            "artifact spec.yaml")
    return {k: v[:MLFLOW_PARAM_LENGTH] for k, v in params.items()}, {tags.PARAMS_CUT: note[:MLFLOW_TAG_LENGTH]}


def _attach_or_create(client: Any, run: Run, job: str, state: RunDir, uri: str) -> tuple[str, bool]:
    """(run id, created). The id recorded in ``state``; else the run tagged with ``state``'s run key (created
    by an attempt killed before it could record the id); else a new run tagged with that key."""
    run_id = state.mlflow_run_id()
    if run_id:
        return run_id, False
    key = state.run_key() or state.new_run_key()
    exp_id = experiment_id(client, run.experiment_name, uri)
    found = client.search_runs([exp_id], f"tags.\"{tags.RUN_UID}\" = '{key}'", max_results=1)
    with preemption.held():  # a SIGTERM waits for the id to be recorded: the run it names can then end KILLED
        if found:
            run_id = found[0].info.run_id
            log.info("reattaching to MLflow run %s (created by an attempt that stopped before recording it)", run_id)
            state.record_mlflow_run(run_id, redact(uri))
            return run_id, False
        created = client.create_run(exp_id, run_name=run.run_name, tags={**run_tags(run, job), tags.RUN_UID: key})
        run_id = created.info.run_id
        state.record_mlflow_run(run_id, redact(uri))
    return run_id, True


def _params(run: Run, state: RunDir, tracker: Tracker) -> None:
    """The run's params and spec, unless its spool holds them already: a run created now, or one whose first
    attempt stopped before queueing them (killed right after creating the run) gets them once."""
    assert tracker.run_id is not None and tracker.spool is not None
    if tracker.spool.holds("params"):
        return
    params, cut = fit_params(run_params(run))
    tracker.log_params(params)
    tracker.set_tags(cut)
    spec_file = state.tracking_dir(tracker.run_id) / "spec.yaml"
    write_spec(run, spec_file)
    tracker.log_artifact(spec_file)


def _end_killed(run: Run, tracker: Tracker | None, state: RunDir, uri: str) -> None:
    """A SIGTERM while the run was opening: end it KILLED (with its params), as one during training does.
    Without a recorded id there is no run, or one the next attempt finds by its key."""
    run_id = state.mlflow_run_id()
    if tracker is None and run_id is not None:
        tracker = Tracker(run_id, uri, Spool(state.tracking_dir(run_id))).start()
        _params(run, state, tracker)
    if tracker is not None:
        finish(tracker, "KILLED", 20.0)  # within the pod's grace period; the rest waits in the spool


def open_run(run: Run, job: str, state: RunDir) -> tuple[Tracker, bool]:
    """A started tracker on the run's MLflow run (created, or reattached), and whether it was created.
    The server gets ``LORA_EXP_TRACKING_START_DEADLINE`` seconds (default 120) to answer; then
    TrackerUnavailable. A missing package is a UserError at once, any other fault (``faults.classify``) exit 1.
    A SIGTERM from the moment the run exists ends it KILLED."""
    from mlflow import MlflowClient

    uri = run_tracking_uri(run)
    apply_client_defaults()
    end = time.monotonic() + deadline(START_DEADLINE_ENV, 120.0)
    delay = 1.0
    tracker: Tracker | None = None
    try:
        while True:
            try:
                with store_lock(uri):
                    run_id, created = _attach_or_create(MlflowClient(tracking_uri=uri), run, job, state, uri)
                break
            except Exception as e:
                fault = classify(e, uri, "cannot open the run")
                if isinstance(fault, UserError) or is_permanent(e) or time.monotonic() + delay > end:
                    raise fault from None
                log.warning("MLflow at %s not ready (%s); retrying in %.0f s", redact(uri), first_line(e), delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)
        with preemption.held():  # local and quick: the tracker and the run's first records, whole
            tracker = Tracker(run_id, uri, Spool(state.tracking_dir(run_id))).start()
            _params(run, state, tracker)
            if not created:
                tracker.set_status("RUNNING")
    except Preempted:
        _end_killed(run, tracker, state, uri)
        raise
    if created:
        log.info("MLflow run %s (experiment %r) at %s", run_id, run.experiment_name, redact(uri))
    else:
        log.info("resuming MLflow run %s at %s", run_id, redact(uri))
    return tracker, created


def ensure_run(run: Run, job: str, state: RunDir) -> str:
    """The id of the run's MLflow run, created (with its params) or reattached, left RUNNING: for a parent run
    (a sweep's) whose children log meanwhile."""
    tracker, _ = open_run(run, job, state)
    if not tracker.drain(deadline(START_DEADLINE_ENV, 120.0)):
        tracker.close()
        raise TrackerUnavailable(f"MLflow at {redact(tracker.uri or '')}: cannot record run {run.name}")
    tracker.close()
    assert tracker.run_id is not None
    return tracker.run_id


def finish(tracker: Tracker, status: str, deadline_s: float) -> bool:
    """Queue the final status, wait up to ``deadline_s`` for the spool to drain; True when it did."""
    tracker.stop_samplers()
    tracker.set_status(status)
    drained = tracker.drain(deadline_s)
    tracker.close()
    return drained


@contextlib.contextmanager
def mlflow_run(run: Run, job: str, state_dir: RunDir | None = None) -> Iterator[Tracker]:
    """Open (or reattach to) the run's MLflow run for the job's lifetime; end it FINISHED/FAILED/KILLED.

    Ends FINISHED only once everything reached the server: if it cannot within the deadline the job raises
    TrackerUnavailable (exit 75) and the run stays RUNNING until a later attempt uploads the rest. Off rank 0
    nothing is created and the tracker is inert. Without ``state_dir`` the run lives in a temporary one (it
    cannot be resumed)."""
    if not is_rank_zero():
        yield Tracker(None)
        return
    with contextlib.ExitStack() as stack:
        state = state_dir or RunDir(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lora-exp-run-"))))
        state.root.mkdir(parents=True, exist_ok=True)
        tracker, _ = open_run(run, job, state)
        try:
            if run.spec.tracking.system_metrics:
                tracker.attach(SystemMetrics(tracker, run.spec.tracking.system_metrics_interval).start())
            yield tracker
        except Preempted:
            finish(tracker, "KILLED", 20.0)  # within the pod's grace period; the rest waits in the spool
            raise
        except TrackerUnavailable:
            tracker.close()
            raise
        except BaseException:
            finish(tracker, "FAILED", 30.0)
            raise
        if not finish(tracker, "FINISHED", deadline(DEADLINE_ENV, 300.0)):
            raise TrackerUnavailable(f"MLflow at {redact(tracker.uri or '')} did not take the run's last records "
                                     f"in time; they wait in {state.root}, and the next attempt uploads them")


def upload_pending(run: Run, state: RunDir) -> bool:
    """A finished run whose last records never reached the server: send them now (no training, no model).
    Returns whether there was anything to send."""
    run_id = state.mlflow_run_id()
    if not is_rank_zero() or run_id is None or not state.tracking_dir(run_id).is_dir():
        return False
    spool = Spool(state.tracking_dir(run_id))
    if not spool.pending():
        spool.close()
        return False
    uri = run_tracking_uri(run)
    apply_client_defaults()
    probe(uri)
    log.info("run %s finished earlier; uploading what did not reach MLflow then", run.name)
    tracker = Tracker(run_id, uri, spool).start()
    drained = tracker.drain(deadline(DEADLINE_ENV, 300.0))
    tracker.close()
    if not drained:
        raise TrackerUnavailable(f"MLflow at {redact(uri)} did not take the pending records; retry later")
    return True
