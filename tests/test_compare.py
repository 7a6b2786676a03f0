"""`lora-exp compare` on real runs (baseline eval, LoRA, head-only on tiny GPT-2): every number in its tables
is the one MLflow holds, its charts are PNGs of the size their panel count implies, and the report is
logged as a `comparison` run. KD and QLoRA sections are checked on runs logged with those tags."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_exp import cli
from lora_exp.core import errors
from lora_exp.core.plots import IMAGE_PANEL, figure_size
from lora_exp.reports.runs import split_metrics
from lora_exp.reports.selection import Selection, search
from support import experiment, mlflow_client, run_cli, toy_rows, write_jsonl, write_values

RELEASE = "toy-release"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory) -> Path:
    """A baseline eval, a LoRA and a head-only run of the toy task, logged as a Helm release would log them."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.fit import train_run as train
    from lora_exp.pipelines.eval_job import evaluate_run

    tmp = tmp_path_factory.mktemp("compare")
    data = {"train": str(write_jsonl(tmp / "data/train.jsonl", toy_rows(64, seed=1))),
            "validation": str(write_jsonl(tmp / "data/validation.jsonl", toy_rows(16, seed=2)))}
    values = write_values(tmp, experiment(tiny_gpt2, data, tmp, runs={
        "baseline": {"job": "eval"},
        "lora": {"method": {"name": "lora", "r": 4, "alpha": 8}},
        "head": {"method": {"name": "head_only"}},
    }))
    os.environ["LORA_EXP_RELEASE"] = RELEASE
    try:
        for run in resolve_runs(values):
            train(run) if run.spec.job == "train" else evaluate_run(run)
    finally:
        del os.environ["LORA_EXP_RELEASE"]
    return tmp


