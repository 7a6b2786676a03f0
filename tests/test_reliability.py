"""Reliability contracts that are not about a single input: a run directory belongs to its spec, SIGTERM is
honoured before training starts (and ends an MLflow run that exists KILLED), a tracking fault exits by who must
act, and what a run leaves behind never holds a credential."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

from lora_exp.core.errors import PREEMPTED, USER_ERROR
from support import Job, experiment, mlflow_client, run_cli, write_values


def _values(tmp_path, tiny_gpt2, toy_data, **training):
    return write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, training={
        "max_steps": 4, "eval_strategy": "no", "save_strategy": "no", **training}))


def test_a_rerun_with_a_changed_spec_is_refused_and_restart_starts_afresh(tmp_path, tiny_gpt2, toy_data):
    values = _values(tmp_path, tiny_gpt2, toy_data)
    assert run_cli("train", "-f", str(values), cwd=tmp_path).returncode == 0
    out = tmp_path / "outputs" / "toy" / "lora"
    before = (out / "metrics.json").read_text()

    for command in ("validate", "train"):
        proc = run_cli(command, "-f", str(values), "--set", "training.learning_rate=0.001", cwd=tmp_path)
        assert proc.returncode == USER_ERROR, proc.stdout[-2000:]
        assert "training.learning_rate: 0.005 -> 0.001" in proc.stdout and "--restart" in proc.stdout
    assert (out / "metrics.json").read_text() == before  # the finished run was not touched

    proc = run_cli("train", "-f", str(values), "--set", "training.learning_rate=0.001", "--restart", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    (old,) = out.parent.glob("lora.replaced-*")
    assert (old / "metrics.json").read_text() == before  # moved aside, not deleted
    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert sorted(r.data.params["training.learning_rate"] for r in runs) == ["0.001", "0.005"]


def test_sigterm_before_training_exits_143_and_the_next_attempt_runs(tmp_path, tiny_gpt2, toy_data, monkeypatch,
                                                                    caplog):
    """While the model loads there is nothing to checkpoint: stop at once, cleanly (exit 143, not killed by
    the signal), and leave nothing the next attempt trips over. The SIGTERM is sent from inside model loading
    (a test in another process could not be sure to land before the Trainer starts)."""
    from lora_exp import cli
    from lora_exp.engine import models, prepare

    values = _values(tmp_path, tiny_gpt2, toy_data)
    loading = models.load_model

    def preempted_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return loading(*args, **kwargs)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "load_model", preempted_while_loading)
    try:
        assert cli.main(["train", "-f", str(values)]) == PREEMPTED
        assert "lora_exp.progress" not in caplog.text and "SIGTERM before or after training" in caplog.text
        assert not list((tmp_path / "outputs").rglob("checkpoint-*"))
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        assert cli.main(["train", "-f", str(values)]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _runs_in(store: Path) -> int:
    """How many runs the sqlite store holds (0 while it, or its tables, do not exist yet)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=0.1)) as db:
            return int(db.execute("SELECT count(*) FROM runs").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sigterm_as_the_mlflow_run_is_created_ends_it_killed(tmp_path, tiny_gpt2, toy_data):
    """Between the MLflow run's creation and the Trainer (recording its id, queueing its params, starting its
    tracker, building the Trainer) a SIGTERM ends the run KILLED, with its params, and exit 143, as one during
    training does; not RUNNING until the next attempt. The job is signalled the moment its run is in the store."""
    job = Job(_values(tmp_path, tiny_gpt2, toy_data), tmp_path)
    while not _runs_in(tmp_path / "mlflow.db"):
        assert job.proc.poll() is None, job.log[-3000:]
        time.sleep(0.005)
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(120) == PREEMPTED, job.log[-3000:]
    assert "lora_exp.progress: training" not in job.log  # stopped before the Trainer ran
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.status == "KILLED", job.log[-3000:]
    assert run.data.params["method.name"] == "lora"


def test_tracking_faults_exit_by_who_must_act():
    """lora_exp.tracking.faults: an outage is 75 (retried), a package the store needs is 2 (a retry cannot
    install it), anything else 1, each message one line without the URI's credentials."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from lora_exp.core.errors import TrackerUnavailable, UserError
    from lora_exp.tracking.faults import classify

    def wrapped(inner: BaseException) -> MlflowException:  # as MLflow's http_request wraps what requests raised
        try:
            try:
                raise inner
            except Exception as e:
                raise MlflowException(f"API request to http://u:pw@h:5000/api failed with exception {e}") from None
        except MlflowException as outer:
            outer.__context__ = inner
            return outer

    cases = [
        (wrapped(requests.ConnectionError("Connection refused")), TrackerUnavailable),
        (wrapped(requests.exceptions.RetryError("too many 503 error responses")), TrackerUnavailable),
        (wrapped(requests.exceptions.ReadTimeout("read timed out")), TrackerUnavailable),
        (MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE), TrackerUnavailable),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("could not connect")),
         TrackerUnavailable),
        (wrapped(ModuleNotFoundError("No module named 'psycopg'", name="psycopg")), UserError),
        (wrapped(requests.exceptions.SSLError("certificate verify failed")), RuntimeError),
        (MlflowException("no such experiment", error_code=INVALID_PARAMETER_VALUE), RuntimeError),
        (ValueError("a bug"), RuntimeError),
    ]
    for error, kind in cases:
        fault = classify(error, "http://u:pw@h:5000", "does not answer")
        assert type(fault) is kind, (error, fault)
        assert "pw" not in str(fault) and "\n" not in str(fault) and "http://***@h:5000" in str(fault), fault
    assert "psycopg" in str(classify(cases[5][0], "http://h", "does not answer"))


def test_an_attempt_killed_between_creating_the_run_and_recording_it_leaves_no_orphan(tmp_path, tiny_gpt2,
                                                                                     toy_data, monkeypatch):
    """The run key is written before the MLflow run is created and the run is tagged with it: the next attempt
    finds that run instead of creating a second one."""
    import pytest

    from lora_exp.config.loading import resolve_runs
    from lora_exp.core.layout import RunDir
    from lora_exp.tracking import runs as tracking

    (run,) = resolve_runs(_values(tmp_path, tiny_gpt2, toy_data))

    def killed(self, run_id, uri):  # the process dies right after create_run returned
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "record_mlflow_run", killed)
    with pytest.raises(KeyboardInterrupt):
        tracking.open_run(run, "train", run.dir)
    monkeypatch.undo()
    assert run.dir.mlflow_run_id() is None and run.dir.run_key()
    tracker, created = tracking.open_run(run, "train", run.dir)
    tracker.close()
    assert not created and run.dir.mlflow_run_id()
    client = mlflow_client(tmp_path)
    (only,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert only.info.run_id == run.dir.mlflow_run_id()
