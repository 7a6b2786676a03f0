"""Sweeps: two worker processes share one Optuna study (a journal file), run every trial exactly once as MLflow
child runs of one parent, and the parent holds the best child's parameters, the trial table and the plots."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from support import Job, experiment, mlflow_client, write_values

pytestmark = pytest.mark.slow
TRIALS = 6


def _values(tmp_path, tiny_gpt2, toy_data) -> Path:
    return write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, training={
        "max_steps": 4, "eval_strategy": "no", "save_strategy": "no"}, runs={"search": {
            "method": {"name": "lora", "r": 4},
            "sweep": {"metric": "validation_accuracy", "sampler": "random", "trials": TRIALS, "seed": 1,
                      "params": {"training.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
                                 "method.r": {"choices": [2, 4, 8]}}}}}))


def test_two_workers_share_one_study_and_the_parent_holds_the_best(tmp_path, tiny_gpt2, toy_data):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    values = _values(tmp_path, tiny_gpt2, toy_data)
    workers = [Job(values, tmp_path, command="sweep", args=["--worker", str(i)]) for i in range(2)]
    for w in workers:
        assert w.finish() == 0, w.log[-4000:]
    started = [int(m) for w in workers for m in re.findall(r"sweep search: trial (\d+) of", w.log)]
    assert sorted(started) == list(range(TRIALS))  # every trial once, across both workers
    assert all(re.search(r"sweep search: trial \d+ of", w.log) for w in workers)  # both did work

    out = tmp_path / "outputs" / "toy" / "search"
    study = optuna.load_study(study_name="toy/search",
                              storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == TRIALS

    client = mlflow_client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("job") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == TRIALS and all(r.info.status == "FINISHED" for r in children)
    assert parent.info.status == "FINISHED"
    by_trial = {int(r.data.tags["lora_exp.run"].rsplit("-", 1)[1]): r for r in children}
    best_value = max(r.data.metrics["validation_accuracy"] for r in children)
    best = by_trial[int(parent.data.tags["best.trial"])]
    assert best.data.metrics["validation_accuracy"] == pytest.approx(best_value)
    assert parent.data.metrics["best_validation_accuracy"] == pytest.approx(best_value)
    assert parent.data.tags["best.method.r"] == best.data.params["method.r"]
    assert float(parent.data.tags["best.training.learning_rate"]) == pytest.approx(
        float(best.data.params["training.learning_rate"]))
    files = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "optimization_history.png", "param_importances.png"} <= files
    with open(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))) as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["number"]) for r in table] == [t.number for t in study.trials]  # Optuna's own table
    for row, trial in zip(table, study.trials, strict=True):
        assert row["state"] == trial.state.name and float(row["value"]) == pytest.approx(trial.value)
        assert int(row["params_method.r"]) == trial.params["method.r"]


def test_a_preempted_worker_resumes_its_trial(tmp_path, tiny_gpt2, toy_data):
    """A worker stopped mid-trial takes the same trial up again; the study never hands it to anyone else."""
    import signal

    values = _values(tmp_path, tiny_gpt2, toy_data)
    job = Job(values, tmp_path, command="sweep", args=["--worker", "0"])
    assert job.wait_for("sweep search: trial 1 of")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 143, job.log[-3000:]
    again = Job(values, tmp_path, command="sweep", args=["--worker", "0"])
    assert again.finish() == 0, again.log[-3000:]
    assert "resuming trial 1" in again.log
    started = re.findall(r"sweep search: trial (\d+) of", job.log + again.log)
    assert sorted(set(started), key=int) == [str(i) for i in range(TRIALS)]
