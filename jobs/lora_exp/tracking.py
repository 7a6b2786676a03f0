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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lora_exp.spec import Run, RunSpec, flatten

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
SPEC_FILE = "lora_exp_run.yaml"  # the resolved spec, inside every model artifact


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The given URI, then $MLFLOW_TRACKING_URI, then an embedded local store in the working directory."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri(run: Run) -> str:
    return resolve_tracking_uri(run.spec.tracking.tracking_uri)


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
        "task": s.task.name,
        "method": {"train": s.method.name, "distill": "distill"}.get(job, "none"),
        "model": s.model.name,
        "formulation": s.formulation.kind,
        "job": job,
        "git_commit": git_commit(),
        "hardware_profile": os.environ.get("LORA_EXP_PROFILE", "local"),
        "image": os.environ.get("LORA_EXP_IMAGE", "local"),
        "lora_exp.values_file": run.source,
        "lora_exp.run": run.name,
        "lora_exp.experiment": run.experiment,
        "lora_exp.release": os.environ.get("LORA_EXP_RELEASE", ""),  # the Helm release, set by the chart
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
        import time

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

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # drops NaN


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        # Embedded store: keep artifacts beside the sqlite file, not in a server-side default.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


@contextmanager
def mlflow_run(run: Run, job: str, state_dir: Path | None = None):
    """Start (or, when ``state_dir`` remembers one, resume) the MLflow run; end it FINISHED/FAILED/KILLED.

    Yields a :class:`Tracker`. On ranks other than 0 nothing is created and the tracker is inert.
    """
    from lora_exp.errors import Preempted

    if not is_rank_zero():
        yield Tracker(None)
        return
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(run)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    state = state_dir / RUN_ID_FILE if state_dir else None
    run_id = None
    if state and state.is_file():
        run_id = json.loads(state.read_text())["run_id"]
        client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s", run_id)
    else:
        exp_id = _experiment_id(client, run.experiment_name, uri)
        created = client.create_run(exp_id, run_name=run.run_name, tags=run_tags(run, job))
        run_id = created.info.run_id
        params = flatten(run.spec.model_dump(mode="json"))
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifact(run_id, str(write_spec(run, Path(tmp) / "spec.yaml")))
        if state:
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
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


def _param(k: str, v: Any):
    from mlflow.entities import Param

    return Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def write_spec(run: Run, path: Path) -> Path:
    """The resolved spec travels with every artifact (``SPEC_FILE``)."""
    doc = {"experiment": run.experiment, "run": run.name, "source": run.source,
           "spec": run.spec.model_dump(mode="json")}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_spec(artifact: Path) -> RunSpec:
    """The spec a model artifact was trained with; a dir without one is not a lora-exp artifact."""
    from lora_exp.errors import UserError

    path = artifact / SPEC_FILE
    if not path.is_file():
        raise UserError(f"{artifact}: not a lora-exp artifact (no {SPEC_FILE})")
    return RunSpec.model_validate(yaml.safe_load(path.read_text())["spec"])


def locate_artifact(model_path: str | None, mlflow_run_id: str | None, tmp: Path) -> Path:
    """A model artifact given as a local dir or as an MLflow run (its ``model`` artifact, fetched into ``tmp``)."""
    artifact = Path(model_path) if model_path else download_model(mlflow_run_id, tmp)
    read_spec(artifact)  # fail here, naming the dir, rather than deep inside model loading
    return artifact


def download_model(run_id: str, dest: Path) -> Path:
    """Fetch the ``model`` artifact of an MLflow run."""
    from mlflow.artifacts import download_artifacts

    from lora_exp.errors import UserError

    try:
        return Path(download_artifacts(run_id=run_id, artifact_path="model", dst_path=str(dest)))
    except Exception as e:
        raise UserError(f"MLflow run {run_id!r} has no downloadable 'model' artifact: {e}") from None
