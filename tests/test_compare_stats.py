"""Comparisons with their uncertainty: arms of repeated runs get a mean and a 95% interval; arms are compared
across seeds and across examples, and every number is checked here against scipy, computed independently
from what the runs logged (their metrics and their per-example predictions)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lora_exp import cli
from lora_exp.core import errors
from support import experiment, mlflow_client, toy_rows, write_jsonl, write_values

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tiny_gpt2, tmp_path_factory) -> tuple[Path, dict]:
    """An untrained baseline, a fine-tuned run three times (seeds 42-44), its twin differing only by seed
    (45-47), and a single-seed one; then `lora-exp compare`."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.fit import train_run as train
    from lora_exp.pipelines.eval_job import evaluate_run

    tmp = tmp_path_factory.mktemp("stats")
    data = {"train": str(write_jsonl(tmp / "data/train.jsonl", toy_rows(64, seed=1))),
            "validation": str(write_jsonl(tmp / "data/validation.jsonl", toy_rows(48, seed=2)))}
    lora = {"method": {"name": "full"}, "training": {"max_steps": 48}}  # learns the toy task in 48 steps
    values = write_values(tmp, experiment(tiny_gpt2, data, tmp, training={
        "eval_strategy": "no", "save_strategy": "no", "learning_rate": 1e-3, "logging_steps": 48}, runs={
        "baseline": {"job": "eval"},
        "lora": {**lora, "repeats": 3},
        "twin": {**lora, "seeds": [45, 46, 47]},
        "once": {**lora, "training": {"max_steps": 48, "seed": 7}},
    }))
    for run in resolve_runs(values):
        train(run) if run.spec.job == "train" else evaluate_run(run)
    out = tmp / "report"
    assert cli.main(["compare", "-f", str(values), "--out", str(out), "--no-log"]) == errors.OK
    return out, json.loads((out / "improvements.json").read_text())


def _record(records: list[dict], arm: str, versus: str, metric: str = "accuracy") -> dict:
    (found,) = [r for r in records if r["run"] == arm and r["baseline"] == versus and r["metric"] == metric]
    return found


def _logged(tmp: Path, names: list[str]) -> tuple[list[float], list[np.ndarray]]:
    """Each run's logged validation accuracy and its per-example correctness (from predictions.csv)."""
    client = mlflow_client(tmp)
    runs = {r.data.tags["lora_exp.run"]: r
            for r in client.search_runs([client.get_experiment_by_name("toy").experiment_id])}
    accs, correct = [], []
    for name in names:
        r = runs[name]
        accs.append(r.data.metrics["validation_accuracy"])
        path = client.download_artifacts(r.info.run_id, "eval/validation/predictions.csv", str(tmp / "dl" / name))
        with open(path, newline="") as fh:
            correct.append(np.array([row["correct"] == "True" for row in csv.DictReader(fh)], dtype=float))
    return accs, correct


def test_baseline_vs_repeated_lora_carries_mean_interval_and_p_value_as_scipy_computes_them(report):
    out, doc = report
    tmp = out.parent
    rec = _record(doc["improvements"], "lora", "baseline")
    lora_accs, lora_correct = _logged(tmp, ["lora/seed-42", "lora/seed-43", "lora/seed-44"])
    (base_acc,), (base_correct,) = _logged(tmp, ["baseline"])

    assert rec["n"] == 3 and rec["baseline_n"] == 1 and rec["runs"] == ["lora/seed-42", "lora/seed-43", "lora/seed-44"]
    assert rec["value"] == pytest.approx(np.mean(lora_accs)) and rec["baseline_value"] == pytest.approx(base_acc)
    sem = np.std(lora_accs, ddof=1) / np.sqrt(3)
    assert rec["ci"] == pytest.approx(list(stats.t.interval(0.95, 2, loc=np.mean(lora_accs), scale=sem)))
    seed_test = stats.ttest_1samp(lora_accs, base_acc)
    assert rec["seed_test"]["p_value"] == pytest.approx(seed_test.pvalue)
    ci = seed_test.confidence_interval(0.95)
    assert rec["seed_test"]["ci_low"] == pytest.approx(ci.low - base_acc)
    assert rec["seed_test"]["ci_high"] == pytest.approx(ci.high - base_acc)
    assert rec["p_value"] == rec["seed_test"]["p_value"]  # the verdict follows the seeds

    d = np.mean(lora_correct, axis=0) - base_correct  # per example, LoRA averaged over its seeds
    assert d.mean() == pytest.approx(rec["abs_change"])
    boot = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile",
                           rng=np.random.default_rng(0))
    assert rec["example_test"]["ci_low"] == pytest.approx(boot.confidence_interval.low)
    assert rec["example_test"]["ci_high"] == pytest.approx(boot.confidence_interval.high)
    perm = stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True, n_resamples=4000,
                                  rng=np.random.default_rng(0))
    assert rec["example_test"]["test"] == "paired permutation test over examples"
    assert rec["example_test"]["p_value"] == pytest.approx(perm.pvalue)

    assert rec["significant"] and rec["verdict"].startswith("lora beats baseline")
    report_md = (out / "report.md").read_text()
    row = next(line for line in report_md.splitlines() if line.startswith("| lora | baseline | validation | accuracy"))
    assert f"{rec['p_value']:.4g}" in row and "[" in row  # mean, interval and p-value in the table


def test_arms_that_differ_only_by_seed_are_not_significantly_different(report):
    _, doc = report
    rec = _record(doc["comparisons"], "twin", "lora")
    assert rec["n"] == 3 and rec["baseline_n"] == 3 and rec["seed_test"]["test"].startswith("Welch")
    assert not rec["significant"] and rec["verdict"].startswith("no significant difference")


def test_a_single_seed_comparison_says_so_and_uses_the_examples(report):
    out, doc = report
    rec = _record(doc["improvements"], "once", "baseline")
    assert rec["single_seed"] and rec["seed_test"] is None
    assert rec["example_test"]["test"] == "McNemar exact test"
    _, (once,) = _logged(out.parent, ["once"])
    _, (base,) = _logged(out.parent, ["baseline"])
    b, c = int(((base == 1) & (once == 0)).sum()), int(((base == 0) & (once == 1)).sum())
    assert rec["p_value"] == pytest.approx(stats.binomtest(c, b + c, 0.5).pvalue)
    assert "validation accuracy: once beats baseline by" in (out / "report.md").read_text()
    assert "across examples (single seed)" in rec["verdict"]
    with (out / "arms_table.csv").open() as fh:
        arms = {(r["arm"], r["metric"]): r for r in csv.DictReader(fh)}
    assert arms[("lora", "accuracy")]["n"] == "3" and arms[("once", "accuracy")]["ci_low"] == ""
