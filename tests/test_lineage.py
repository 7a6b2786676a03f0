"""What a run records about its data and its machine. Dataset lineage: every run logs the data it used as
MLflow dataset inputs (source, digest of the rows as used, rows, subset seed), so two runs that claim the
same data can be checked to have used it. System metrics: MLflow's collectors, logged through the run's
spool as system/* metrics, on by default. (One set of runs serves both: each training costs CI time.)"""

from __future__ import annotations

import json

import pytest

from lora_exp import cli
from lora_exp.config.loading import resolve_runs
from lora_exp.core.tables import fmt
from lora_exp.engine.data import load_splits, rows_digest, subsample
from lora_exp.engine.fit import COST_ENV
from lora_exp.engine.fit import train_run as train
from lora_exp.tasks import get_task
from support import experiment, mlflow_client, write_values


def _inputs(client, run_id: str) -> dict[str, object]:
    out = {}
    for i in client.get_run(run_id).inputs.dataset_inputs:
        context = next(t.value for t in i.tags if t.key == "mlflow.data.context")
        assert context not in out, f"{context} logged twice"
        out[context] = i.dataset
    return out


def test_runs_record_the_rows_they_used_and_their_machine(tmp_path, tiny_gpt2, toy_data, monkeypatch):
    monkeypatch.setenv(COST_ENV, "2.5")  # what the chart sets from the profile's costPerGpuHour
    runs = {"a": {"method": {"name": "lora", "r": 2}, "training": {"max_steps": 2},
                  "tracking": {"system_metrics_interval": 1.0}},
            "b": {"method": {"name": "lora", "r": 4}, "training": {"max_steps": 2},
                  "tracking": {"system_metrics": False}},
            "reseeded": {"method": {"name": "lora", "r": 2}, "training": {"max_steps": 2}, "data": {"seed": 7}},
            "fewer": {"method": {"name": "lora", "r": 2}, "training": {"max_steps": 2},
                      "data": {"max_train_samples": 40}}}
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs=runs))
    resolved = {r.name: r for r in resolve_runs(values)}
    for r in resolved.values():
        train(r)
    client = mlflow_client(tmp_path)
    exp = client.get_experiment_by_name("toy").experiment_id
    mlflow_runs = {r.info.run_name: r for r in client.search_runs([exp])}
    by_name = {name: _inputs(client, r.info.run_id) for name, r in mlflow_runs.items()}

    a, b, reseeded, fewer = (by_name[n] for n in ("a", "b", "reseeded", "fewer"))
    # Same data, same seed: the same rows, whatever the method.
    assert a["train"].digest == b["train"].digest and a["eval"].digest == b["eval"].digest
    # Another shuffle seed or another subset: other training rows; the evaluation rows are unchanged.
    assert reseeded["train"].digest != a["train"].digest and reseeded["eval"].digest == a["eval"].digest
    assert fewer["train"].digest != a["train"].digest
    assert json.loads(fewer["train"].profile) == {"num_rows": 40, "seed": 42}
    assert json.loads(reseeded["train"].profile)["seed"] == 7

    # The digest is of the rows the run trained on: recomputed from the same spec, it matches.
    spec = resolved["fewer"].spec
    task = get_task(spec)
    train_rows, _, _ = subsample(spec, task, load_splits(spec, task))
    assert fewer["train"].digest == rows_digest(train_rows)

    # System metrics: on by default (run a, sampled every second), off where the spec says so (run b).
    on = mlflow_runs["a"]
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(on.info.run_id, key)
        assert history, f"{key} missing: {sorted(on.data.metrics)}"
        assert [m.step for m in history] == list(range(len(history)))  # one point per sample, in order
    assert on.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert not [k for k in mlflow_runs["b"].data.metrics if k.startswith("system/")]

    # Device-hours (one device per process) and, the profile priced, the run's cost; `compare` shows both.
    m = on.data.metrics
    assert 0 < m["device_hours"] < 1 and m["cost"] == pytest.approx(2.5 * m["device_hours"])
    # The wall time around the training loop (train_runtime is the loop's own): the attempt's seconds.
    assert m["train_runtime"] / 3600 <= m["device_hours"] < (m["train_runtime"] + 30) / 3600
    assert cli.main(["compare", "-f", str(values), "--out", str(tmp_path / "report")]) == 0
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    header = next(line for line in lines if "device-hours" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    row = next([c.strip() for c in line.strip("|").split("|")] for line in lines[lines.index(header):]
               if line.startswith("| a |"))
    assert row[cells.index("cost")] == fmt(m["cost"]) and row[cells.index("device-hours")] == fmt(m["device_hours"])
    assert "GPU energy (kJ)" not in header  # no GPU energy counter here: the column is left out
    # The memory plan's estimate sits beside the measured peak (tests/test_memplan.py checks they agree).
    assert m["plan_peak_memory_mb"] > 0 and m["peak_memory_growth_mb"] > 0

    # A rerun of a finished run does not log its inputs twice (_inputs asserts it); a resumed attempt logs
    # the same records again, which MLflow keeps once per (data set, run).
    train(resolved["a"])
    _inputs(client, client.search_runs([exp], "attributes.run_name = 'a'")[0].info.run_id)


def test_digest_follows_content_and_order_not_files(tmp_path):
    import datasets

    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    same = datasets.Dataset.from_list([dict(r) for r in rows])
    assert rows_digest(ds) == rows_digest(same)
    assert rows_digest(ds) != rows_digest(ds.select(range(9, -1, -1)))  # order matters: it is what trained
    assert rows_digest(ds) != rows_digest(datasets.Dataset.from_list([*rows[:9], {"text": "t9", "label": 0}]))
