"""One worker process of `make load-test`: a few simulated training jobs, each a thread doing what a train Job
does to MLflow through the real tracking code (``lora_exp.tracking.runs.open_run``, the spool's ``Tracker``,
``finish``): create the run with its tags, params and spec.yaml, log the Trainer's and the progress callback's
eight numbers every step at a fixed pace, upload an adapter directory at the end, end the run FINISHED and wait
for the spool to drain.

Jobs are threads in a few processes rather than a process each: 50+ Python processes importing MLflow would
spend this 2-core machine's CPU on imports and starve the server being measured. Every value is a function of
(job, step), so the parent can check each point in the store. MlflowClient's request methods are wrapped to time
them (the Tracker itself is untouched).

    python tools/load_jobs.py --uri URL --experiment NAME --jobs 0,1,2 --steps 1000 --step-ms 20 --work DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "values" / "demo.yaml"  # the demo's LoRA run: its real params and tags
SPEC_RUN = "lora"
ADAPTER_BYTES = 256 * 1024  # a rank-8 adapter of a ~100M model is a few MB; the size matters little here
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate", "epoch")  # MlflowMetrics: the Trainer's logs
PROGRESS_KEYS = ("progress", "max_steps", "samples_per_second", "eta_seconds")  # the Progress callback's
STEP_KEYS = TRAIN_KEYS + PROGRESS_KEYS
FINAL = {"train_runtime": 1.0, "validation_accuracy": 0.5, "artifact_size_mb": ADAPTER_BYTES / 2**20}


def value(job: int, key: str, step: int, steps: int) -> float:
    """What job ``job`` logs for ``key`` at ``step``: distinct per job, exactly representable through JSON,
    protobuf and PostgreSQL's float8 (Python's repr round-trips)."""
    return {
        "loss": 2.0 * math.exp(-step / 400) + job * 1e-3,
        "grad_norm": 1.0 + ((job * 7919 + step * 104729) % 1000) / 1000,
        "learning_rate": 2e-4 * (1 - step / (steps + 1)),
        "epoch": 3.0 * step / steps,
        "progress": step / steps,
        "max_steps": float(steps),
        "samples_per_second": 100.0 + job + step % 7,
        "eta_seconds": (steps - step) * 0.02,
    }[key]


class Calls:
    """Durations of MlflowClient's requests, per method, and their failures (which the Tracker retries)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.lag_ms: list[float] = []  # per metric batch sent: now - the oldest point's timestamp
        self.points = 0

    def wrap(self) -> None:
        from mlflow import MlflowClient

        for name in ("create_run", "log_batch", "log_artifact", "log_artifacts", "set_terminated", "update_run"):
            setattr(MlflowClient, name, self._timed(name, getattr(MlflowClient, name)))

    def _timed(self, name: str, fn: Any) -> Any:
        def call(client: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                out = fn(client, *args, **kwargs)
            except Exception as e:
                with self.lock:
                    kind = f"{name}: {type(e).__name__}"
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                raise
            done = time.perf_counter()
            metrics = kwargs.get("metrics") or []
            with self.lock:
                self.ms.setdefault(name, []).append((done - t0) * 1000)
                if metrics:
                    self.points += len(metrics)
                    self.lag_ms.append(time.time() * 1000 - min(m.timestamp for m in metrics))
            return out
        return call


def write_adapter(directory: Path, job: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(ADAPTER_BYTES))
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "job": job}))
    return directory


def simulate(job: int, run: Any, work: Path, steps: int, step_s: float, deadline_s: float) -> dict[str, Any]:
    """One job: open the run, ``steps`` logged steps at ``step_s`` each, the adapter, FINISHED, drained."""
    from lora_exp.core.layout import RunDir
    from lora_exp.tracking.runs import finish, open_run

    out: dict[str, Any] = {"job": job, "ok": False}
    t0 = time.monotonic()
    try:
        tracker, _ = open_run(run, "train", RunDir(work / f"job-{job:03d}"))
        out["run_id"], out["open_s"] = tracker.run_id, time.monotonic() - t0
        (work / f"job-{job:03d}" / "training").touch()  # the parent times its faults from here
        start, worst = time.monotonic(), 0.0
        out["t_train"] = time.time()
        for k in range(1, steps + 1):
            c0 = time.perf_counter()
            tracker.log_metrics({key: value(job, key, k, steps) for key in TRAIN_KEYS}, step=k)
            tracker.log_metrics({key: value(job, key, k, steps) for key in PROGRESS_KEYS}, step=k)
            worst = max(worst, time.perf_counter() - c0)
            time.sleep(max(0.0, start + k * step_s - time.monotonic()))
        train_end = time.monotonic()
        out["train_s"], out["worst_log_call_ms"] = train_end - start, worst * 1000
        tracker.log_artifacts(write_adapter(work / f"job-{job:03d}" / "final", job), "model")
        tracker.log_metrics(FINAL)
        out["drained"] = finish(tracker, "FINISHED", deadline_s)
        out["drain_s"] = time.monotonic() - train_end  # the backlog the spool still held when training ended
        out["ok"] = bool(out["drained"])
        out["t_end"] = time.time()
    except Exception as e:  # a job that fails is a finding, not a crash of the harness
        out["error"] = f"{type(e).__name__}: {e}"[:500]
        out["trace"] = traceback.format_exc()[-2000:]
    out["wall_s"] = time.monotonic() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--uri", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--jobs", required=True, help="comma-separated job numbers")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds a job waits for its spool to drain")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--ready", type=Path, required=True, help="touched once imported; then wait for --go")
    p.add_argument("--go", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    import lora_exp.plugins
    from lora_exp.config.loading import resolve_runs

    lora_exp.plugins.load()
    (base,) = resolve_runs(SPEC, SPEC_RUN, [f"tracking.experiment_name={a.experiment}",
                                            f"tracking.tracking_uri={a.uri}", "tracking.system_metrics=false"])
    calls = Calls()
    calls.wrap()
    jobs = [int(j) for j in a.jobs.split(",")]
    results: list[dict[str, Any]] = []
    a.ready.touch()
    while not a.go.exists():
        time.sleep(0.05)
    threads = [threading.Thread(target=lambda j=j: results.append(
        simulate(j, base.model_copy(update={"name": f"job-{j:03d}"}), a.work, a.steps, a.step_ms / 1000,
                 a.deadline)), name=f"job-{j}") for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.out.write_text(json.dumps({"jobs": sorted(results, key=lambda r: r["job"]), "calls_ms": calls.ms,
                                 "errors": calls.errors, "lag_ms": calls.lag_ms, "points_sent": calls.points}))


if __name__ == "__main__":
    main()
