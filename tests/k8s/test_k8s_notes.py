"""templates/NOTES.txt: how to follow the Jobs' logs and open the MLflow UI."""

from __future__ import annotations

from k8s_helpers import jobs, kt, synthetic


def test_notes_name_every_job_and_the_log_command(render):
    values = synthetic(profile="h100-80g-x8-n2")
    text = kt.notes(values, release="exp")
    for j in jobs(render(values, release="exp")):
        assert f"kubectl -n {kt.NAMESPACE} logs -f job/{j['metadata']['name']}" in text
    assert "nodes=2" in text and "gpus/node=8" in text


def test_notes_open_the_in_chart_mlflow_ui():
    text = kt.notes(synthetic(mlflow={"enabled": True, "postgresql": {"existingSecret": "db"}}), release="exp")
    assert f"kubectl -n {kt.NAMESPACE} port-forward svc/exp-lora-exp-mlflow 5000:5000" in text
    assert "http://localhost:5000" in text


def test_notes_without_a_server():
    text = kt.notes(synthetic())
    assert "sqlite:////outputs/mlflow.db" in text and "mlflow.enabled=true" in text
    text = kt.notes(synthetic(mlflow={"trackingUri": "https://mlflow.example.com"}))
    assert "https://mlflow.example.com" in text
