"""Reliability contracts that are not about a single input: a run directory belongs to its spec, SIGTERM is
honoured before training starts, and what a run leaves behind never holds a credential."""

from __future__ import annotations

import os
import signal

from lora_exp.core.errors import PREEMPTED, USER_ERROR
from support import experiment, mlflow_client, run_cli, write_values


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
