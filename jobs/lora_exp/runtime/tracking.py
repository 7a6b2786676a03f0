"""MLflow tracking that never costs a run: one MLflow run per job, reattached by every later attempt, written
only by rank 0, and never in the training loop's way.

Everything a job logs goes first into a local spool (``<state>/tracking/<run id>/spool.jsonl``, one JSON record
per line) and a background thread carries it to MLflow in order, retrying through outages with back-off.
Training only appends to a file, so a slow or absent server costs it nothing. At the end the job waits a
bounded time (``LORA_EXP_TRACKING_DEADLINE``, default 300 s) for the spool to drain; if the server is still
away, the results stay on disk and the job exits ``TRACKER_UNAVAILABLE`` (75): the chart retries it and the
next attempt only uploads.

A resumed attempt replays steps a killed one may already have logged; a record whose (metric, step) the spool
already holds is dropped, so the server sees every step once (a resumed run is bit-identical, so the dropped
value equals the kept one). Runs are created with a key written to the run's directory first, so an attempt
killed between creating the run and recording its id reattaches to it by that key: no orphan runs.

transformers' own ``MLflowCallback`` is not used: it logs TrainingArguments rather than our spec, cannot set
our tags, and ends the run when training ends, before our final evaluation and artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_exp.config.loading import Run, flatten
from lora_exp.config.schema import redact_uri
from lora_exp.core import allocator, tags
from lora_exp.core.errors import Preempted, TrackerUnavailable
from lora_exp.core.layout import RunDir
from lora_exp.runtime.artifacts import write_spec
from lora_exp.runtime.sysmetrics import PREFIX as SYSTEM_PREFIX
from lora_exp.runtime.sysmetrics import SystemMetrics

log = logging.getLogger(__name__)

redact = redact_uri
DEADLINE_ENV = "LORA_EXP_TRACKING_DEADLINE"
START_DEADLINE_ENV = "LORA_EXP_TRACKING_START_DEADLINE"
# Our own retry loop rides out outages; MLflow's per-request retries (minutes by default) would block it.
# And MLflow prints each run's URL (credentials included, were they in the URI) to stdout: our log says it once.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
MAX_METRICS, MAX_TAGS, MAX_PARAMS = 1000, 100, 100  # MLflow's limits per log_batch request
PERMANENT_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tracking_uri(explicit: str | None = None) -> str:
    """The given URI (a spec's ``tracking.tracking_uri``, a ``--tracking-uri``), then $MLFLOW_TRACKING_URI,
    then an embedded local store in the working directory (sqlite:///mlflow.db, artifacts in ./mlartifacts)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_tracking_uri(run: Run) -> str:
    return tracking_uri(run.spec.tracking.tracking_uri)


def _deadline(env: str, default: float) -> float:
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


def probe(uri: str, timeout: float = 5.0) -> None:
    """One cheap request with no retries: a server that does not answer is known in seconds, before a model
    loads, instead of after minutes of client retries. Raises TrackerUnavailable."""
    from mlflow import MlflowClient

    with store_lock(uri), _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout))):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:
            raise TrackerUnavailable(f"MLflow at {redact(uri)} does not answer ({type(e).__name__}: "
                                     f"{_first_line(e)}); nothing was loaded or written") from None


def _first_line(e: BaseException) -> str:
    text = redact(str(e).strip())
    return text.splitlines()[0][:300] if text else type(e).__name__


def _error_code(e: BaseException) -> str:
    return str(getattr(e, "error_code", "") or "")


def is_permanent(e: BaseException) -> bool:
    """An MLflow error that retrying cannot fix (a bad value, a deleted run), as opposed to an outage."""
    return _error_code(e) in PERMANENT_ERRORS


# --------------------------------------------------------------------------------------------------
# The spool


