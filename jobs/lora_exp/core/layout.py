"""Where a run keeps its files: ``<output_root>/<experiment>/<run>/``. One definition for every writer
and reader (train, eval, distill, export, sanity, resume).

    checkpoint-<step>/     Trainer checkpoints (resume from the newest complete one)
    final/                 the artifact: adapter, head or full model, plus lora_exp_run.yaml (the spec)
    eval/<split>/          final evaluation outputs (results.json, predictions.csv, ...)
    eval-job/<split>/      an eval job's outputs
    metrics.json           written last: its presence marks a finished run
    mlflow_run.json        the MLflow run this directory logs to (resumed runs reattach to it)
    run_key.json           written before the MLflow run is created; the run is tagged with it
    run_spec.json          the spec the run started with (a rerun with another spec is refused)
    attempts.json          each attempt's training seconds and processes (device-hours count them all)
    tracking/<run id>/     the spool of what the MLflow run receives (lora_exp.tracking)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
FINAL_DIR = "final"
RUN_ID_FILE = "mlflow_run.json"
RUN_KEY_FILE = "run_key.json"
RUN_SPEC_FILE = "run_spec.json"
ATTEMPTS_FILE = "attempts.json"
TRACKING_DIR = "tracking"
SPEC_FILE = "lora_exp_run.yaml"  # the resolved spec, inside every model artifact
EVAL_DIR = "eval"
EVAL_JOB_DIR = "eval-job"
CHECKPOINT_PREFIX = "checkpoint-"
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"  # the Trainer's marker of a JIT save cut short


@dataclass(frozen=True)
class RunDir:
    """The output directory of one run."""

    root: Path

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def mlflow_state(self) -> Path:
        return self.root / RUN_ID_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def eval_job_dir(self) -> Path:
        return self.root / EVAL_JOB_DIR

    @property
    def finished(self) -> bool:
        return self.metrics.is_file()

    def mlflow_run_id(self) -> str | None:
        """The MLflow run this directory logs to, if one was created."""
        if not self.mlflow_state.is_file():
            return None
        return str(json.loads(self.mlflow_state.read_text())["run_id"])

    def record_mlflow_run(self, run_id: str, uri: str) -> None:
        write_json(self.mlflow_state, {"run_id": run_id, "tracking_uri": uri})

    def run_key(self) -> str | None:
        path = self.root / RUN_KEY_FILE
        return str(json.loads(path.read_text())["key"]) if path.is_file() else None

    def new_run_key(self) -> str:
        key = uuid.uuid4().hex
        write_json(self.root / RUN_KEY_FILE, {"key": key})
        return key

    def tracking_dir(self, run_id: str) -> Path:
        return self.root / TRACKING_DIR / run_id

    @property
    def run_spec(self) -> Path:
        return self.root / RUN_SPEC_FILE

    def archive(self) -> Path:
        """Move the directory aside (``<run>.replaced-<time>``) so a fresh run can start; returns where."""
        import time

        dest = self.root.with_name(f"{self.root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.root, dest)
        return dest

    def record_attempt(self, seconds: float, processes: int) -> float:
        """Add one attempt's training time; returns the device-seconds of every attempt so far (a preempted
        attempt's time was paid for too, its steps after the last checkpoint included; an attempt may have
        run on another number of devices)."""
        path = self.root / ATTEMPTS_FILE
        attempts = json.loads(path.read_text())["attempts"] if path.is_file() else []
        attempts.append({"train_seconds": round(seconds, 3), "processes": processes})
        write_json(path, {"attempts": attempts})
        return float(sum(a["train_seconds"] * a["processes"] for a in attempts))

    def started_spec(self) -> dict[str, Any] | None:
        """The spec this directory's run started with (None before it started)."""
        return dict(json.loads(self.run_spec.read_text())) if self.run_spec.is_file() else None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first. The Trainer writes trainer_state.json last, so a save cut short
        has none (or a truncated one); a JIT save cut short also leaves a sentinel."""
        found = []
        for d in self.root.glob(CHECKPOINT_PREFIX + "*"):
            step = d.name.removeprefix(CHECKPOINT_PREFIX)
            if step.isdigit() and _complete_state(d / "trainer_state.json") and not (d / INCOMPLETE_SENTINEL).exists():
                found.append((int(step), d))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None


def artifact_run_dir(artifact: Path) -> RunDir:
    """The run directory an artifact (``<run>/final``) belongs to."""
    return RunDir(artifact.parent)


def _complete_state(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def write_json(path: Path, doc: Any) -> None:
    """Write atomically: a reader (or the next attempt, after a kill) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def publish_permissions(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain ``open``/``mkdir`` would (the umask's).

    Why: safetensors (under transformers' ``save_pretrained``) writes model.safetensors through a 0600
    temporary file, so a model prepared or exported by one uid cannot be read by the Jobs' uid 10001 on a
    shared volume, although every other file beside it can.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


# Written by hand: no library stages a directory and swaps it in (os.replace renames a path, shutil copies).
def staging_dir(dest: Path) -> Path:
    """An empty ``<dest>.tmp`` beside ``dest`` to write a directory into (:func:`publish_dir` moves it in)."""
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_dir(staging: Path, dest: Path) -> Path:
    """Move a complete staging directory to ``dest`` in one rename (readers see the old directory or the whole
    new one, never half of it; a crash before leaves only ``<dest>.tmp``), its modes those a plain ``open``
    gives (:func:`publish_permissions`). An older ``dest`` is replaced."""
    publish_permissions(staging)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


@contextlib.contextmanager
def published(dest: Path) -> Iterator[Path]:
    """Write a directory under a staging name and publish it when the block ends without an error."""
    staging = staging_dir(dest)
    yield staging
    publish_dir(staging, dest)
