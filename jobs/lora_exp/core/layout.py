"""Where a run keeps its files: ``<output_root>/<experiment>/<run>/``. One definition for every writer
and reader (train, eval, distill, export, sanity, resume).

    checkpoint-<step>/     Trainer checkpoints (resume from the newest complete one)
    final/                 the artifact: adapter, head or full model, plus lora_exp_run.yaml (the spec)
    eval/<split>/          final evaluation outputs (results.json, predictions.csv, ...)
    eval-job/<split>/      an eval job's outputs
    metrics.json           written last: its presence marks a finished run
    mlflow_run.json        the MLflow run this directory logs to (resumed runs reattach to it)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.json"
FINAL_DIR = "final"
RUN_ID_FILE = "mlflow_run.json"
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
    def final_tmp(self) -> Path:
        return self.root / (FINAL_DIR + ".tmp")

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

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first: a JIT save cut short has a sentinel and no trainer_state.json."""
        found = []
        for d in self.root.glob(CHECKPOINT_PREFIX + "*"):
            step = d.name.removeprefix(CHECKPOINT_PREFIX)
            if step.isdigit() and (d / "trainer_state.json").is_file() and not (d / INCOMPLETE_SENTINEL).exists():
                found.append((int(step), d))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None


def artifact_run_dir(artifact: Path) -> RunDir:
    """The run directory an artifact (``<run>/final``) belongs to."""
    return RunDir(artifact.parent)
