"""Talking to an MLflow tracking server, without the spool: where it is (the URI a run logs to, redacted
for logs), whether it answers (a probe of seconds, before any model loads), how its errors read (an outage to
ride out, or a request that retrying cannot fix), and the experiment a run goes in. Light: reports and the
CLI import this, not the spool and its thread."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_exp.config.fields import redact_uri
from lora_exp.config.loading import Run
from lora_exp.core.errors import UserError
from lora_exp.tracking.faults import classify, missing_package

log = logging.getLogger(__name__)


redact = redact_uri


DEADLINE_ENV = "LORA_EXP_TRACKING_DEADLINE"


START_DEADLINE_ENV = "LORA_EXP_TRACKING_START_DEADLINE"


# Our own retry loop rides out outages; MLflow's per-request retries (minutes by default) would block it.
# And MLflow prints each run's URL (credentials included, were they in the URI) to stdout: our log says it once.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tracking_uri(explicit: str | None = None) -> str:
    """The given URI (a spec's ``tracking.tracking_uri``, a ``--tracking-uri``), then $MLFLOW_TRACKING_URI,
    then an embedded local store in the working directory (sqlite:///mlflow.db, artifacts in ./mlartifacts)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_tracking_uri(run: Run) -> str:
    return tracking_uri(run.spec.tracking.tracking_uri)


def deadline(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:
        return default


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


def apply_client_defaults() -> None:
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first touches of a local sqlite store: MLflow creates and migrates its tables on first
    use, and two jobs starting together on a fresh file would both try (one fails)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


def check_store_packages(uri: str) -> None:
    """The packages MLflow needs for the store ``uri`` names import (``lora_exp.tracking.faults``): else
    UserError (exit 2) naming the package, before anything is written (a lock file, the sqlite store)."""
    problem = missing_package(uri)
    if problem:
        raise UserError(f"MLflow at {redact(uri)}: {problem}")


def probe(uri: str, timeout: float = 5.0) -> None:
    """One cheap request with no retries: a server that does not answer is known in seconds, before a model
    loads, instead of after minutes of client retries. Raises what ``faults.classify`` makes of a failure:
    TrackerUnavailable (exit 75) for an outage only."""
    from mlflow import MlflowClient

    check_store_packages(uri)
    with store_lock(uri), _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout))):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:
            raise classify(e, uri, "does not answer", "; nothing was loaded or written") from None


def error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", "") or "")


def is_permanent(e: BaseException) -> bool:
    """An MLflow error that retrying cannot fix (a bad value, a deleted run), as opposed to an outage."""
    return error_code(e) in PERMANENT_ERRORS


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The MLflow experiment ``name``, created when missing (an embedded store keeps artifacts beside it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_ARTIFACT_ROOT"):
        # Embedded store: keep artifacts beside the sqlite file, not in a server-side default.
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except Exception as e:  # another job created it a moment ago
        if error_code(e) == "RESOURCE_ALREADY_EXISTS":
            return str(client.get_experiment_by_name(name).experiment_id)
        raise
