"""What reaches MLflow says what ran: a spec value longer than MLflow keeps as a param (6,000 characters; MLflow
cuts it without a word) is cut by lora-exp, tagged as cut, and whole in the run's spec.yaml artifact."""

from __future__ import annotations

from pathlib import Path

import yaml

from lora_exp.core import tags
from support import experiment, mlflow_client, run_cli, write_values


def test_a_param_longer_than_mlflow_keeps_is_cut_said_and_whole_in_the_spec(tmp_path, tiny_gpt2, toy_data):
    # A few-shot template of 7 kB: the examples, then the row.
    template = "".join(f"Example {i}: a ticket about billing -> pos\n" for i in range(180)) + "Ticket: {text}"
    assert len(template) > 7000
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={"lora": {
        "method": {"name": "lora", "r": 2}, "formulation": {"kind": "classifier", "template": template},
        "training": {"max_steps": 1, "eval_strategy": "no", "save_strategy": "no"}}}))
    proc = run_cli("train", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    kept = run.data.params["formulation.template"]
    assert len(kept) == 6000 and template.startswith(kept)
    assert "formulation.template" in run.data.tags[tags.PARAMS_CUT]
    assert "spec.yaml" in run.data.tags[tags.PARAMS_CUT]
    assert len([k for k, v in run.data.params.items() if len(v) >= 6000]) == 1  # nothing else cut
    spec = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path / "dl")))
                          .read_text())
    assert spec["spec"]["formulation"]["template"] == template
