"""`lora-exp sanity`: a healthy run passes every check and logs them to MLflow; each injected fault (a frozen
adapter, a seed that does not reproduce, broken labels, an unreachable MLflow) fails the check meant to
catch it, and the command exits SANITY_FAILED."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lora_exp import cli
from lora_exp.config.loading import resolve_runs
from lora_exp.core import errors
from lora_exp.pipelines.sanity import (
    CHECKS,
    FAIL,
    PASS,
    SANITY_FAILED,
    SKIP,
    Options,
    check_data,
    check_mlflow,
    check_reproducible,
    run_checks,
)
from support import experiment, free_port, mlflow_client, toy_rows, write_jsonl, write_values

FAST = Options(skip=("mlflow", "reproducible"))  # the checks on one loaded model only


@pytest.fixture
def values(tiny_gpt2, toy_data, tmp_path) -> Path:
    return write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "lora": {"method": {"name": "lora", "r": 4, "alpha": 8}},
        "head": {"method": {"name": "head_only"}},
        "baseline": {"job": "eval"},
    }))


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_healthy_lora_run_passes_every_check_and_logs_them(values, tmp_path, capsys):
    assert cli.main(["sanity", "-f", str(values), "--run", "lora"]) == errors.OK
    out = capsys.readouterr().out
    for name in CHECKS:
        assert any(line.startswith(name) and " PASS " in line for line in out.splitlines()), (name, out)

    client = mlflow_client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id], "tags.job = 'sanity'")
    assert run.info.run_name == "lora-sanity" and run.info.status == "FINISHED"
    assert run.data.tags["sanity.passed"] == "true" and run.data.tags["method"] == "lora"
    assert {f"sanity.{c}.passed" for c in CHECKS} <= set(run.data.metrics)
    assert all(run.data.metrics[f"sanity.{c}.passed"] == 1.0 for c in CHECKS)
    m = run.data.metrics
    assert 0 < m["sanity.trainable.trainable_params"] < m["sanity.trainable.total_params"]
    assert m["sanity.overfit.best_loss"] < 0.1 and m["sanity.data.truncation_rate"] == 0.0
    local = client.download_artifacts(run.info.run_id, "sanity.json", str(tmp_path / "dl"))
    assert [c["name"] for c in json.loads(Path(local).read_text())] == list(CHECKS)


def test_head_only_trains_only_the_head(values):
    (run,) = resolve_runs(values, "head")
    checks = _by_name(run_checks(run, Options(skip=FAST.skip, overfit_lr=0.05)))
    assert checks["trainable"].status == PASS and checks["trainable"].values["trainable_params"] == 64 * 2
    assert "the task head only" in checks["trainable"].detail
    assert checks["gradient_flow"].status == PASS and checks["overfit"].status == PASS
    assert checks["mlflow"].status == SKIP and checks["reproducible"].status == SKIP


def _frozen_adapter(run):
    p = _real_prepare(run)
    for name, param in p.model.named_parameters():
        if "lora_" in name:
            param.requires_grad = False
    return p


from lora_exp.engine.prepare import prepare as _real_prepare  # noqa: E402 - the one _frozen_adapter wraps


def test_frozen_adapter_fails_trainable_and_gradient_flow(values, monkeypatch, capsys):
    (run,) = resolve_runs(values, "lora")
    checks = _by_name(run_checks(run, Options(skip=(*FAST.skip, "overfit")), prepare_fn=_frozen_adapter))
    assert checks["trainable"].status == FAIL and "frozen" in checks["trainable"].detail
    assert checks["gradient_flow"].status == FAIL and "get no gradient" in checks["gradient_flow"].detail
    assert checks["data"].status == PASS  # the data is fine: only the model is broken

    # The command exits SANITY_FAILED (the fault injected where the command builds its model).
    monkeypatch.setattr("lora_exp.engine.prepare.prepare", _frozen_adapter)
    code = cli.main(["sanity", "-f", str(values), "--run", "lora", "--no-log", "--skip", "reproducible",
                     "--skip", "overfit"])
    assert code == SANITY_FAILED
    assert "FAIL" in capsys.readouterr().out


def test_a_seed_that_does_not_reproduce_fails(values):
    """The fault: initialisation drawn from a generator the run's seed does not control."""
    import torch

    from lora_exp.engine.prepare import prepare

    (run,) = resolve_runs(values, "lora")
    calls = []

    def unseeded(r):
        p = prepare(r)
        calls.append(1)
        noise = torch.Generator().manual_seed(time.time_ns() + len(calls))
        with torch.no_grad():
            for name, param in p.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=noise) * 0.1)
        return p

    bad = check_reproducible(run, Options(repro_steps=2), unseeded)
    assert bad.status == FAIL and "losses differ at step 1" in bad.detail
    good = check_reproducible(run, Options(repro_steps=2), prepare)
    assert good.status == PASS and good.values["steps"] == 2


