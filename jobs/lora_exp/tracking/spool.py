"""What a job logs, on its way to MLflow: a local spool and the thread that carries it.

Everything a job logs goes first into a local spool (``<state>/tracking/<run id>/spool.jsonl``, one JSON record
per line) and a background thread carries it to MLflow in order, retrying through outages with back-off.
Training only appends to a file, so a slow or absent server costs it nothing. A resumed attempt replays steps a
killed one may already have logged; a record whose (metric, step) the spool already holds is dropped, so the
server sees every step once (a resumed run is bit-identical, so the dropped value equals the kept one)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from lora_exp.core import tags
from lora_exp.tracking.faults import first_line
from lora_exp.tracking.server import error_code, is_permanent, redact
from lora_exp.tracking.sysmetrics import PREFIX as SYSTEM_PREFIX

log = logging.getLogger(__name__)


MAX_METRICS, MAX_TAGS, MAX_PARAMS = 1000, 100, 100  # MLflow's limits per log_batch request


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

    def holds(self, kind: str) -> bool:
        """Whether any record (of any attempt) is of this kind (``params``, ``status``, ...)."""
        return any(kind in record for record, _ in self.read(0))

    def steps(self) -> dict[str, int]:
        """Per metric, the highest step already spooled (by any attempt)."""
        seen: dict[str, int] = {}
        for record, _ in self.read(0):
            if "m" in record:
                seen[record["m"]] = max(seen.get(record["m"], -1), int(record["s"]))
        return seen


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
        """The data sets the run used (``engine.data.lineage`` records), as MLflow dataset inputs."""
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
                    log.warning("MLflow refused a record (%s): %s; skipping it", error_code(e), first_line(e))
                    self.spool.set_flushed(records[0][1])
                    continue
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); training goes on, records wait in %s",
                                redact(self.uri or ""), first_line(e), self.spool.path)
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
