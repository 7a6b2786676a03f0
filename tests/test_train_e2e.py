"""End to end on tiny random models: train -> evaluate -> MLflow (params, metrics, adapter-only artifact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from lora_exp.config.loading import resolve_runs
from lora_exp.engine.fit import train_run as train
from support import experiment, mlflow_client, run_cli, write_values


def _runs_by_name(tmp: Path) -> dict:
    client = mlflow_client(tmp)
    exp = client.get_experiment_by_name("toy")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _artifact_files(tmp: Path, run_id: str, path: str) -> list[str]:
    return sorted(Path(f.path).name for f in mlflow_client(tmp).list_artifacts(run_id, path))


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("formulation", ["classifier", "verbalizer"])
def test_lora_train_eval_mlflow(model_fixture, formulation, toy_data, tmp_path, request):
    model_dir = request.getfixturevalue(model_fixture)
    values = write_values(tmp_path, experiment(
        model_dir, toy_data, tmp_path,
        runs={"lora": {"method": {"name": "lora", "r": 4, "alpha": 8}},
              "reeval": {"job": "eval", "eval": {"model_path": str(tmp_path / "outputs/toy/lora/final")}}},
        formulation={"kind": formulation},
    ))
    proc = run_cli("run", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # Progress lines for `kubectl logs`: step, loss, samples/s, ETA; no carriage returns off a TTY.
    assert "\r" not in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if "lora_exp.progress: step " in line]
    assert progress and all(w in progress[-1] for w in ("loss", "lr", "samples/s", "eta"))

    runs = _runs_by_name(tmp_path)
    run = runs["lora"]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.r"] == "4" and run.data.params["task.name"] == "custom"
    assert run.data.tags["method"] == "lora" and run.data.tags["task"] == "custom"
    assert {"git_commit", "hardware_profile", "image", "model"} <= set(run.data.tags)
    for metric in ("loss", "learning_rate", "validation_accuracy", "trainable_params", "total_params",
                   "train_runtime", "train_samples_per_second", "peak_cpu_memory_mb"):
        assert metric in run.data.metrics, metric
    assert 0 < run.data.metrics["trainable_params"] < run.data.metrics["total_params"]

    # The model artifact is the adapter alone: LoRA tensors (and, for a classifier, the new head).
    files = _artifact_files(tmp_path, run.info.run_id, "model")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    local = Path(mlflow_client(tmp_path).download_artifacts(run.info.run_id, "model", str(tmp_path / "dl")))
    with safe_open(local / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or "score" in k for k in keys), keys
    assert _artifact_files(tmp_path, run.info.run_id, "eval/validation") == [
        "confusion_matrix.png", "predictions.csv", "report.json", "results.json"]

    # Re-evaluating the saved adapter in an eval job reproduces the train job's final metrics.
    reeval = runs["reeval"]
    assert reeval.data.tags["job"] == "eval"
    assert reeval.data.metrics["validation_accuracy"] == pytest.approx(run.data.metrics["validation_accuracy"])
    results = json.loads((tmp_path / "outputs/toy/lora/eval/validation/results.json").read_text())
    assert results["accuracy"] == pytest.approx(run.data.metrics["validation_accuracy"])


def test_head_only_trains_only_the_head(tiny_gpt2, toy_data, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path,
                                               runs={"head": {"method": {"name": "head_only"}}}))
    (run,) = resolve_runs(values)
    metrics = train(run)
    assert "validation_accuracy" in metrics

    recorded = _runs_by_name(tmp_path)["head"].data.metrics
    assert recorded["trainable_params"] == 64 * 2  # score head: hidden 64 x 2 labels, no bias

    head = run.output_dir / "final" / "head.safetensors"
    with safe_open(head, "pt") as f:
        trained = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert list(trained) == ["score.weight"]
    # The base weights in the checkpoint equal the pretrained ones; only the head moved.
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2)
    ckpt = sorted(run.output_dir.glob("checkpoint-*"))[-1]
    from safetensors.torch import load_file

    state = load_file(ckpt / "model.safetensors")
    for name, p in base.named_parameters():
        if not name.startswith("score"):
            assert torch.equal(state[name], p.detach()), name
    assert not torch.equal(state["score.weight"], base.score.weight.detach())

    # The head-only artifact (head tensors over the untouched base) reloads and reproduces the metrics.
    from lora_exp.pipelines.eval_job import evaluate_run

    reeval_values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "reeval": {"job": "eval", "eval": {"model_path": str(run.output_dir / "final")}}}), name="reeval.yaml")
    (reeval,) = resolve_runs(reeval_values)
    again = evaluate_run(reeval)
    for key in ("validation_accuracy", "validation_f1_macro", "validation_loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    # Row for row: each text with its own label, prediction and scores (final evaluation keeps row order).
    scores = (run.output_dir / "eval/validation/predictions.csv").read_text()
    assert (reeval.output_dir / "eval-job/validation/predictions.csv").read_text() == scores
