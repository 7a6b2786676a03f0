"""A run logged to a real `mlflow server` process on loopback, as a Kubernetes Job logs to the chart's server:
tracking URI from the environment, artifacts proxied by the server (--serve-artifacts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support import experiment, free_port, run_cli, write_values


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(artifacts)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.5)
    yield url, artifacts
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_run_logs_to_a_real_tracking_server(mlflow_server, tmp_path, tiny_llama, toy_data):
    from mlflow import MlflowClient

    url, artifacts = mlflow_server
    doc = experiment(tiny_llama, toy_data, tmp_path, runs={"lora": {"method": {"name": "lora", "r": 2}}})
    # The URI comes from the environment, as in a pod; system metrics every second; the adapter registered.
    doc["experiment"]["defaults"]["tracking"] = {"system_metrics_interval": 1.0, "register_model": "toy-adapter"}
    proc = run_cli("train", "-f", str(write_values(tmp_path, doc)), cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": url, "LORA_EXP_PROFILE": "cpu", "LORA_EXP_IMAGE": "test:1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(tracking_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["hardware_profile"] == "cpu" and run.data.tags["image"] == "test:1"
    assert run.data.params["method.r"] == "2" and "validation_accuracy" in run.data.metrics
    names = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    # The server, not the client, stored the artifact files.
    assert list(artifacts.rglob("adapter_model.safetensors"))
    # Dataset lineage, read back through the server: the rows used for training and for evaluation.
    inputs = {_context(i): i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval"}
    assert inputs["train"].name == "custom-train" and inputs["eval"].name == "custom-validation"
    assert json.loads(inputs["train"].profile) == {"num_rows": 64, "seed": 42}
    assert json.loads(inputs["train"].source)["uri"] == str(Path(toy_data["train"]).resolve())
    assert len(inputs["train"].digest) == 32 and inputs["train"].digest != inputs["eval"].digest
    # System metrics, through the spool to the server: one point per sample.
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and [m.step for m in cpu] == list(range(len(cpu)))
    assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")[-1].value > 0
    # The memory plan's estimate beside the measured peak.
    assert run.data.metrics["plan_peak_memory_mb"] > 0 and run.data.metrics["peak_memory_growth_mb"] > 0
    # The registry: the train run's adapter (tracking.register_model), then the merged model (export --register).
    (adapter,) = client.search_model_versions("name='toy-adapter'")
    assert adapter.run_id == run.info.run_id and adapter.source.endswith("/model")
    assert float(adapter.tags["validation_accuracy"]) == run.data.metrics["validation_accuracy"]
    proc = run_cli("export", "--mlflow-run-id", run.info.run_id, "--out", str(tmp_path / "merged"),
                   "--register", "toy-merged", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (merged,) = client.search_model_versions("name='toy-merged'")
    assert merged.run_id == run.info.run_id and merged.tags["method"] == "lora"
    assert {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "merged_model")} >= {"config.json"}


def _context(dataset_input) -> str:
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")
