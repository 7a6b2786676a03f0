"""Preemption and resume: SIGTERM saves a checkpoint and ends the MLflow run KILLED (exit 143); running the
same command again continues from that checkpoint, in the same MLflow run, to the end. A hard kill
(no chance to save) resumes from the last periodic checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_exp.core.errors import PREEMPTED
from support import experiment, mlflow_client, run_cli, write_values


def _start(values: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_exp", "train", "-f", str(values)], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _values(tmp_path, tiny_gpt2, toy_data, max_steps: int, save_steps: int) -> Path:
    return write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, training={
        "max_steps": max_steps, "save_strategy": "steps", "save_steps": save_steps, "eval_strategy": "no",
        "logging_steps": 5, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
    }))


def _single_run(tmp_path):
    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def test_sigterm_checkpoints_and_rerun_resumes_in_same_mlflow_run(tmp_path, tiny_gpt2, toy_data):
    max_steps = 600  # long enough to still be training 3 s after SIGTERM (the JIT grace period)
    values = _values(tmp_path, tiny_gpt2, toy_data, max_steps=max_steps, save_steps=100000)
    out = tmp_path / "outputs" / "toy" / "lora"
    proc = _start(values, tmp_path)
    _wait_for(lambda: (out / "mlflow_run.json").exists() and _progress_started(tmp_path), proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, log
    (stopped_at,) = _checkpoints(out)  # the SIGTERM checkpoint; no periodic one was due
    assert 0 < stopped_at < max_steps
    client, run = _single_run(tmp_path)
    assert run.info.status == "KILLED"
    assert not (out / "final").exists()

    proc2 = run_cli("train", "-f", str(values), cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert f"resuming from {out / f'checkpoint-{stopped_at}'}" in proc2.stdout
    assert f"resuming at step {stopped_at}" in proc2.stdout
    client, resumed = _single_run(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps[0] == 5 and steps[-1] == max_steps  # one loss curve across both processes
    assert any(s <= stopped_at for s in steps) and any(s > stopped_at for s in steps)
    # Device-hours count both attempts' training time, not only the last one's.
    (first, second) = json.loads((out / "attempts.json").read_text())["attempts"]
    assert first["train_seconds"] > 0 and second["train_seconds"] > 0 and first["processes"] == 1
    total = first["train_seconds"] + second["train_seconds"]
    assert resumed.data.metrics["device_hours"] == pytest.approx(total / 3600, rel=1e-3)
    assert resumed.data.metrics["device_hours"] > resumed.data.metrics["train_runtime"] / 3600

    # A finished run is not trained again.
    proc3 = run_cli("train", "-f", str(values), cwd=tmp_path)
    assert proc3.returncode == 0 and "already finished" in proc3.stdout


def _progress_started(tmp_path: Path) -> bool:
    # The first progress line means the training loop is running (MLflow has a loss point).
    try:
        client, run = _single_run(tmp_path)
    except (AssertionError, AttributeError):
        return False
    return "loss" in run.data.metrics


@pytest.mark.parametrize("save_steps", [40])
def test_hard_kill_resumes_from_last_periodic_checkpoint(tmp_path, tiny_gpt2, toy_data, save_steps):
    values = _values(tmp_path, tiny_gpt2, toy_data, max_steps=300, save_steps=save_steps)
    out = tmp_path / "outputs" / "toy" / "lora"
    proc = _start(values, tmp_path)
    _wait_for(lambda: save_steps in _checkpoints(out), proc)
    proc.kill()  # SIGKILL: node loss, OOM kill; nothing is saved on the way out
    proc.wait()
    last = max(_checkpoints(out))

    proc2 = run_cli("train", "-f", str(values), cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert f"resuming at step {last}" in proc2.stdout
    client, run = _single_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert (out / "final" / "adapter_model.safetensors").exists()
