"""MLflow tracking: one run per job, resumed jobs log into the same run, only rank 0 writes.

transformers' own ``MLflowCallback`` is not used: it logs TrainingArguments rather than our spec, cannot
set our tags, and ends the run when training ends, before our final evaluation and artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_exp.config.loading import Run, flatten
from lora_exp.core import tags
from lora_exp.core.errors import Preempted
from lora_exp.core.layout import RunDir
from lora_exp.runtime.artifacts import write_spec

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tracking_uri(explicit: str | None = None) -> str:
    """The given URI (a spec's ``tracking.tracking_uri``, a ``--tracking-uri``), then $MLFLOW_TRACKING_URI,
    then an embedded local store in the working directory (sqlite:///mlflow.db, artifacts in ./mlartifacts)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_tracking_uri(run: Run) -> str:
    return tracking_uri(run.spec.tracking.tracking_uri)


def git_commit() -> str:
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
        **s.tracking.tags,
    }


class Tracker:
    """Thin wrapper over ``mlflow``'s client for one run; every method is a no-op off rank 0."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._client: Any = None
        if run_id:
            from mlflow import MlflowClient

            self._client = MlflowClient()

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, values: dict[str, str]) -> None:
        if self.active:
            for k, v in values.items():
                self._client.set_tag(self.run_id, k, v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drops NaN


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The MLflow experiment ``name``, created when missing (an embedded store keeps artifacts beside it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        # Embedded store: keep artifacts beside the sqlite file, not in a server-side default.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    return str(client.create_experiment(name, artifact_location=artifact_location))


@contextmanager
def mlflow_run(run: Run, job: str, state_dir: RunDir | None = None) -> Iterator[Tracker]:
    """Start (or, when ``state_dir`` remembers one, resume) the MLflow run; end it FINISHED/FAILED/KILLED.

    Yields a :class:`Tracker`. On ranks other than 0 nothing is created and the tracker is inert.
    """
    if not is_rank_zero():
        yield Tracker(None)
        return
    import mlflow
    from mlflow import MlflowClient

    uri = run_tracking_uri(run)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    run_id = state_dir.mlflow_run_id() if state_dir else None
    if run_id:
        client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s", run_id)
    else:
        exp_id = experiment_id(client, run.experiment_name, uri)
        created = client.create_run(exp_id, run_name=run.run_name, tags=run_tags(run, job))
        run_id = created.info.run_id
        params = flatten(run.spec.model_dump(mode="json"))
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifact(run_id, str(write_spec(run, Path(tmp) / "spec.yaml")))
        if state_dir:
            state_dir.root.mkdir(parents=True, exist_ok=True)
            state_dir.mlflow_state.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
        log.info("MLflow run %s (experiment %r) at %s", run_id, run.experiment_name, uri)
    tracker = Tracker(run_id)
    try:
        yield tracker
    except Preempted:
        client.set_terminated(run_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _param(k: str, v: Any) -> Any:
    from mlflow.entities import Param

    return Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