def _uri(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def _runs(tmp: Path) -> dict:
    client = mlflow_client(tmp)
    exp = client.get_experiment_by_name("toy")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.job != 'compare'")}


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _num(cell: str) -> float | None:
    return float(cell) if cell else None


def test_report_tables_and_charts_match_mlflow(store, tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main(["compare", "-f", str(store / "values.yaml"), "--out", str(out)])
    assert code == errors.OK
    assert "# Comparison report" in capsys.readouterr().out
    client, runs = mlflow_client(store), _runs(store)
    base, lora, head = runs["baseline"], runs["lora"], runs["head"]

    # comparison_table.csv: one row per run, every <split>_<metric> exactly as logged.
    rows = {r["run"]: r for r in _csv(out / "comparison_table.csv")}
    assert set(rows) == {"baseline", "lora", "head"}
    assert rows["baseline"]["role"] == "baseline" and rows["lora"]["role"] == "fine-tuned"
    split_columns = {"validation_accuracy", "validation_f1_macro", "validation_loss", "validation_samples"}
    assert split_columns <= set(rows["lora"])
    for name, run in runs.items():
        assert rows[name]["run_id"] == run.info.run_id
        assert rows[name]["method"] == run.data.tags["method"]
        for col in split_columns:
            assert float(rows[name][col]) == run.data.metrics[col], (name, col)

    # improvements.json: each fine-tuned run against the baseline, per metric, absolute and relative.
    doc = json.loads((out / "improvements.json").read_text())
    assert doc["baselines"] == {base.info.run_id: "baseline"}
    got = {(i["run"], i["metric"]): i for i in doc["improvements"]}
    assert set(got) == {(r, m) for r in ("lora", "head") for m in ("accuracy", "f1_macro", "loss")}
    for (name, metric), imp in got.items():
        before, after = base.data.metrics[f"validation_{metric}"], runs[name].data.metrics[f"validation_{metric}"]
        assert imp["baseline_run_id"] == base.info.run_id and imp["split"] == "validation"
        assert (imp["baseline_value"], imp["value"]) == (before, after)
        assert imp["abs_change"] == pytest.approx(after - before)
        assert imp["rel_change"] == pytest.approx((after - before) / abs(before))
        assert imp["higher_is_better"] is (metric != "loss")
        assert imp["improved"] is ((after > before) if metric != "loss" else (after < before))

    # method_table.csv: seed 003's columns, from the runs' metrics and metric histories.
    table = {r["run"]: r for r in _csv(out / "method_table.csv")}
    for name, run in (("lora", lora), ("head", head)):
        m, row = run.data.metrics, table[name]
        assert _num(row["size_mb"]) == m["artifact_size_mb"]
        assert _num(row["trainable_params"]) == m["trainable_params"]
        assert _num(row["trainable_share"]) == m["trainable_share"]
        assert _num(row["train_runtime_s"]) == m["train_runtime"]
        assert _num(row["peak_cpu_memory_mb"]) == m["peak_cpu_memory_mb"]
        assert _num(row["peak_gpu_memory_mb"]) == m.get("peak_gpu_memory_mb")  # empty on CPU
        assert _num(row["train_samples_per_second"]) == m["train_samples_per_second"]
        assert _num(row["best_train_loss"]) == min(p.value for p in client.get_metric_history(run.info.run_id, "loss"))
        assert _num(row["best_val_loss"]) == min(p.value for p in
                                                 client.get_metric_history(run.info.run_id, "eval_loss"))
        assert _num(row["validation_accuracy"]) == m["validation_accuracy"]
        assert _num(row["validation_f1_macro"]) == m["validation_f1_macro"]
    assert table["lora"]["method"] == "lora" and table["head"]["method"] == "head_only"
    assert table["baseline"]["trainable_params"] == "" and table["baseline"]["best_train_loss"] == ""
    assert _num(table["baseline"]["best_val_loss"]) == base.data.metrics["validation_loss"]

    # Charts: one fixed-size panel per metric, so the pixel size follows from what is compared.
    assert _png_size(out / "comparison.png") == figure_size(2) == (800, 300)  # accuracy, f1_macro
    assert _png_size(out / "methods.png") == (800, 300)  # head-only vs LoRA
    assert _png_size(out / "learning_curves.png") == figure_size(4) == (1200, 600)  # loss, eval loss/acc/f1
    assert _png_size(out / "confusion_validation.png") == figure_size(3, IMAGE_PANEL, 4) == (1200, 360)
    assert not (out / "kd.png").exists()  # no distillation runs here
    report = (out / "report.md").read_text()
    for png in ("comparison.png", "methods.png", "learning_curves.png", "confusion_validation.png"):
        assert f"]({png})" in report
        assert (out / png).stat().st_size < 200_000
    assert "## Baseline vs fine-tuned" in report and "### Head-only vs LoRA vs QLoRA" in report
    assert "KD vs no KD" not in report

    # Logged as a FINISHED run named "comparison" (job=compare), with the report as its artifacts.
    exp = client.get_experiment_by_name("toy")
    (logged,) = client.search_runs([exp.experiment_id], "tags.job = 'compare'")
    assert logged.info.run_name == "comparison" and logged.info.status == "FINISHED"
    assert set(logged.data.tags["lora_exp.compared_runs"].split(",")) == {r.info.run_id for r in runs.values()}
    assert "## Baseline vs fine-tuned" in logged.data.tags["mlflow.note.content"]
    assert sorted(f.path for f in client.list_artifacts(logged.info.run_id)) == sorted(p.name for p in out.iterdir())


def test_selection_by_release_filter_ids_and_values_file(store):
    from mlflow import MlflowClient

    client, runs = MlflowClient(_uri(store)), _runs(store)
    ids = {name: r.info.run_id for name, r in runs.items()}

    def names(sel: Selection, **kw) -> list[str]:
        return [i.name for i in search(client, sel, **kw)]

    assert names(Selection(release=RELEASE)) == ["baseline", "lora", "head"]  # oldest first
    assert names(Selection(release="another")) == []
    assert names(Selection(experiments=("toy",), filter="tags.method = 'lora'")) == ["lora"]
    assert names(Selection(experiments=("toy",), run_names=("lora", "baseline"))) == ["baseline", "lora"]
    assert names(Selection(run_ids=(ids["head"],))) == ["head"]
    assert names(Selection(experiments=("no-such-experiment",))) == []

    # A newer attempt of a run replaces the older one; compare keeps the newest *finished* one.
    exp_id = client.get_experiment_by_name("toy").experiment_id
    retry = client.create_run(exp_id, run_name="lora", tags={**runs["lora"].data.tags})
    client.set_terminated(retry.info.run_id, status="FAILED")
    try:
        assert [i.run_id for i in search(client, Selection(release=RELEASE)) if i.name == "lora"] == [
            retry.info.run_id]
        finished = search(client, Selection(release=RELEASE), statuses=("FINISHED",))
        assert [i.run_id for i in finished if i.name == "lora"] == [ids["lora"]]
        assert len(search(client, Selection(release=RELEASE), latest=False)) == 4
    finally:
        client.delete_run(retry.info.run_id)


def test_no_match_or_a_run_without_its_file_is_a_user_error(store, tmp_path):
    code = cli.main(["compare", "--tracking-uri", _uri(store), "--release", "nothing-here", "--out", str(tmp_path)])
    assert code == errors.USER_ERROR
    assert cli.main(["compare", "--run", "lora", "--out", str(tmp_path)]) == errors.USER_ERROR


def test_cli_subprocess_writes_report_without_logging(store, tmp_path):
    client = mlflow_client(store)
    exp = client.get_experiment_by_name("toy")
    before = len(client.search_runs([exp.experiment_id]))
    out = tmp_path / "r"
    proc = run_cli("compare", "--experiment", "toy", "--tracking-uri", _uri(store), "--out", str(out), "--no-log",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "report.md").is_file() and (out / "comparison_table.csv").is_file()
    assert len(client.search_runs([exp.experiment_id])) == before


def test_qlora_and_kd_sections_when_such_runs_exist(tmp_path):
    """Runs tagged as the QLoRA and distill jobs tag them (method qlora; job and method distill, kd)."""
    from mlflow import MlflowClient

    client = MlflowClient(_uri(tmp_path))
    exp = client.create_experiment("distill")

    def logged(name: str, job: str, method: str, acc: float, **tags: str) -> str:
        run = client.create_run(exp, run_name=name, tags={"job": job, "method": method, "task": "sst2",
                                                          "model": "student", "lora_exp.run": name, **tags})
        rid = run.info.run_id
        client.log_metric(rid, "validation_accuracy", acc)
        client.log_metric(rid, "validation_samples", 100)
        if job != "eval":
            for step, loss in enumerate((0.9, 0.5, 0.3), start=1):
                client.log_metric(rid, "loss", loss, step=step)
        client.set_terminated(rid)
        return rid

    logged("baseline", "eval", "none", 0.5, **{"eval.source": "base"})
    logged("lora", "train", "lora", 0.8)
    logged("qlora", "train", "qlora", 0.78)
    logged("kd", "distill", "distill", 0.75, kd="true", **{"distill.teacher_run_id": "t1"})
    logged("no-kd", "distill", "distill", 0.7, kd="false")
    out = tmp_path / "report"
    assert cli.main(["compare", "--experiment", "distill", "--tracking-uri", _uri(tmp_path), "--out", str(out),
                     "--no-log"]) == errors.OK
    report = (out / "report.md").read_text()
    assert "### Head-only vs LoRA vs QLoRA" in report and "### KD vs no KD" in report
    assert _png_size(out / "methods.png") == figure_size(1)  # lora, qlora: one metric panel
    assert _png_size(out / "kd.png") == figure_size(1)
    table = {r["run"]: r for r in _csv(out / "method_table.csv")}
    assert (table["kd"]["kd"], table["kd"]["teacher_run_id"], table["no-kd"]["kd"]) == ("true", "t1", "false")
    imps = {i["run"]: i for i in json.loads((out / "improvements.json").read_text())["improvements"]}
    assert imps["kd"]["abs_change"] == pytest.approx(0.25) and imps["no-kd"]["rel_change"] == pytest.approx(0.4)
    assert not (out / "confusion_validation.png").exists()  # no artifacts logged: no matrices, no error
    assert _png_size(out / "learning_curves.png") == figure_size(1)  # train loss of lora, qlora, kd, no-kd
    assert "| kd | distill |" in report


def test_split_detection_is_generic():
    """Splits come from <split>_samples (and eval/<split> artifacts); the longest split name wins."""
    metrics = {"validation_matched_accuracy": 0.8, "validation_matched_samples": 10, "validation_mismatched_mcc": 0.1,
               "validation_mismatched_samples": 10, "validation_perplexity": 12.0, "validation_samples": 5,
               "train_runtime": 3.0, "eval_loss": 0.5}
    got = split_metrics(metrics, ["validation", "validation_matched", "validation_mismatched"])
    assert got == {"validation": {"perplexity": 12.0, "samples": 5},
                   "validation_matched": {"accuracy": 0.8, "samples": 10},
                   "validation_mismatched": {"mcc": 0.1, "samples": 10}}
    from lora_exp.reports.runs import higher_is_better, is_score

    assert not higher_is_better("perplexity") and higher_is_better("exact") and not is_score("samples")
    assert math.isclose(figure_size(7)[1], 3 * 300)


def test_report_tools_import_no_ml_library():
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(t in proc.stdout for t in ("compare", "sanity", "status"))
    import subprocess
    import sys

    code = ("import sys, lora_exp.cli, lora_exp.reports.compare, lora_exp.pipelines.sanity, lora_exp.reports.status, "
            "lora_exp.reports.selection, lora_exp.core.plots, lora_exp.core.tables; lora_exp.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'matplotlib', 'kubernetes') if m in sys.modules];"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
