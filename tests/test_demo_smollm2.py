"""The demo's claim on the real SmolLM2-135M: LoRA fine-tuning clearly beats the zero-shot baseline, and the
MLflow store holds both runs with params, metrics, confusion matrix and an adapter < 5% of the base model.
Then seed 004 on the same data: a DistilRNN distilled from that LoRA teacher and the same student without KD
both train and are logged as a pair tagged with the teacher's run. Which one wins is not asserted: on these
240 rows the teacher is certain (log-prob gaps of 8-13 nats), so its soft targets carry almost no more than
the labels, and the held-out accuracy of either student moves with the seed (see the closing note of
issue 3 for measured numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import ROOT, run_cli


@pytest.mark.slow
def test_demo_lora_beats_zero_shot_baseline(smollm2, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("run", "-f", "values/demo.yaml", "--set", f"output_root={tmp_path / 'outputs'}",
                   "--set", f"tracking.tracking_uri={uri}", cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("demo-tickets")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    base, lora = runs["baseline"].data.metrics, runs["lora"].data.metrics
    print(f"baseline accuracy {base['validation_accuracy']:.3f}, LoRA accuracy {lora['validation_accuracy']:.3f}")
    assert lora["validation_accuracy"] >= 0.85
    assert lora["validation_accuracy"] >= base["validation_accuracy"] + 0.3
    assert lora["validation_f1_macro"] > base["validation_f1_macro"]

    for name, run in runs.items():
        assert run.data.params["task.name"] == "custom", name
        files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "eval/validation")}
        assert "confusion_matrix.png" in files, name
    adapter = sum(f.file_size for f in client.list_artifacts(runs["lora"].info.run_id, "model"))
    base_size = sum(p.stat().st_size for p in smollm2.glob("*.safetensors"))
    assert adapter < 0.05 * base_size
    # The printed table lists both runs.
    table = proc.stdout[proc.stdout.rindex("run "):]
    assert "baseline" in table and "lora" in table

    # Distillation from the LoRA run just trained (values/demo-kd.yaml names it as teacher).
    proc = run_cli("run", "-f", "values/demo-kd.yaml", "--set", f"output_root={tmp_path / 'outputs'}",
                   "--set", f"tracking.tracking_uri={uri}", cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    # Each arm repeats over three seeds: one run per seed, `<arm>/seed-<seed>`, tagged with its group.
    arms = {arm: sorted(n for n in runs if n.startswith(f"{arm}/seed-")) for arm in ("kd-rnn", "no-kd-rnn")}
    assert all(len(names) == 3 for names in arms.values()), sorted(runs)
    for arm, names in arms.items():
        accs = [runs[n].data.metrics["validation_accuracy"] for n in names]
        print(f"DistilRNN {arm}: accuracy per seed {[f'{a:.3f}' for a in accs]}")
        for n in names:
            run = runs[n]
            assert run.data.tags["distill.teacher_run_id"] == runs["lora"].info.run_id, n
            assert run.data.tags["kd"] == ("true" if arm == "kd-rnn" else "false"), n
            assert run.data.params["distill.alpha"] == ("0.5" if arm == "kd-rnn" else "0.0"), n
    # The seeds really differ (data order and initialisation follow them).
    assert len({runs[n].data.params["training.seed"] for n in arms["kd-rnn"]}) == 3
