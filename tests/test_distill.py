"""Distillation: the KD loss really depends on the teacher, and the KD / no-KD pair trains through the one
training path with the teacher's logits computed once and the teacher's MLflow run on the students."""

from __future__ import annotations

import pytest
import torch

from lora_exp.engine.students import DistilRNN, KDStudent, kd_loss
from support import experiment, mlflow_client, run_cli, write_values


def test_kd_loss_matches_formula_and_its_gradient_depends_on_the_teacher():
    torch.manual_seed(0)
    student = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    t1, t2 = torch.randn(4, 3), torch.randn(4, 3)
    alpha, temp = 0.7, 2.0

    loss = kd_loss(student, t1, labels, alpha, temp)
    p_t = torch.softmax(t1 / temp, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / temp, -1))).sum(-1).mean()
    expected = alpha * temp**2 * kl + (1 - alpha) * torch.nn.functional.cross_entropy(student, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    (g1,) = torch.autograd.grad(kd_loss(student, t1, labels, alpha, temp), student)
    (g2,) = torch.autograd.grad(kd_loss(student, t2, labels, alpha, temp), student)
    assert not torch.allclose(g1, g2)  # the KL term carries the teacher into the student's gradient
    (n1,) = torch.autograd.grad(kd_loss(student, t1, labels, 0.0, temp), student)
    (n2,) = torch.autograd.grad(kd_loss(student, t2, labels, 0.0, temp), student)
    assert torch.allclose(n1, n2)  # alpha = 0: plain cross-entropy, the teacher plays no part


def test_distil_rnn_reads_the_last_real_token():
    torch.manual_seed(0)
    model = KDStudent(DistilRNN(vocab_size=10, num_labels=2, embedding_dim=8, hidden_size=8), 0.5, 2.0)
    ids = torch.tensor([[1, 2, 3, 0, 0]])
    out_padded = model(ids, torch.tensor([[1, 1, 1, 0, 0]])).logits
    out_short = model(ids[:, :3], torch.ones(1, 3, dtype=torch.long)).logits
    assert torch.allclose(out_padded, out_short, atol=1e-6)  # padding does not change the prediction


@pytest.mark.parametrize("student", [{"kind": "rnn", "embedding_dim": 32, "hidden_size": 32},
                                     {"kind": "transformer", "hidden_size": 32, "num_layers": 1, "num_heads": 2}])
def test_kd_and_no_kd_students_from_a_trained_teacher(student, tmp_path, tiny_gpt2, toy_data):
    distill = {"teacher": {"run": "teacher"}, "student": student, "temperature": 2.0}
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "teacher": {"method": {"name": "lora", "r": 4}},
        "kd": {"job": "distill", "distill": {**distill, "alpha": 0.5}, "repeats": 2},
        "no-kd": {"job": "distill", "distill": {**distill, "alpha": 0.0}},
    }))
    proc = run_cli("run", "-f", str(values), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    teacher_id = runs["teacher"].info.run_id
    for name, kd in (("kd/seed-42", "true"), ("kd/seed-43", "true"), ("no-kd", "false")):
        tags = runs[name].data.tags
        assert tags["method"] == "distill" and tags["kd"] == kd and tags["distill.teacher_run_id"] == teacher_id
        assert "validation_accuracy" in runs[name].data.metrics
        assert runs[name].data.params["distill.student.kind"] == student["kind"]
    out = tmp_path / "outputs" / "toy"
    # Both repeats read the same rows (in their own order): the teacher runs once, the second reads the cache.
    assert len(list((out / ".cache" / "teacher-logits").glob("*.npy"))) == 1
    assert proc.stdout.count("computing teacher logits") == 1
    assert proc.stdout.count("teacher logits from the shared cache") == 1
    assert runs["kd/seed-42"].data.tags["lora_exp.group"] == "kd"
    assert (out / "kd" / "seed-42" / "final" / "model.safetensors").exists()


def test_a_kd_student_learns_what_its_teacher_says_not_the_labels(tmp_path, tiny_gpt2, toy_data, monkeypatch):
    """With alpha = 1 the labels play no part: a teacher that always names the wrong label must turn the
    student against the gold labels. A student that ignored the teacher's logits would learn the labels."""
    import numpy as np

    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.fit import train_run as train
    from lora_exp.pipelines import distill as distill_pipeline
    from lora_exp.pipelines.distill import distill

    def contrary_teacher(run, teacher_dir, teacher_spec, task, train_raw, tokenizer, tmp):
        wrong = 1 - np.asarray(train_raw["label"])
        return (np.eye(2, dtype=np.float32)[wrong] - 0.5) * 16.0  # confident and always wrong

    monkeypatch.setattr(distill_pipeline, "teacher_logits", contrary_teacher)
    student = {"kind": "rnn", "embedding_dim": 32, "hidden_size": 32}
    kd = {"teacher": {"run": "teacher"}, "student": student, "temperature": 1.0}
    train_opts = {"epochs": 12, "learning_rate": 1e-2, "eval_strategy": "no", "save_strategy": "no"}
    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "teacher": {"method": {"name": "lora", "r": 2}, "training": {"max_steps": 1}},
        "kd": {"job": "distill", "distill": {**kd, "alpha": 1.0}, "training": train_opts},
        "labels": {"job": "distill", "distill": {**kd, "alpha": 0.0}, "training": train_opts},
    }))
    teacher, kd_run, labels_run = resolve_runs(values)
    train(teacher)
    followed = distill(kd_run)["validation_accuracy"]
    learned = distill(labels_run)["validation_accuracy"]
    assert learned >= 0.75  # the labels are learnable in this budget...
    assert followed <= 0.25  # ...and the KD student learnt the teacher's (wrong) answers instead