class Spool:
    """Append-only JSON lines of what one MLflow run receives, and how much of it reached the server."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = directory / "spool.jsonl"
        self.mark = directory / "spool.flushed"
        self._repair()
        self._lock = threading.Lock()
        self._fh = self.path.open("a", encoding="utf-8")

    def _repair(self) -> None:
        """A process killed mid-write leaves a partial last line: drop it (the record is replayed)."""
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.path.open("r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def sync(self) -> None:
        with self._lock:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            self._fh.close()

    def flushed(self) -> int:
        try:
            return int(self.mark.read_text())
        except (OSError, ValueError):
            return 0

    def set_flushed(self, offset: int) -> None:
        tmp = self.mark.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.mark)

    def read(self, start: int) -> list[tuple[dict[str, Any], int]]:
        """Complete records from byte ``start``, each with the offset just past it."""
        with self.path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
        out, pos = [], start
        for line in data.split(b"\n")[:-1]:  # the last piece is "" or a line still being written
            pos += len(line) + 1
            out.append((json.loads(line), pos))
        return out

    def pending(self) -> bool:
        return self.path.stat().st_size > self.flushed()

    def steps(self) -> dict[str, int]:
        """Per metric, the highest step already spooled (by any attempt)."""
        seen: dict[str, int] = {}
        for record, _ in self.read(0):
            if "m" in record:
                seen[record["m"]] = max(seen.get(record["m"], -1), int(record["s"]))
        return seen


# --------------------------------------------------------------------------------------------------
# The tracker


class Tracker:
    """What a job logs to its MLflow run; every method is a no-op off rank 0 (``run_id`` None)."""

    def __init__(self, run_id: str | None, uri: str | None = None, spool: Spool | None = None) -> None:
        self.run_id = run_id
        self.uri = uri
        self.spool = spool
        self._steps = spool.steps() if spool else {}
        self._wake = threading.Event()  # new records (ignored while backing off from an outage)
        self._retry = threading.Event()  # retry now: the job is ending and waits for the spool to drain
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_since: float | None = None
        self._samplers: list[Any] = []  # e.g. SystemMetrics: stopped before the run's last records

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.spool is not None

    def _append(self, record: dict[str, Any]) -> None:
        if self.spool is not None:
            self.spool.append(record)
            self._idle.clear()
            self._wake.set()

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        ts, at = int(time.time() * 1000), int(step or 0)
        for key, value in metrics.items():
            if not _is_number(value) or at <= self._steps.get(key, -1):
                continue  # not a finite number, or a step an earlier attempt already logged
            self._steps[key] = at
            self._append({"m": key, "v": float(value), "s": at, "t": ts})

    def log_params(self, params: dict[str, str]) -> None:
        if self.active:
            self._append({"params": params})

    def set_tags(self, values: dict[str, str]) -> None:
        if self.active and values:
            self._append({"tags": {k: str(v) for k, v in values.items()}})

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload a directory of the run's outputs (it must stay until the run ends: uploads are queued)."""
        if self.active:
            self._append({"dir": str(Path(local_dir).resolve()), "to": artifact_path})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file; a copy is kept with the spool, so the original may go at once."""
        if self.active:
            assert self.spool is not None
            keep = self.spool.dir / "files" / f"{len(list(self.spool.dir.glob('files/*')))}"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, keep / Path(path).name)
            self._append({"file": str((keep / Path(path).name).resolve()), "to": artifact_path})

    def log_inputs(self, inputs: list[dict[str, Any]]) -> None:
        """The data sets the run used (``runtime.data.lineage`` records), as MLflow dataset inputs."""
        if self.active and inputs:
            self._append({"inputs": inputs})

    def logged_steps(self) -> dict[str, int]:
        """Per metric, the highest step spooled so far (by this attempt or an earlier one)."""
        return dict(self._steps)

    def attach(self, sampler: Any) -> None:
        """A background sampler that logs through this tracker; its ``stop()`` runs before the last records."""
        self._samplers.append(sampler)

    def stop_samplers(self) -> None:
        while self._samplers:
            self._samplers.pop().stop()

    def register_model(self, name: str, artifact_path: str) -> None:
        """Register the run's artifact as a new version of model ``name`` once everything before it arrived."""
        if self.active:
            self._append({"register": name, "path": artifact_path})

    def set_status(self, status: str) -> None:
        if self.active:
            self._append({"status": status})

    # -- the background thread

    def start(self) -> Tracker:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lora-exp-tracker", daemon=True)
            self._thread.start()
        return self

    def drain(self, deadline_s: float) -> bool:
        """Wait until everything spooled reached the server (True) or the deadline passed (False)."""
        if not self.active:
            return True
        self._wake.set()
        self._retry.set()
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert self.spool is not None
            if not self.spool.pending():
                return True
            self._idle.wait(min(1.0, max(0.0, end - time.monotonic())))
        return not (self.spool and self.spool.pending())

    def close(self) -> None:
        self.stop_samplers()
        self._stop.set()
        self._wake.set()
        self._retry.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.spool is not None:
            self.spool.sync()
            self.spool.close()

    def _run(self) -> None:
        from mlflow import MlflowClient

        assert self.spool is not None and self.run_id is not None
        client = MlflowClient(tracking_uri=self.uri)
        backoff = 0.5
        while not self._stop.is_set():
            records = self.spool.read(self.spool.flushed())
            if not records:
                self._idle.set()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                offset = self._send(client, records)
            except Exception as e:
                if is_permanent(e):
                    log.warning("MLflow refused a record (%s): %s; skipping it", _error_code(e), _first_line(e))
                    self.spool.set_flushed(records[0][1])
                    continue
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); training goes on, records wait in %s",
                                redact(self.uri or ""), _first_line(e), self.spool.path)
                # Back off: new records do not cut the wait short (retrying on every logged step would cost the
                # training loop the CPU it needs); a draining job does.
                self._retry.wait(backoff)
                self._retry.clear()
                backoff = min(backoff * 2, 10.0)
                continue
            self.spool.set_flushed(offset)
            if self._outage_since is not None:
                log.info("MLflow reachable again after %.0f s; catching up", time.monotonic() - self._outage_since)
                self._outage_since = None
            backoff = 0.5

    def _send(self, client: Any, records: list[tuple[dict[str, Any], int]]) -> int:
        """Send the first group of records (consecutive metrics, tags or params share a request); returns the
        spool offset just past what was sent."""
        from mlflow.entities import Metric, Param, RunTag

        first = records[0][0]
        assert self.run_id is not None
        if "m" in first:
            group: list[tuple[dict[str, Any], int]] = []
            for record, end in records:
                if "m" not in record or len(group) == MAX_METRICS:
                    break
                group.append((record, end))
            client.log_batch(self.run_id, metrics=[Metric(r["m"], r["v"], r["t"], r["s"]) for r, _ in group])
            return group[-1][1]
        if "tags" in first:
            items = list(first["tags"].items())
            for i in range(0, len(items), MAX_TAGS):
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items[i:i + MAX_TAGS]])
        elif "params" in first:
            items = list(first["params"].items())
            for i in range(0, len(items), MAX_PARAMS):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS]])
        elif "dir" in first:
            if Path(first["dir"]).is_dir():
                client.log_artifacts(self.run_id, first["dir"], first["to"])
        elif "file" in first:
            if Path(first["file"]).is_file():
                client.log_artifact(self.run_id, first["file"], first["to"])
        elif "register" in first:  # queued last, after the artifact and the final metrics it is tagged with
            register_version(client, first["register"], self.run_id, first["path"])
        elif "inputs" in first:
            client.log_inputs(self.run_id, datasets=[_dataset_input(r) for r in first["inputs"]])
        elif "status" in first:
            if first["status"] == "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            else:
                client.set_terminated(self.run_id, status=first["status"])
        return records[0][1]