def test_broken_labels_fail(tiny_gpt2, toy_data, tmp_path, capsys):
    # One class only: loads fine, teaches nothing.
    one_class = [{**r, "label": "pos"} for r in toy_rows(64, seed=1)]
    data = {**toy_data, "train": str(write_jsonl(tmp_path / "one-class.jsonl", one_class))}
    values = write_values(tmp_path, experiment(tiny_gpt2, data, tmp_path), "one-class.yaml")
    assert cli.main(["sanity", "-f", str(values), "--no-log", "--skip", "reproducible"]) == SANITY_FAILED
    data_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data"))
    assert " FAIL " in data_line and "same label (pos)" in data_line

    # Labels that are not in the label set never reach a model: the data check of loading says which row.
    unknown = toy_rows(64, seed=1)
    unknown[5]["label"] = "positive"
    data = {**toy_data, "train": str(write_jsonl(tmp_path / "unknown.jsonl", unknown))}
    (run,) = resolve_runs(write_values(tmp_path, experiment(tiny_gpt2, data, tmp_path), "unknown.yaml"))
    checks = _by_name(run_checks(run, FAST))
    assert checks["model_loads"].status == FAIL and "row 6" in checks["model_loads"].detail
    assert all(checks[c].status == SKIP for c in ("trainable", "data", "gradient_flow", "overfit", "reproducible"))


def test_label_ids_out_of_range_fail_the_data_check(tiny_gpt2, toy_data, tmp_path):
    """Broken after tokenization (e.g. a formulation bug): ids outside the label set, or targets that are no
    label word for the verbalizer."""
    from lora_exp.engine.prepare import prepare

    values = write_values(tmp_path, experiment(tiny_gpt2, toy_data, tmp_path, runs={
        "cls": {}, "verb": {"formulation": {"kind": "verbalizer"}}}))
    cls, verb = resolve_runs(values)
    p = prepare(cls)
    assert check_data(p, cls.spec, Options()).status == PASS
    p.train_ds = p.train_ds.map(lambda row, i: {"labels": 7 if i % 4 == 0 else row["labels"]}, with_indices=True)
    bad = check_data(p, cls.spec, Options())
    assert bad.status == FAIL and "16 training labels outside 0..1" in bad.detail

    p = prepare(verb)
    assert check_data(p, verb.spec, Options()).status == PASS
    p.train_ds = p.train_ds.map(lambda row: {"labels": [t if t == -100 else 5 for t in row["labels"]]})
    bad = check_data(p, verb.spec, Options())
    assert bad.status == FAIL and "do not decode" in bad.detail


def test_unreachable_mlflow_fails_fast():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    check = check_mlflow(f"http://127.0.0.1:{port}")
    assert check.status == FAIL and f"127.0.0.1:{port}" in check.detail
    assert time.monotonic() - t0 < 15  # no minutes of retries


def test_only_train_runs_are_checked(values):
    assert cli.main(["sanity", "-f", str(values), "--run", "baseline"]) == errors.USER_ERROR