REGISTRY_TAGS = (tags.TASK, tags.METHOD, tags.MODEL, tags.FORMULATION, tags.GIT_COMMIT)


def register_version(client: Any, name: str, run_id: str, artifact_path: str) -> Any:
    """A new version of registered model ``name`` whose source is the run's artifact, tagged with the run's
    metrics and its task/method/model/formulation/git_commit tags: the registry alone says what a version
    scored and how it was made. (``export --register``, and ``tracking.register_model`` for train runs.)"""
    from mlflow.exceptions import MlflowException

    run = client.get_run(run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    version_tags = {k: str(v) for k, v in run.data.metrics.items() if not k.startswith(SYSTEM_PREFIX)}
    version_tags.update({k: v for k, v in run.data.tags.items() if k in REGISTRY_TAGS})
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id,
                                          tags=version_tags)
    log.info("registered %s version %s (from run %s)", name, version.version, run_id)
    return version


def _dataset_input(record: dict[str, Any]) -> Any:
    """An MLflow dataset input: name, digest and source identify the rows; the profile says how many and from
    which seed; the context tag says what the run did with them (MLflow's own ``mlflow.data.context``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = json.dumps({"num_rows": record["rows"], "seed": record["seed"]})
    ds = Dataset(name=record["name"], digest=record["digest"], source_type=record["source_type"],
                 source=json.dumps({"uri": record["source"]}), profile=profile)
    return DatasetInput(dataset=ds, tags=[InputTag(key="mlflow.data.context", value=record["context"])])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# Runs: create or reattach


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
        if _error_code(e) == "RESOURCE_ALREADY_EXISTS":
            return str(client.get_experiment_by_name(name).experiment_id)
        raise


def _attach_or_create(client: Any, run: Run, job: str, state: RunDir, uri: str) -> tuple[str, bool]:
    """(run id, created). The id recorded in ``state``; else the run tagged with ``state``'s run key (created
    by an attempt killed before it could record the id); else a new run tagged with that key."""
    run_id = state.mlflow_run_id()
    if run_id:
        return run_id, False
    key = state.run_key() or state.new_run_key()
    exp_id = experiment_id(client, run.experiment_name, uri)
    found = client.search_runs([exp_id], f"tags.\"{tags.RUN_UID}\" = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        log.info("reattaching to MLflow run %s (created by an attempt that stopped before recording it)", run_id)
        state.record_mlflow_run(run_id, redact(uri))
        return run_id, False
    created = client.create_run(exp_id, run_name=run.run_name, tags={**run_tags(run, job), tags.RUN_UID: key})
    run_id = created.info.run_id
    state.record_mlflow_run(run_id, redact(uri))
    return run_id, True


def open_run(run: Run, job: str, state: RunDir) -> tuple[Tracker, bool]:
    """A started tracker on the run's MLflow run (created, or reattached), and whether it was created.
    The server gets ``LORA_EXP_TRACKING_START_DEADLINE`` seconds (default 120) to answer; then
    TrackerUnavailable."""
    from mlflow import MlflowClient

    uri = run_tracking_uri(run)
    apply_client_defaults()
    end = time.monotonic() + _deadline(START_DEADLINE_ENV, 120.0)
    delay = 1.0
    while True:
        try:
            with store_lock(uri):
                run_id, created = _attach_or_create(MlflowClient(tracking_uri=uri), run, job, state, uri)
            break
        except Exception as e:
            if is_permanent(e) or time.monotonic() + delay > end:
                raise TrackerUnavailable(f"MLflow at {redact(uri)}: cannot open the run ({_first_line(e)})") from None
            log.warning("MLflow at %s not ready (%s); retrying in %.0f s", redact(uri), _first_line(e), delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
    tracker = Tracker(run_id, uri, Spool(state.tracking_dir(run_id))).start()
    if created:
        tracker.log_params(run_params(run))
        spec_file = state.tracking_dir(run_id) / "spec.yaml"
        write_spec(run, spec_file)
        tracker.log_artifact(spec_file)
        log.info("MLflow run %s (experiment %r) at %s", run_id, run.experiment_name, redact(uri))
    else:
        tracker.set_status("RUNNING")
        log.info("resuming MLflow run %s at %s", run_id, redact(uri))
    return tracker, created


def ensure_run(run: Run, job: str, state: RunDir) -> str:
    """The id of the run's MLflow run, created (with its params) or reattached, left RUNNING: for a parent run
    (a sweep's) whose children log meanwhile."""
    tracker, _ = open_run(run, job, state)
    if not tracker.drain(_deadline(START_DEADLINE_ENV, 120.0)):
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
        if run.spec.tracking.system_metrics:
            tracker.attach(SystemMetrics(tracker, run.spec.tracking.system_metrics_interval).start())
        try:
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
        if not finish(tracker, "FINISHED", _deadline(DEADLINE_ENV, 300.0)):
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
    drained = tracker.drain(_deadline(DEADLINE_ENV, 300.0))
    tracker.close()
    if not drained:
        raise TrackerUnavailable(f"MLflow at {redact(uri)} did not take the pending records; retry later")
    return True
